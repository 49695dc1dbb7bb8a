"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR 2018).

Post-click conversion is only observed on clicked impressions, so a CVR model
trained there is biased and data-starved. ESMM learns pCTR on all impressions and
pCTCVR = pCTR x pCVR on all impressions; pCVR is never fitted directly, yet it is
what the model's CVR tower outputs.

The chain of stages comes from the schema: a task whose mask is the label of the
previous task is that task's next stage (ctr: click; cvr: conversion, mask click;
and so on for longer funnels). `entire_space_schema` turns such a schema into the
one ESMM trains with: every stage after the first keeps its conditional output
(loss weight 0, still evaluated on its mask) and gains an entire-space task, named
`<previous>_<stage>` (e.g. `ctr_cvr` = pCTCVR), learned on all impressions.
"""

import dataclasses
from typing import List, Sequence

from mtl_zoo import layers
from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib


def stage_chain(schema: schema_lib.Schema) -> List[schema_lib.Task]:
  """The longest chain of tasks linked by masks (each stage masked by the one before).

  Args:
    schema: a schema whose tasks link by masks (e.g. ctr: label click; cvr:
      label conversion, mask click).

  Returns:
    The chain's tasks, first stage (a task without a mask) first; at least two.

  Raises:
    pipelines.schema.SchemaError: no two tasks are linked by a mask.
  """
  by_mask = {t.mask: t for t in schema.tasks if t.mask}
  best: List[schema_lib.Task] = []
  for first in (t for t in schema.tasks if not t.mask):
    chain = [first]
    while chain[-1].label in by_mask and by_mask[chain[-1].label] not in chain:
      chain.append(by_mask[chain[-1].label])
    if len(chain) > len(best):
      best = chain
  if len(best) < 2:
    raise schema_lib.SchemaError(
        "esmm needs tasks chained by masks, e.g. ctr (label click) and cvr (label "
        f"conversion, mask click); schema {schema.name!r} has tasks "
        f"{[t.to_dict() for t in schema.tasks]}.")
  return best


def entire_space_names(chain: Sequence[schema_lib.Task]) -> List[str]:
  """Names of the entire-space outputs, one per stage after the first.

  Args:
    chain: stages as `stage_chain` returns them.

  Returns:
    The stage names joined by "_" up to each stage: [ctr, cvr, x] ->
    ["ctr_cvr", "ctr_cvr_x"].
  """
  names, previous = [], chain[0].name
  for stage in chain[1:]:
    previous = f"{previous}_{stage.name}"
    names.append(previous)
  return names


def entire_space_schema(schema: schema_lib.Schema) -> schema_lib.Schema:
  """The schema ESMM trains and is evaluated with (see the module docstring).

  Args:
    schema: the data's schema, with a mask-linked chain of tasks.

  Returns:
    A schema with the same features and labels whose tasks are the original
    ones (every chain stage after the first with loss weight 0) followed by
    one entire-space task per such stage (its label and type, its loss weight,
    no mask). `schema` itself if it already has the entire-space tasks.

  Raises:
    pipelines.schema.SchemaError: no two tasks are linked by a mask.
  """
  chain = stage_chain(schema)
  if any(n in schema.task_names for n in entire_space_names(chain)):
    return schema  # already in entire-space form
  tasks = []
  for task in schema.tasks:
    tasks.append(dataclasses.replace(task, loss_weight=0.0) if task in chain[1:] else task)
  for stage, name in zip(chain[1:], entire_space_names(chain)):
    tasks.append(schema_lib.Task(name, stage.label, stage.type, stage.loss_weight))
  return schema.replace(tasks=tasks)


def build_esmm(schema: schema_lib.Schema,
               bottom_units: Sequence[int] = (128,),
               tower_units: Sequence[int] = (8,),
               dropout: float = 0.0,
               activation: str = "relu",
               embeddings_l2: float = common.EMBEDDINGS_L2,
               cross_layers: int = 0,
               name: str = "esmm") -> keras.Model:
  """ESMM over shared embeddings: one network per task (bottom MLP `<task>_bottom`,
  tower, head), plus one `ProbabilityProduct` output per entire-space stage.

  Outputs every task of `entire_space_schema(schema)`: conditional per-stage
  probabilities under the stage names and the products (e.g. `ctr_cvr`). Tasks
  outside the chain get their own network too. Its own hyper-parameter is
  `bottom_units`; the others are the ones every builder takes.

  Args:
    schema: the data's schema (or its `entire_space_schema`); its tasks must
      chain by masks.
    bottom_units: widths of each task's own bottom MLP.
    tower_units: widths of each task's tower MLP (`<task>_tower`) before its
      output head; empty for none.
    dropout: dropout rate after every layer of the bottoms and the towers
      (training only).
    activation: Keras activation of every layer of the bottoms and the towers.
    embeddings_l2: L2 penalty on the embedding tables.
    cross_layers: DCN-v2 cross layers (TFRS `Cross`) after the embeddings; 0
      for none.
    name: the Keras model's name.

  Returns:
    An uncompiled functional `keras.Model`. Inputs: dict feature name ->
    `keras.Input`, one per schema feature (`layers.schema_inputs`). Outputs:
    dict task name -> [batch, 1] for every task of `entire_space_schema(schema)`:
    each own task's head (a probability for binary tasks), and each
    entire-space product of the chain's probabilities up to its stage.

  Raises:
    pipelines.schema.SchemaError: no two tasks are linked by a mask.
  """
  schema = entire_space_schema(schema)
  chain = stage_chain(schema)
  products = entire_space_names(chain)
  inputs, x = common.embedded_inputs(schema, embeddings_l2, cross_layers)
  own = schema.with_tasks([t for t in schema.task_names if t not in products])
  bottoms = {t: layers.MLP(bottom_units, activation, dropout, name=f"{t}_bottom")(x)
             for t in own.task_names}
  outputs = common.task_towers(own, bottoms, tower_units, dropout, activation)
  running = outputs[chain[0].name]
  for stage, product in zip(chain[1:], products):
    running = layers.ProbabilityProduct(name=product)([running, outputs[stage.name]])
    outputs[product] = running
  return keras.Model(inputs, outputs, name=name)
