"""Soft parameter sharing: per-task networks that learn how much to share."""

from typing import Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def build_cross_stitch(schema: schema_lib.Schema,
                       bottom_units: Sequence[int] = (64, 32),
                       tower_units: Sequence[int] = (8,),
                       cross_stitch_self_weight: float = 0.9,
                       dropout: float = 0.0,
                       activation: str = "relu",
                       embeddings_l2: float = common.EMBEDDINGS_L2,
                       cross_layers: int = 0,
                       name: str = "cross_stitch") -> keras.Model:
  """Cross-stitch networks (Misra et al., CVPR 2016) over shared embeddings.

  Each task has its own hidden layers (`<task>_layer_<i>`); after every layer a
  cross-stitch unit (`cross_stitch_<i>`) mixes the tasks' activations. Its own
  hyper-parameters are `bottom_units` and `cross_stitch_self_weight`; the others
  are the ones every builder takes.

  Args:
    schema: the dataset schema, with at least two tasks: one model input per
      feature, one output per task.
    bottom_units: width of each task's hidden layer `i`, each followed by a
      cross-stitch unit; empty for none (then no cross-stitch either).
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    cross_stitch_self_weight: initial weight of each task's own activations in
      every cross-stitch unit (`layers.CrossStitch`'s `self_weight`).
    dropout: dropout rate after every hidden and tower layer (training only).
    activation: Keras activation of every hidden and tower layer.
    embeddings_l2: L2 penalty on the embedding tables.
    cross_layers: DCN-v2 cross layers (TFRS `Cross`) after the embeddings; 0
      for none.
    name: the Keras model's name.

  Returns:
    An uncompiled functional `keras.Model`. Inputs: dict feature name ->
    `keras.Input`, one per schema feature (`layers.schema_inputs`). Outputs:
    dict task name -> [batch, 1], a probability for binary tasks and a linear
    value for regression and ranking ones.

  Raises:
    ValueError: fewer than two tasks.
  """
  if len(schema.tasks) < 2:
    raise ValueError("cross_stitch needs at least two tasks.")
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  hidden = [x] * len(schema.tasks)
  for i, units in enumerate(bottom_units):
    hidden = [layers.MLP([units], activation, dropout, name=f"{task}_layer_{i}")(h)
              for task, h in zip(schema.task_names, hidden)]
    hidden = layers.CrossStitch(cross_stitch_self_weight, name=f"cross_stitch_{i}")(hidden)
  outputs = common.task_towers(schema, dict(zip(schema.task_names, hidden)), tower_units,
                               dropout, activation)
  return keras.Model(inputs, outputs, name=name)


def build_l2_constrained(schema: schema_lib.Schema,
                         bottom_units: Sequence[int] = (64, 32),
                         tower_units: Sequence[int] = (8,),
                         l2_distance_weight: float = 1e-3,
                         activation: str = "relu",
                         embeddings_l2: float = common.EMBEDDINGS_L2,
                         cross_layers: int = 0,
                         name: str = "l2_constrained") -> keras.Model:
  """Per-task networks whose parameters are pulled together by an L2 distance
  penalty (Duong et al., ACL 2015), over shared embeddings (layer `task_networks`).

  Its own hyper-parameters are `bottom_units` and `l2_distance_weight`; it takes
  no dropout, the others are the ones every builder takes.

  Args:
    schema: the dataset schema, with at least two tasks: one model input per
      feature, one output per task.
    bottom_units: widths of each task network (at least one layer).
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    l2_distance_weight: weight of the penalty on the squared distances between
      the task networks' parameters (`layers.L2ConstrainedNetworks`), added to
      the model's losses.
    activation: Keras activation of every layer of the task networks and the
      towers.
    embeddings_l2: L2 penalty on the embedding tables.
    cross_layers: DCN-v2 cross layers (TFRS `Cross`) after the embeddings; 0
      for none.
    name: the Keras model's name.

  Returns:
    An uncompiled functional `keras.Model`. Inputs: dict feature name ->
    `keras.Input`, one per schema feature (`layers.schema_inputs`). Outputs:
    dict task name -> [batch, 1], a probability for binary tasks and a linear
    value for regression and ranking ones.

  Raises:
    ValueError: fewer than two tasks, or empty `bottom_units`.
  """
  if len(schema.tasks) < 2:
    raise ValueError("l2_constrained needs at least two tasks.")
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  hidden = layers.L2ConstrainedNetworks(len(schema.tasks), bottom_units, l2_distance_weight,
                                        activation, name="task_networks")(x)
  outputs = common.task_towers(schema, dict(zip(schema.task_names, hidden)), tower_units,
                               activation=activation)
  return keras.Model(inputs, outputs, name=name)
