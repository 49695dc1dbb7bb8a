"""The training-only bias tower: position (and presentation) bias as a logit.

Zhao et al., "Recommending What Video to Watch Next" (RecSys 2019, section 4.3):
a shallow tower over features that bias what is logged but are unknown when a
server scores candidates (the position an item was shown at, the device's
layout) adds its logit to the main model's logit in training and is dropped at
serving, so the main model learns the bias-free part.
"""

from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import Layer, keras
from mtl_zoo.layers.dense import MLP
from mtl_zoo.layers.inputs import FeatureEmbedding
from pipelines import schema as schema_lib

# Probabilities are clipped to [EPSILON, 1 - EPSILON] before their logit is
# taken (Keras' log-loss clips at the same value): logit(1) is infinite.
EPSILON = 1e-7


@keras.utils.register_keras_serializable(package="mtl_zoo")
class BiasTower(Layer):
  """One bias logit per task from train-only features.

  Each task has its own small network over the features that bias it: their
  embeddings (numeric ones z-scored, as `FeatureEmbedding` does), an optional
  MLP, then one linear unit. The unit starts at zero, so an untrained tower
  leaves the main model's outputs unchanged.

  Args:
    features: train-only feature dicts (`pipelines.schema.Feature.to_dict()`),
      categorical or numeric; numeric ones need `mean` and `std`.
    tasks: task name -> names of the features in `features` that bias it.
    units: hidden widths before each task's linear unit; empty for a linear
      tower over the embeddings (a free logit per position).
    activation: Keras activation of the hidden layers.
    dropout: in training, the share of examples whose bias logit is dropped
      (set to 0, not rescaled), as Zhao et al. drop 10% of the position
      feature: the main model must then explain those clicks without the
      position, which keeps it from handing relevance to the tower where the
      logger placed relevant items high. Off by default: its random draw is
      not part of a training backup, so a resumed run would differ from an
      uninterrupted one.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    inputs: dict feature name -> tensor (categorical [batch] int ids, numeric
      [batch] float raw values); extra keys are ignored.
    training: whether to drop bias logits.

  Returns:
    dict task name -> [batch, 1] float32 logit.

  Raises:
    ValueError: a task names a feature not in `features`, or has none.
  """

  def __init__(self, features: Sequence[dict], tasks: Dict[str, List[str]],
               units: Sequence[int] = (), activation: str = "relu",
               dropout: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"bias tower dropout must be in [0, 1), got {dropout}.")
    self.dropout = float(dropout)
    self.features_config = [dict(f) for f in features]
    # Tuples, not a dict: Keras would track a dict as state and not serialize it.
    self._task_features = tuple((task, tuple(names)) for task, names in tasks.items())
    self.units = [int(u) for u in units]
    self.activation = activation
    by_name = {f["name"]: f for f in self.features_config}
    for task, names in self._task_features:
      unknown = [n for n in names if n not in by_name]
      if unknown or not names:
        raise ValueError(f"bias tower task {task!r}: features {list(names)} must be a "
                         f"non-empty subset of the tower's features {sorted(by_name)}.")
    self._task_names = tuple(task for task, _ in self._task_features)
    self._embeddings = [FeatureEmbedding([by_name[n] for n in names],
                                         name=f"{task}_bias_embedding")
                        for task, names in self._task_features]
    self._hidden = [MLP(self.units, activation, name=f"{task}_bias_hidden")
                    if self.units else None for task in self._task_names]
    self._logits = [keras.layers.Dense(1, kernel_initializer="zeros", name=f"{task}_bias")
                    for task in self._task_names]

  def call(self, inputs: Dict[str, tf.Tensor], training=None) -> Dict[str, tf.Tensor]:
    out = {}
    for task, embed, hidden, logit in zip(self._task_names, self._embeddings,
                                          self._hidden, self._logits):
      x = embed(inputs)
      bias = logit(hidden(x) if hidden is not None else x)
      if training and self.dropout:
        kept = tf.random.uniform(tf.shape(bias)[:1]) >= self.dropout
        bias = bias * tf.cast(kept, bias.dtype)[:, None]
      out[task] = bias
    return out

  @property
  def tasks(self) -> Dict[str, List[str]]:
    """Task name -> the names of the features that bias it."""
    return {task: list(names) for task, names in self._task_features}

  def get_config(self):
    return {**super().get_config(), "features": self.features_config, "tasks": self.tasks,
            "units": self.units, "activation": self.activation, "dropout": self.dropout}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class BiasedOutput(Layer):
  """A task output with a bias logit added.

  Binary tasks: sigmoid(logit(clip(p)) + bias), p clipped to
  [EPSILON, 1 - EPSILON] (where the main head saturates beyond |logit| ~ 16,
  the clip stops that example's gradient to it). Ranking tasks (a linear
  score): score + bias.

  Args:
    task_type: "binary" or "ranking".
    **kwargs: `keras.layers.Layer` arguments (`name`: the task's name).

  Call args:
    inputs: [output, bias]: the main model's output [batch, 1] and the bias
      tower's logit [batch, 1].

  Returns:
    [batch, 1]: the biased probability (binary) or score (ranking).

  Raises:
    ValueError: another task type.
  """

  def __init__(self, task_type: str = schema_lib.BINARY, **kwargs):
    super().__init__(**kwargs)
    if task_type not in (schema_lib.BINARY, schema_lib.RANKING):
      raise ValueError(f"a bias logit applies to binary and ranking tasks, not {task_type!r}.")
    self.task_type = task_type

  def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
    output, bias = inputs
    if self.task_type == schema_lib.RANKING:
      return output + bias
    p = tf.clip_by_value(output, EPSILON, 1.0 - EPSILON)
    return tf.sigmoid(tf.math.log(p) - tf.math.log1p(-p) + bias)

  def get_config(self):
    return {**super().get_config(), "task_type": self.task_type}


def train_only_inputs(schema: schema_lib.Schema) -> Dict[str, keras.Input]:
  """One Keras input per train-only feature, as the training parse produces it.

  Args:
    schema: the dataset schema.

  Returns:
    dict feature name -> `keras.Input`: categorical [batch] int64, numeric
    [batch] float32.
  """
  return {f.name: keras.Input(shape=(), dtype=tf.int64 if f.is_categorical else tf.float32,
                              name=f.name)
          for f in schema.train_only_features}


def bias_tower(schema: schema_lib.Schema, tasks: Optional[Sequence[str]] = None,
               units: Sequence[int] = (), name: str = "bias_tower") -> Optional[BiasTower]:
  """The BiasTower for `schema`'s train-only features and the tasks they bias
  (`Schema.biased_tasks`).

  Args:
    schema: the dataset (or training) schema.
    tasks: only these of the biased tasks (default: all of them).
    units: hidden widths of each task's tower.
    name: the layer's name.

  Returns:
    An unbuilt `BiasTower`, or None when no train-only feature biases a task.

  Raises:
    pipelines.schema.SchemaError: a train-only numeric feature has no mean/std.
  """
  schema.require_statistics()
  biased: Dict[str, List[str]] = {}
  for f in schema.train_only_features:
    for t in schema.biased_tasks(f):
      if tasks is None or t.name in tasks:
        biased.setdefault(t.name, []).append(f.name)
  if not biased:
    return None
  return BiasTower([f.to_dict() for f in schema.train_only_features], biased, units,
                   name=name)
