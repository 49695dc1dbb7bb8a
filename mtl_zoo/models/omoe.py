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
               embeddings_l2: float = common.EMBEDDINGS_L2,
               cross_layers: int = 0,
               name: str = "omoe") -> keras.Model:
  """One-gate Mixture-of-Experts: MMoE's ablation with a single gate (layer
  `gate`) whose mixture feeds every task tower. Its own hyper-parameters are
  `num_experts` and `expert_units`; the others are the ones every builder takes.

  Args:
    schema: the dataset schema: one model input per feature, one output per task.
    num_experts: experts in the shared bank (layer `experts`), >= 1.
    expert_units: widths of each expert MLP; the mixture is [batch,
      expert_units[-1]].
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
  weights = layers.SoftmaxGate(num_experts, name="gate")(x)
  mixed = layers.ExpertMixture(name="mixture")([experts, weights])
  outputs = common.task_towers(schema, {t: mixed for t in schema.task_names},
                               tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
