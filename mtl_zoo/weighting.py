"""Loss balancing between tasks, usable with every architecture.

  trainable = compile_model(model, schema, weighting="pcgrad")   # mtl_zoo.models
  trainable.fit(dataset)          # `model` itself is what you export

Methods:
  fixed        sum_t w_t L_t with the schema's loss weights (plain Keras compile).
  uncertainty  sum_t exp(-s_t) L_t + s_t with learned log-variances s_t
               (Kendall et al., CVPR 2018): noisier tasks get less weight.
  dwa          Dynamic Weight Average (Liu et al., CVPR 2019): w_t = T softmax_t(r_t / temp),
               r_t = L_t(epoch-1) / L_t(epoch-2), from per-epoch mean losses.
  gradnorm     GradNorm (Chen et al., ICML 2018): learned w_t moved so that each task's
               gradient norm on the shared parameters tracks its relative training rate;
               weights renormalised to sum to T. The weight step is the L_grad gradient
               divided by the mean gradient norm, so it does not depend on loss scale.
  pcgrad       PCGrad (Yu et al., NeurIPS 2020): per-task gradients on shared parameters;
               a component conflicting with another task's gradient is projected away.

Gradient-level methods need a custom train step: `MultiTaskTrainer` wraps the
functional model (sharing its variables) and still works with `fit`,
checkpoints, masks (task sample weights) and export (the wrapped model carries
no training-only state). Per-task weights are returned as `weight_<task>` logs,
so Keras' TensorBoard callback records them.
"""

from typing import Dict, List, Sequence

import tensorflow as tf

from mtl_zoo._keras import keras
from mtl_zoo.models import common
from pipelines import schema as schema_lib

METHODS = ("fixed", "uncertainty", "dwa", "gradnorm", "pcgrad")


def project_conflicting(task_gradients: Sequence[tf.Tensor], order: tf.Tensor) -> tf.Tensor:
  """PCGrad's projection: sum of task gradients, each with the components that
  conflict (negative dot product) with the other tasks' gradients removed.

  Args:
    task_gradients: T flat gradients of one shape.
    order: [T, T] int32; row k is the order in which task k visits the others.
  """
  g = tf.stack(task_gradients)
  projected = []
  for k in range(len(task_gradients)):
    gk = g[k]
    for step in range(len(task_gradients)):
      gj = tf.gather(g, order[k, step])
      dot = tf.reduce_sum(gk * gj)
      conflict = tf.logical_and(dot < 0.0, tf.not_equal(order[k, step], k))
      gk = tf.where(conflict, gk - dot / (tf.reduce_sum(gj * gj) + 1e-12) * gj, gk)
    projected.append(gk)
  return tf.add_n(projected)


def dwa_weights(previous: tf.Tensor, before_previous: tf.Tensor,
                temperature: float) -> tf.Tensor:
  """DWA weights from the two previous epochs' mean task losses (sum to T)."""
  ratios = previous / tf.maximum(before_previous, 1e-12)
  num_tasks = tf.cast(tf.size(previous), tf.float32)
  return num_tasks * tf.nn.softmax(ratios / temperature)


