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
                      embeddings_l2: float = common.EMBEDDINGS_L2,
                      cross_layers: int = 0,
                      name: str = "single_task") -> keras.Model:
  """One model per task in one Keras model: each task has its own embeddings
  (`<task>_embedding`), bottom MLP (`<task>_bottom`) and tower. The baseline every
  multi-task comparison needs; also the per-objective models of score fusion.
  Its own hyper-parameter is `bottom_units`; the others are the ones every
  builder takes.

  Args:
    schema: the dataset schema: one model input per feature, one output per task.
    bottom_units: widths of each task's own bottom MLP.
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    dropout: dropout rate after every layer of the bottoms and the
      towers (training only).
    activation: Keras activation of every layer of the bottoms and the towers.
    embeddings_l2: L2 penalty on the embedding tables.
    cross_layers: DCN-v2 cross layers (TFRS `Cross`) after each task's
      embeddings; 0 for none.
    name: the Keras model's name.

  Returns:
    An uncompiled functional `keras.Model`. Inputs: dict feature name ->
    `keras.Input`, one per schema feature (`layers.schema_inputs`). Outputs:
    dict task name -> [batch, 1], a probability for binary tasks and a linear
    value for regression and ranking ones.
  """
  inputs = layers.schema_inputs(schema)
  task_inputs = {}
  for task in schema.task_names:
    x = common.embed(inputs, schema, embeddings_l2, cross_layers, name=f"{task}_embedding")
    task_inputs[task] = layers.MLP(bottom_units, activation, dropout,
                                   name=f"{task}_bottom")(x)
  outputs = common.task_towers(schema, task_inputs, tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
