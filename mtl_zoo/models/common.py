"""Pieces every builder shares: schema inputs, the embedding bottom, task towers."""

from typing import Dict, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import _keras, layers
from pipelines import schema as schema_lib

# Default L2 on embedding tables, chosen on the realistic synthetic log's
# validation split (scripts/choose_defaults.py; BUILD_NOTES "Defaults on sparse
# logs"): sparse ids overfit within a few epochs without it.
EMBEDDINGS_L2 = 1e-4


def embedded_inputs(schema: schema_lib.Schema, embeddings_l2: float = EMBEDDINGS_L2,
                    cross_layers: int = 0, name: str = "feature_embedding"
                    ) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
  """Keras inputs for every schema feature and their embedded [batch, dim] vector,
  optionally through `cross_layers` DCN-v2 cross layers."""
  inputs = layers.schema_inputs(schema)
  return inputs, embed(inputs, schema, embeddings_l2, cross_layers, name)


def embed(inputs: Dict[str, tf.Tensor], schema: schema_lib.Schema,
          embeddings_l2: float = EMBEDDINGS_L2, cross_layers: int = 0,
          name: str = "feature_embedding") -> tf.Tensor:
  """The feature-interaction bottom every builder shares: embeddings, then
  optionally `cross_layers` explicit DCN-v2 feature crosses (Wang et al., WWW
  2021): x_{l+1} = x_0 * (W x_l + b) + x_l (`_keras.feature_cross`: TFRS under
  Keras 2, keras-rs under Keras 3)."""
  x0 = layers.feature_embedding(schema, embeddings_l2, name=name)(inputs)
  x = x0
  if cross_layers:
    for i in range(cross_layers):
      x = _keras.feature_cross(f"{name}_cross_{i}")(x0, x)
  return x


def task_towers(schema: schema_lib.Schema, task_inputs: Dict[str, tf.Tensor],
                tower_units: Sequence[int], dropout: float = 0.0,
                activation: str = "relu") -> Dict[str, tf.Tensor]:
  """One tower and output head per task; each output is named after its task."""
  outputs = {}
  for task in schema.tasks:
    x = task_inputs[task.name]
    if tower_units:
      x = layers.MLP(tower_units, activation, dropout, name=f"{task.name}_tower")(x)
    outputs[task.name] = layers.TaskHead(task.type, name=task.name)(x)
  return outputs
