"""CGC and PLE: task-specific plus shared experts (Tang et al., RecSys 2020)."""

from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib

SHARED = "shared"


def extraction_level(task_inputs: Dict[str, tf.Tensor], shared_input: tf.Tensor,
                     level: int, num_task_experts: int, num_shared_experts: int,
                     expert_units: Sequence[int], activation: str, dropout: float,
                     with_shared_gate: bool
                     ) -> Tuple[Dict[str, tf.Tensor], Optional[tf.Tensor]]:
  """One CGC extraction level.

  Each task has its own experts (`experts_<task>_<level>`), and all tasks see the
  shared experts (`experts_shared_<level>`). Task k's gate (`gate_<task>_<level>`)
  mixes only its own and the shared experts; where every task gate reads the
  same input (the first level), they are one `SoftmaxGates` layer
  `gates_<level>`. With `with_shared_gate` (lower PLE levels) a shared gate over
  all experts produces the next level's shared input.

  Args:
    task_inputs: dict task name -> [batch, features], each task's input (the
      same tensor for every task at the first level).
    shared_input: [batch, features], input of the shared experts and gate.
    level: index of the level, used in layer names.
    num_task_experts: experts per task, >= 1.
    num_shared_experts: shared experts, >= 1.
    expert_units: widths of each expert MLP.
    activation: Keras activation of every expert layer.
    dropout: dropout rate after every expert layer (training only).
    with_shared_gate: also mix every expert into a shared output.

  Returns:
    (task outputs, shared output): dict task name -> [batch,
    expert_units[-1]], and the shared [batch, expert_units[-1]] mixture, or
    None without `with_shared_gate`.
  """
  def bank(name, x, n):
    return layers.ExpertBank(n, expert_units, activation, dropout,
                             name=f"experts_{name}_{level}")(x)

  shared = bank(SHARED, shared_input, num_shared_experts)
  own = {task: bank(task, x, num_task_experts) for task, x in task_inputs.items()}
  candidates_per_gate = num_task_experts + num_shared_experts
  names = {task: f"gate_{task}_{level}" for task in task_inputs}
  first = next(iter(task_inputs.values()))
  if all(x is first for x in task_inputs.values()):  # one input: all task gates in one matmul
    weights = layers.SoftmaxGates(candidates_per_gate, list(names.values()),
                                  name=f"gates_{level}")(first)
  else:
    weights = {names[task]: layers.SoftmaxGate(candidates_per_gate, name=names[task])(x)
               for task, x in task_inputs.items()}
  outputs = {}
  for task in task_inputs:
    candidates = keras.layers.Concatenate(axis=1, name=f"candidates_{task}_{level}")(
        [own[task], shared])
    outputs[task] = layers.ExpertMixture(name=f"mixture_{task}_{level}")(
        [candidates, weights[names[task]]])
  shared_output = None
  if with_shared_gate:
    everything = keras.layers.Concatenate(axis=1, name=f"candidates_shared_{level}")(
        [*own.values(), shared])
    weights = layers.SoftmaxGate(num_task_experts * len(own) + num_shared_experts,
                                 name=f"gate_shared_{level}")(shared_input)
    shared_output = layers.ExpertMixture(name=f"mixture_shared_{level}")([everything, weights])
  return outputs, shared_output


def build_ple(schema: schema_lib.Schema,
              num_levels: int = 2,
              num_task_experts: int = 2,
              num_shared_experts: int = 2,
              expert_units: Sequence[int] = (16,),
              tower_units: Sequence[int] = (8,),
              dropout: float = 0.0,
              activation: str = "relu",
              embeddings_l2: float = common.EMBEDDINGS_L2,
              cross_layers: int = 0,
              name: str = "ple") -> keras.Model:
  """Progressive Layered Extraction: `num_levels` stacked extraction levels.

  Each level's task outputs are the next level's task inputs, and every level
  but the last feeds the next one's shared experts through a shared gate (see
  `extraction_level`); the last level's task outputs go to the task towers. Its
  own hyper-parameters are `num_levels`, `num_task_experts`,
  `num_shared_experts` and `expert_units`; the others are the ones every
  builder takes.

  Args:
    schema: the dataset schema: one model input per feature, one output per task.
    num_levels: stacked extraction levels, >= 1 (1 is CGC).
    num_task_experts: experts of each task at each level, >= 1.
    num_shared_experts: shared experts at each level, >= 1.
    expert_units: widths of each expert MLP; task outputs are [batch,
      expert_units[-1]].
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    dropout: dropout rate after every layer of the experts and the towers
      (training only).
    activation: Keras activation of every layer of the experts and the towers.
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
    ValueError: `num_levels` < 1, or an expert count < 1.
  """
  if num_levels < 1:
    raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  task_inputs, shared = {t: x for t in schema.task_names}, x
  for level in range(num_levels):
    task_inputs, shared = extraction_level(
        task_inputs, shared, level, num_task_experts, num_shared_experts, expert_units,
        activation, dropout, with_shared_gate=level < num_levels - 1)
  outputs = common.task_towers(schema, task_inputs, tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)


def build_cgc(schema: schema_lib.Schema,
              num_task_experts: int = 2,
              num_shared_experts: int = 2,
              expert_units: Sequence[int] = (16,),
              tower_units: Sequence[int] = (8,),
              dropout: float = 0.0,
              activation: str = "relu",
              embeddings_l2: float = common.EMBEDDINGS_L2,
              cross_layers: int = 0,
              name: str = "cgc") -> keras.Model:
  """Customized Gate Control: a single extraction level (PLE with one level).

  Args:
    schema, num_task_experts, num_shared_experts, expert_units, tower_units,
    dropout, activation, embeddings_l2, cross_layers, name: as `build_ple`.

  Returns:
    The model `build_ple(schema, num_levels=1, ...)` returns.
  """
  return build_ple(schema, 1, num_task_experts, num_shared_experts, expert_units,
                   tower_units, dropout, activation, embeddings_l2, cross_layers, name)
