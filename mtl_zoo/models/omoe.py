"""OMoE: shared experts mixed by one gate shared by all tasks (Ma et al., KDD 2018)."""

from typing import Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def build_omoe(schema: schema_lib.Schema,
               num_experts: int = 8,
               expert_units: Sequence[int] = (16,),
               tower_units: Sequence[int] = (8,),
               dropout: float = 0.0,
               activation: str = "relu",
               embeddings_l2: float = 0.0,
               cross_layers: int = 0,
               name: str = "omoe") -> keras.Model:
  """One-gate Mixture-of-Experts: MMoE's ablation with a single gate (layer
  `gate`) whose mixture feeds every task tower."""
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  experts = layers.ExpertBank(num_experts, expert_units, activation, dropout,
                              name="experts")(x)
  weights = layers.SoftmaxGate(num_experts, name="gate")(x)
  mixed = layers.ExpertMixture(name="mixture")([experts, weights])
  outputs = common.task_towers(schema, {t: mixed for t in schema.task_names},
                               tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
