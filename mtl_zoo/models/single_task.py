"""Single-Task baseline: one independent network per task, nothing shared."""

from typing import Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def build_single_task(schema: schema_lib.Schema,
                      bottom_units: Sequence[int] = (128,),
                      tower_units: Sequence[int] = (8,),
                      dropout: float = 0.0,
                      activation: str = "relu",
                      embeddings_l2: float = 0.0,
                      cross_layers: int = 0,
                      name: str = "single_task") -> keras.Model:
  """One model per task in one Keras model: each task has its own embeddings
  (`<task>_embedding`), bottom MLP (`<task>_bottom`) and tower. The baseline every
  multi-task comparison needs; also the per-objective models of score fusion."""
  inputs = layers.schema_inputs(schema)
  task_inputs = {}
  for task in schema.task_names:
    x = common.embed(inputs, schema, embeddings_l2, cross_layers, name=f"{task}_embedding")
    task_inputs[task] = layers.MLP(bottom_units, activation, dropout,
                                   name=f"{task}_bottom")(x)
  outputs = common.task_towers(schema, task_inputs, tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
