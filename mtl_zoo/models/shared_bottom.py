"""Shared-Bottom (hard parameter sharing): one network for all tasks, a tower each."""

from typing import Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def build_shared_bottom(schema: schema_lib.Schema,
                        bottom_units: Sequence[int] = (128,),
                        tower_units: Sequence[int] = (8,),
                        dropout: float = 0.0,
                        activation: str = "relu",
                        embeddings_l2: float = common.EMBEDDINGS_L2,
                        cross_layers: int = 0,
                        name: str = "shared_bottom") -> keras.Model:
  """Shared-Bottom model (Caruana 1997): embeddings -> shared MLP -> per-task towers.

  Its own hyper-parameter is `bottom_units`; the others are the ones every
  builder takes.

  Args:
    schema: the dataset schema: one model input per feature, one output per task.
    bottom_units: widths of the shared MLP (layer `shared_bottom`), the capacity
      every task shares.
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    dropout: dropout rate after every layer of the bottom and the
      towers (training only).
    activation: Keras activation of every layer of the bottom and the towers.
    embeddings_l2: L2 penalty on the embedding tables.
    cross_layers: DCN-v2 cross layers (TFRS `Cross`) after the embeddings; 0
      for none.
    name: the Keras model's name.

  Returns:
    An uncompiled functional `keras.Model`. Inputs: dict feature name ->
    `keras.Input`, one per schema feature (`layers.schema_inputs`). Outputs:
    dict task name -> [batch, 1], a probability for binary tasks and a linear
    value for regression and ranking ones.
  """
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  shared = layers.MLP(bottom_units, activation, dropout, name="shared_bottom")(x)
  outputs = common.task_towers(schema, {t: shared for t in schema.task_names},
                               tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
