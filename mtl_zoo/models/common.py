"""Pieces every builder shares: schema inputs, task towers, compilation."""

from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo import ranking
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


def embedded_inputs(schema: schema_lib.Schema, embeddings_l2: float = 0.0,
                    cross_layers: int = 0, name: str = "feature_embedding"
                    ) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
  """Keras inputs for every schema feature and their embedded [batch, dim] vector,
  optionally through `cross_layers` DCN-v2 cross layers."""
  inputs = layers.schema_inputs(schema)
  return inputs, embed(inputs, schema, embeddings_l2, cross_layers, name)


def embed(inputs: Dict[str, tf.Tensor], schema: schema_lib.Schema,
          embeddings_l2: float = 0.0, cross_layers: int = 0,
          name: str = "feature_embedding") -> tf.Tensor:
  """The feature-interaction bottom every builder shares: embeddings, then
  optionally `cross_layers` explicit feature crosses from TFRS's DCN-v2 `Cross`
  (Wang et al., WWW 2021): x_{l+1} = x_0 * (W x_l + b) + x_l."""
  x0 = layers.feature_embedding(schema, embeddings_l2, name=name)(inputs)
  x = x0
  if cross_layers:
    import tensorflow_recommenders as tfrs  # only models with crosses pay its import
    for i in range(cross_layers):
      x = tfrs.layers.dcn.Cross(name=f"{name}_cross_{i}")(x0, x)
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


def task_loss(task: schema_lib.Task) -> keras.losses.Loss:
  """Log-loss for binary tasks, MSE for regression, the task's list loss for
  ranking (over the request lists the reader batches)."""
  if task.type == schema_lib.BINARY:
    return keras.losses.BinaryCrossentropy(name=f"{task.name}_logloss")
  if task.type == schema_lib.RANKING:
    return ranking.RANKING_LOSSES[task.ranking_loss](task.list_size,
                                             name=f"{task.name}_{task.ranking_loss}")
  return keras.losses.MeanSquaredError(name=f"{task.name}_mse")


def task_losses(schema: schema_lib.Schema) -> Dict[str, keras.losses.Loss]:
  return {t.name: task_loss(t) for t in schema.tasks}


def compile_model(model: keras.Model, schema: schema_lib.Schema,
                  learning_rate: float = 1e-3,
                  optimizer: Optional[keras.optimizers.Optimizer] = None,
                  weighting: str = "fixed", weighting_options: Optional[dict] = None,
                  **compile_kwargs) -> keras.Model:
  """Compiles for training with one loss per task; returns the model to `fit`.

  With `weighting="fixed"` that is `model` itself, compiled with the schema's
  loss weights. Other methods (see `mtl_zoo.weighting`) return a
  `MultiTaskTrainer` wrapping `model`; fit the trainer, export `model`.

  Masks arrive as per-task sample weights from the reader, so a masked example
  adds nothing to its task's loss. Exact per-task metrics are computed on eval
  data by `mtl_zoo.metrics` rather than by streaming Keras metrics, which are
  approximate (AUC) and slow down every training step.
  """
  # Legacy Adam applies each variable's update in one fused kernel; the new
  # optimizer issues ~10 ops per variable, which dominates small models on CPU.
  optimizer = optimizer or keras.optimizers.legacy.Adam(learning_rate)
  # Task masks arrive as sample weights; no streaming metrics need them.
  compile_kwargs.setdefault("weighted_metrics", [])
  if weighting != "fixed":
    from mtl_zoo.weighting import MultiTaskTrainer  # it imports this module
    trainer = MultiTaskTrainer(model, schema, weighting, **(weighting_options or {}))
    trainer.compile(optimizer=optimizer, **compile_kwargs)
    return trainer
  model.compile(
      optimizer=optimizer,
      loss=task_losses(schema),
      loss_weights={t.name: t.loss_weight for t in schema.tasks},
      **compile_kwargs)
  return model
