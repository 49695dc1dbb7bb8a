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
               embeddings_l2: float = 0.0,
               cross_layers: int = 0,
               name: str = "mmoe") -> keras.Model:
  """Multi-gate Mixture-of-Experts.

  Every task reads the same bank of experts through its own gate (`gate_<task>`
  of the `gates` layer), so tasks share what helps them and keep apart where
  they conflict. Returns an uncompiled model with outputs task name -> [batch, 1].
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
