"""Which parameters the gradient-based balancers (GradNorm, PCGrad) act on.

They take one gradient per task on the parameters several tasks share: PCGrad
projects those gradients off each other, GradNorm compares their norms. That
costs memory: per step, T tasks x P balanced parameters floats (flat, dense),
PCGrad a second T x P for the projected copies. So they act on shared *dense*
parameters only, never on embedding tables (a table's gradient is a few rows;
densified per task it would be the whole table, T times, every step):

  last_shared  (default) the last shared dense layer's kernel and bias, the
               choice of the GradNorm paper: P is one layer's size.
  all_dense    every shared dense parameter (all shared layers; P is their sum).

How it is found, for any architecture: one forward pass on a small random batch
(no data is read) and one gradient per trained task. A parameter is shared when
two tasks' gradients are non-zero on one of its elements (a fused layer holding
each task's own slice, like MMoE's gates, is not), and an embedding table when
its gradient is row-sparse (`tf.IndexedSlices`, what a lookup gives). The last
shared layer is the last layer, in the model's topological order (`model.layers`,
inputs to outputs), holding a shared dense parameter; of it, the last kernel (a
variable named kernel*) and the variables made after it (its bias). So: mmoe,
the expert bank (its last layer); omoe, its one gate (Keras orders it after the
experts); shared_bottom, the bottom's last Dense; cgc and ple, the top level's
shared experts; esmm, the CTR head, which pCTCVR shares; cross_stitch, one
task's last layer (both feed every task through the last cross-stitch unit).
single_task and l2_constrained (separate task networks, only pulled together
by a penalty) share no dense parameter and are refused.
"""

import functools
import json
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mtl_zoo import models
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib

LAST_SHARED = "last_shared"
ALL_DENSE = "all_dense"
BALANCE_ON = (LAST_SHARED, ALL_DENSE)


class NothingSharedError(ValueError):
  """The model has no dense parameter that two trained tasks share."""


def probe_features(schema: schema_lib.Schema, batch: int = 16, seed: int = 0) -> dict:
  """A batch of random feature tensors of the schema's model-input signature:
  ids in each vocabulary, lists half padded, numerics around their means (numpy's
  generator: TensorFlow's random state is left alone)."""
  rng = np.random.default_rng(seed)
  out = {}
  for f in schema.features:
    if f.kind == schema_lib.NUMERIC:
      values = (f.mean or 0.0) + (f.std or 1.0) * rng.standard_normal(batch)
      out[f.name] = tf.constant(values, tf.float32)
      continue
    ids = rng.integers(0, f.vocab_size, [batch] + ([f.max_len] if f.max_len else []))
    if f.kind == schema_lib.CATEGORICAL_LIST:
      ids[:, f.max_len // 2:] = schema_lib.LIST_PADDING_ID
    out[f.name] = tf.constant(ids, tf.int64)
  return out


def task_sharing(model: keras.Model, schema: schema_lib.Schema, tasks: Sequence[str]
                 ) -> Tuple[List[bool], List[bool]]:
  """Which trainable variables of `model` two or more of `tasks` share, and
  which are embedding tables.

  A variable is shared when on some element two tasks' gradients (on a random
  batch, `probe_features`) are both non-zero: a fused layer holding each task's
  own slice (MMoE's gates, l2_constrained's task networks) is not shared.

  Args:
    model: a functional model with one output per task.
    schema: its schema (for the input signature).
    tasks: the trained tasks' names.

  Returns:
    (shared, embedding): per variable of `model.trainable_variables`, whether
    it is shared, and whether it is read by lookup (row-sparse gradient).
  """
  variables = model.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    outputs = model(probe_features(schema), training=False)
    sums = [tf.reduce_sum(outputs[t]) for t in tasks]
  grads = [tape.gradient(s, variables) for s in sums]
  del tape
  shared, embedding = [], []
  for i in range(len(variables)):
    reached = [g[i] for g in grads if g[i] is not None]
    if any(isinstance(g, tf.IndexedSlices) for g in reached):
      embedding.append(True)
      shared.append(len(reached) >= 2)
      continue
    embedding.append(False)
    touched = [tf.cast(tf.not_equal(g, 0.0), tf.int32) for g in reached]
    shared.append(len(touched) >= 2 and bool(tf.reduce_any(tf.add_n(touched) >= 2)))
  return shared, embedding


def balanced_indices(model: keras.Model, schema: schema_lib.Schema, tasks: Sequence[str],
                     balance_on: str = LAST_SHARED) -> Tuple[int, ...]:
  """The parameters a gradient-based balancer acts on (see the module docstring).

  Args:
    model: a functional model with one output per task.
    schema: its schema.
    tasks: the trained tasks' names (two or more).
    balance_on: LAST_SHARED or ALL_DENSE.

  Returns:
    Indices into `model.trainable_variables`, in order.

  Raises:
    NothingSharedError: no dense parameter is shared by two trained tasks.
    ValueError: unknown `balance_on`.
  """
  if balance_on not in BALANCE_ON:
    raise ValueError(f"balance_on must be one of {list(BALANCE_ON)}, got {balance_on!r}.")
  sharing, embedding = task_sharing(model, schema, tasks)
  shared = [i for i, (s, e) in enumerate(zip(sharing, embedding)) if s and not e]
  if not shared:
    what = ("only embedding tables" if any(sharing) else "no parameters")
    raise NothingSharedError(f"model {model.name!r} shares {what} between the tasks "
                             f"{list(tasks)}, so there are no shared dense parameters to "
                             "balance gradients on")
  if balance_on == ALL_DENSE:
    return tuple(shared)
  index = {id(v): i for i, v in enumerate(model.trainable_variables)}
  chosen = set(shared)
  for layer in reversed(model.layers):
    own = [index[id(v)] for v in layer.trainable_variables if index.get(id(v)) in chosen]
    if own:
      own = sorted(set(own), key=own.index)
      kernels = [k for k, i in enumerate(own)
                 if _short_name(model.trainable_variables[i]).startswith("kernel")]
      return tuple(own[kernels[-1]:] if kernels else own)
  return tuple(shared)  # a shared variable outside model.layers: balance on them all


def _short_name(variable: tf.Variable) -> str:
  return variable.name.split("/")[-1].split(":")[0]


def sharing_architectures(schema: schema_lib.Schema) -> List[str]:
  """The MODELS architectures (default hyper-parameters) whose trained tasks
  share dense parameters on `schema` (each on its own training schema).

  Args:
    schema: the data's schema.

  Returns:
    Their names, sorted.
  """
  return list(_sharing_architectures(json.dumps(schema.to_dict(), sort_keys=True)))


@functools.lru_cache(maxsize=8)  # builds every architecture: once per schema
def _sharing_architectures(schema_json: str) -> Tuple[str, ...]:
  schema = schema_lib.Schema.from_dict(json.loads(schema_json))
  names = []
  for name in sorted(models.MODELS):
    try:
      train_schema = models.training_schema(name, schema)
      balanced_indices(models.build(name, train_schema), train_schema,
                       [t.name for t in train_schema.tasks if t.loss_weight > 0])
    except (ValueError, schema_lib.SchemaError):
      continue
    names.append(name)
  return tuple(names)
