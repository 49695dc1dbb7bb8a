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
                        embeddings_l2: float = 0.0,
                        cross_layers: int = 0,
                        name: str = "shared_bottom") -> keras.Model:
  """Shared-Bottom model (Caruana 1997): embeddings -> shared MLP -> per-task towers.

  Returns an uncompiled functional model whose inputs are the schema's features
  and whose outputs are a dict of task name -> [batch, 1].
  """
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  shared = layers.MLP(bottom_units, activation, dropout, name="shared_bottom")(x)
  outputs = common.task_towers(schema, {t: shared for t in schema.task_names},
                               tower_units, dropout, activation)
  return keras.Model(inputs, outputs, name=name)
