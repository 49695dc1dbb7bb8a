"""MMoE: shared experts, one softmax gate per task (Ma et al., KDD 2018)."""

from typing import Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def build_mmoe(schema: schema_lib.Schema,
               num_experts: int = 8,
               expert_units: Sequence[int] = (16,),
               tower_units: Sequence[int] = (8,),
               dropout: float = 0.0,
               activation: str = "relu",
               embeddings_l2: float = common.EMBEDDINGS_L2,
               cross_layers: int = 0,
               name: str = "mmoe") -> keras.Model:
  """Multi-gate Mixture-of-Experts.

  Every task reads the same bank of experts through its own gate (`gate_<task>`
  of the `gates` layer), so tasks share what helps them and keep apart where
  they conflict. Its own hyper-parameters are `num_experts` and `expert_units`;
  the others are the ones every builder takes.

  Args:
    schema: the dataset schema: one model input per feature, one output per task.
    num_experts: experts in the shared bank (layer `experts`), >= 1.
    expert_units: widths of each expert MLP; each task's mixture
      (`mixture_<task>`) is [batch, expert_units[-1]].
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    dropout: dropout rate after every layer of the experts and the
      towers (training only).
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
  """
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  experts = layers.ExpertBank(num_experts, expert_units, activation, dropout,
                              name="experts")(x)
  gates = layers.SoftmaxGates(num_experts, [f"gate_{t}" for t in schema.task_names],
                              name="gates")(x)
  mixed = {task: layers.ExpertMixture(name=f"mixture_{task}")([experts, gates[f"gate_{task}"]])
           for task in schema.task_names}
  outputs = common.task_towers(schema, mixed, tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