class MultiTaskTrainer(keras.Model):
  """Trains a multi-task functional model with a loss-balancing method."""

  def __init__(self, model: keras.Model, schema: schema_lib.Schema, method: str,
               dwa_temperature: float = 2.0, gradnorm_alpha: float = 1.5,
               gradnorm_learning_rate: float = 0.025, **kwargs):
    super().__init__(name=f"{model.name}_{method}", **kwargs)
    if method not in METHODS or method == "fixed":
      raise ValueError(f"MultiTaskTrainer takes one of {METHODS[1:]}, got {method!r}; "
                       "'fixed' needs no trainer.")
    self.model = model
    self.method = method
    self.tasks = [t for t in schema.tasks if t.loss_weight > 0]
    self._loss_fns = common.task_losses(schema)
    n = len(self.tasks)
    if n < 2:
      raise ValueError(f"loss weighting needs at least two tasks with loss_weight > 0; "
                       f"schema {schema.name!r} has {[t.name for t in self.tasks]}.")
    self.dwa_temperature = dwa_temperature
    self.gradnorm_alpha = gradnorm_alpha
    self.gradnorm_learning_rate = gradnorm_learning_rate
    base = tf.constant([t.loss_weight for t in self.tasks], tf.float32)
    if method == "uncertainty":
      self.log_variances = self.add_weight("log_variances", shape=[n], initializer="zeros")
    if method in ("dwa", "gradnorm"):
      self.task_weights = tf.Variable(base * n / tf.reduce_sum(base), trainable=False,
                                      name="task_weights")
    if method == "dwa":
      self._epoch_sums = tf.Variable(tf.zeros([n]), trainable=False, name="epoch_loss_sums")
      self._epoch_steps = tf.Variable(0.0, trainable=False, name="epoch_steps")
      self._history = tf.Variable(tf.zeros([2, n]), trainable=False, name="loss_history")
      self._epochs_seen = tf.Variable(0, trainable=False, name="epochs_seen")
    if method == "gradnorm":
      self._initial_losses = tf.Variable(tf.zeros([n]), trainable=False,
                                         name="initial_losses")
      self._has_initial = tf.Variable(False, trainable=False, name="has_initial_losses")
    self._base_weights = base
    self._trackers = {name: keras.metrics.Mean(name) for name in
                      ["loss"] + [f"{t.name}_loss" for t in self.tasks]}

  def call(self, inputs, training=None):
    return self.model(inputs, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  # ------------------------------------------------------------------ losses
  def _task_losses(self, labels, outputs, weights) -> List[tf.Tensor]:
    return [self._loss_fns[t.name](labels[t.name], outputs[t.name],
                                   sample_weight=weights[t.name]) for t in self.tasks]

  def current_weights(self) -> tf.Tensor:
    if self.method == "uncertainty":
      return tf.exp(-self.log_variances)
    if self.method in ("dwa", "gradnorm"):
      return tf.identity(self.task_weights)
    return self._base_weights

  def _regularization(self):
    return tf.add_n(self.model.losses) if self.model.losses else tf.constant(0.0)

  # -------------------------------------------------------------- train step
  def train_step(self, data):
    features, labels, weights = data
    variables = self.model.trainable_variables
    if self.method == "uncertainty":
      variables = variables + [self.log_variances]
    with tf.GradientTape(persistent=self.method in ("gradnorm", "pcgrad")) as tape:
      outputs = self.model(features, training=True)
      task_losses = self._task_losses(labels, outputs, weights)
      task_weights = self.current_weights()
      weighted = [task_weights[i] * loss for i, loss in enumerate(task_losses)]
      regularization = self._regularization()
      total = tf.add_n(weighted) + regularization
      if self.method == "uncertainty":
        total += tf.reduce_sum(self.log_variances)
    if self.method == "pcgrad":
      grads = self._pcgrad(tape, weighted, regularization, variables)
    else:
      grads = tape.gradient(total, variables)
    if self.method == "gradnorm":
      self._gradnorm_update(tape, task_losses, variables)
    del tape
    self.optimizer.apply_gradients(
        (g, v) for g, v in zip(grads, variables) if g is not None)
    losses = tf.stack(task_losses)
    if self.method == "dwa":
      self._epoch_sums.assign_add(losses)
      self._epoch_steps.assign_add(1.0)
    return self._logs(total, losses)

  def test_step(self, data):
    features, labels, weights = data
    outputs = self.model(features, training=False)
    losses = tf.stack(self._task_losses(labels, outputs, weights))
    total = tf.reduce_sum(self.current_weights() * losses) + self._regularization()
    return self._logs(total, losses)

  def _logs(self, total, losses) -> Dict[str, tf.Tensor]:
    self._trackers["loss"].update_state(total)
    for i, task in enumerate(self.tasks):
      self._trackers[f"{task.name}_loss"].update_state(losses[i])
    logs = {name: tracker.result() for name, tracker in self._trackers.items()}
    task_weights = self.current_weights()
    for i, task in enumerate(self.tasks):
      logs[f"weight_{task.name}"] = task_weights[i]
    return logs

  def _task_gradients(self, tape, task_losses, variables) -> List[list]:
    return [tape.gradient(loss, variables) for loss in task_losses]

  def _shared(self, per_task: List[list]) -> List[bool]:
    """Variables reached by two or more tasks' losses (decided when tracing)."""
    return [sum(g[i] is not None for g in per_task) >= 2 for i in range(len(per_task[0]))]

  def _pcgrad(self, tape, weighted_losses, regularization, variables):
    per_task = self._task_gradients(tape, weighted_losses, variables)
    shared = self._shared(per_task)
    dense = [[tf.convert_to_tensor(g[i]) if g[i] is not None else tf.zeros_like(v)
              for i, v in enumerate(variables)] for g in per_task]
    flat = [tf.concat([tf.reshape(d, [-1]) for d, s in zip(grads, shared) if s], 0)
            for grads in dense]
    n = len(self.tasks)
    # A fresh random visiting order per task and step (seeded by the global seed).
    order = tf.stack([tf.random.shuffle(tf.range(n)) for _ in range(n)])
    combined = project_conflicting(flat, order) if any(shared) else None
    out, offset = [], 0
    reg_grads = tape.gradient(regularization, variables) if self.model.losses else \
        [None] * len(variables)
    for i, v in enumerate(variables):
      if shared[i]:
        size = v.shape.num_elements()
        g = tf.reshape(combined[offset:offset + size], v.shape)
        offset += size
      else:
        parts = [d[i] for d in dense]
        g = tf.add_n(parts)
      if reg_grads[i] is not None:
        g = g + tf.convert_to_tensor(reg_grads[i])
      out.append(g)
    return out

  def _gradnorm_update(self, tape, losses, variables):
    per_task = self._task_gradients(tape, losses, variables)
    shared = self._shared(per_task)
    norms = tf.stack([tf.sqrt(tf.add_n([
        tf.reduce_sum(tf.square(tf.convert_to_tensor(g[i])))
        for i in range(len(variables)) if shared[i]])) for g in per_task])
    self._initial_losses.assign(tf.where(self._has_initial, self._initial_losses, losses))
    self._has_initial.assign(True)
    weighted_norms = self.task_weights * norms
    ratios = losses / tf.maximum(self._initial_losses, 1e-12)
    relative = ratios / tf.reduce_mean(ratios)
    target = tf.stop_gradient(tf.reduce_mean(weighted_norms) * relative ** self.gradnorm_alpha)
    # d/dw_t sum_k |w_k G_k - target_k| with G_k and the targets held constant,
    # divided by the mean norm so the step does not depend on the losses' scale.
    grad = tf.sign(weighted_norms - target) * norms / (tf.reduce_mean(norms) + 1e-12)
    updated = tf.maximum(self.task_weights - self.gradnorm_learning_rate * grad, 1e-3)
    n = tf.cast(len(self.tasks), tf.float32)
    self.task_weights.assign(updated * n / tf.reduce_sum(updated))

  # ---------------------------------------------------------- epoch bounds
  def end_epoch(self) -> None:
    """DWA: fold this epoch's mean losses into the history and set new weights."""
    if self.method != "dwa" or self._epoch_steps.numpy() == 0:
      return
    means = self._epoch_sums / self._epoch_steps
    self._history.assign(tf.stack([means, self._history[0]]))
    self._epochs_seen.assign_add(1)
    self._epoch_sums.assign(tf.zeros_like(self._epoch_sums))
    self._epoch_steps.assign(0.0)
    if self._epochs_seen.numpy() >= 2:
      self.task_weights.assign(dwa_weights(self._history[0], self._history[1],
                                           self.dwa_temperature))

  def fit(self, *args, callbacks=None, **kwargs):
    callbacks = list(callbacks or []) + [_EndEpoch(self)]
    return super().fit(*args, callbacks=callbacks, **kwargs)


class _EndEpoch(keras.callbacks.Callback):
  def __init__(self, trainer: MultiTaskTrainer):
    super().__init__()
    self._trainer = trainer

  def on_epoch_end(self, epoch, logs=None):
    self._trainer.end_epoch()
