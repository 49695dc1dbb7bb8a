"""The loss-balancer base class and the train step every balancer shares.

A loss balancer decides how T task losses become one parameter update. It
fills in a few hooks of `LossBalancer`; `MultiTaskTrainer` runs the train step
around them, so a new method is one subclass (one module) plus one line in
`mtl_zoo.balancers.BALANCERS`.
"""

from typing import ClassVar, Dict, List, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import losses as losses_lib
from mtl_zoo.balancers import shared
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


class LossBalancer(keras.layers.Layer):
  """How per-task losses become one update; the base keeps fixed weights.

  Hooks a subclass overrides (each has a default):
    `task_weights()`: the weights w_t of the current step, shape [T].
    `penalty()`: a scalar added to sum_t w_t L_t (e.g. a regulariser on the
      balancer's own trainable variables). Default 0.
    `combine_gradients(tape, weighted_losses, rest, total, variables)`: one
      gradient per variable, where total = sum(weighted_losses) + rest (rest:
      the penalty and the model's regularisation losses). Default: the
      gradient of `total`.
    `after_step(tape, task_losses, variables)`: state updates from this step.
    `end_epoch()`: state updates at an epoch's end.

  Class attributes:
    OPTIONS: option name -> (default, help). Each is a keyword argument of the
      constructor and a flag of `python -m mtl_zoo.train`.
    needs_train_step: False where Keras' own compile/fit computes the same
      update (fixed weights), so no custom train step is paid for.
    persistent_tape: True where the hooks take several gradients from the
      train step's tape.
    uses_task_gradients: True where the hooks take per-task gradients on the
      shared dense parameters (GradNorm, PCGrad). The trainer then sets
      `balanced`: the indices, into the model's trainable variables (the
      first of `variables` in every hook), of the parameters chosen by
      `balance_on` (`balancers.shared`); it refuses a model whose tasks share
      no dense parameter.

  Args:
    base_weights: the schema's loss weight of each trained task, shape [T].
    **options: values for `OPTIONS`.
  """

  OPTIONS: ClassVar[Dict[str, Tuple[float, str]]] = {}
  needs_train_step: ClassVar[bool] = True
  persistent_tape: ClassVar[bool] = False
  uses_task_gradients: ClassVar[bool] = False

  def __init__(self, base_weights: Sequence[float], name: str = None, **options):
    super().__init__(name=name or type(self).__name__.lower())
    unknown = sorted(set(options) - set(self.OPTIONS))
    if unknown:
      raise ValueError(f"{type(self).__name__} takes the options {sorted(self.OPTIONS)}, "
                       f"not {unknown}.")
    self.base_weights = tuple(float(w) for w in base_weights)
    self.num_tasks = len(self.base_weights)
    for option, (default, _) in self.OPTIONS.items():
      setattr(self, option, float(options.get(option, default)))
    self.balanced: Tuple[int, ...] = ()
    self.built = True  # its state is made here; Keras 3 saves only built layers

  def task_weights(self) -> tf.Tensor:
    return tf.constant(self.base_weights, tf.float32)

  def penalty(self) -> tf.Tensor:
    return tf.constant(0.0)

  def combine_gradients(self, tape: tf.GradientTape, weighted_losses: List[tf.Tensor],
                        rest: tf.Tensor, total: tf.Tensor,
                        variables: Sequence[tf.Variable]) -> list:
    return tape.gradient(total, variables)

  def after_step(self, tape: tf.GradientTape, task_losses: List[tf.Tensor],
                 variables: Sequence[tf.Variable]) -> None:
    pass

  def end_epoch(self) -> None:
    pass

  def get_config(self) -> dict:
    return {"base_weights": self.base_weights, "name": self.name,
            **{option: getattr(self, option) for option in self.OPTIONS}}


class AdaptiveWeights(LossBalancer):
  """A balancer whose task weights are state it updates itself (not trained by
  the optimizer): they start at the base weights scaled to sum to T."""

  def __init__(self, base_weights: Sequence[float], **options):
    super().__init__(base_weights, **options)
    base = tf.constant(self.base_weights, tf.float32)
    self._weights = tf.Variable(base * self.num_tasks / tf.reduce_sum(base),
                                trainable=False, name="task_weights")

  def task_weights(self) -> tf.Tensor:
    return tf.identity(self._weights)


class MultiTaskTrainer(keras.Model):
  """Trains a multi-task functional model with a `LossBalancer`.

  Wraps the model and shares its variables: fit the trainer, export `model`
  (which carries no balancer state). Works with `fit`, checkpoints and masks
  (task sample weights). Logs the total loss, each task's loss and each task's
  weight (`weight_<task>`), so Keras' TensorBoard callback records them.

  Args:
    model: a functional model with one output per schema task.
    schema: the schema it trains on; tasks with loss_weight 0 are not trained.
    balancer: the balancer, built for the trained tasks' base weights.
    balance_on: which shared dense parameters a balancer that
      `uses_task_gradients` acts on: `shared.LAST_SHARED` or `shared.ALL_DENSE`.
    masked_loss: how a masked task's loss is averaged (`losses.MASKED_LOSSES`).

  Raises:
    shared.NothingSharedError: the balancer uses task gradients and the
      model's tasks share no dense parameter.
  """

  def __init__(self, model: keras.Model, schema: schema_lib.Schema,
               balancer: LossBalancer, balance_on: str = shared.LAST_SHARED,
               masked_loss: str = losses_lib.DEFAULT_MASKED_LOSS, **kwargs):
    super().__init__(name=f"{model.name}_{balancer.name}", **kwargs)
    self.model = model
    self.balancer = balancer
    self.tasks = trained_tasks(schema)
    if len(self.tasks) != balancer.num_tasks:
      raise ValueError(f"the balancer has {balancer.num_tasks} base weights for "
                       f"{len(self.tasks)} trained tasks {[t.name for t in self.tasks]}.")
    if balancer.uses_task_gradients:
      balancer.balanced = shared.balanced_indices(model, schema,
                                                  [t.name for t in self.tasks], balance_on)
    self._loss_fns = losses_lib.task_losses(schema, masked_loss)
    self._trackers = {name: keras.metrics.Mean(name) for name in
                      ["loss"] + [f"{t.name}_loss" for t in self.tasks]}
    self.built = True  # of built parts; Keras 3 saves only built models

  def call(self, inputs, training=None):
    return self.model(inputs, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  def task_losses(self, labels: Dict[str, tf.Tensor], outputs: Dict[str, tf.Tensor],
                  weights: Dict[str, tf.Tensor]) -> List[tf.Tensor]:
    """Each trained task's loss (its mask as sample weight), in task order."""
    return [self._loss_fns[t.name](labels[t.name], outputs[t.name],
                                   sample_weight=weights[t.name]) for t in self.tasks]

  def _regularization(self) -> tf.Tensor:
    return tf.add_n(self.model.losses) if self.model.losses else tf.constant(0.0)

  def train_step(self, data):
    features, labels, weights = data
    variables = self.model.trainable_variables + self.balancer.trainable_variables
    with tf.GradientTape(persistent=self.balancer.persistent_tape) as tape:
      task_losses = self.task_losses(labels, self.model(features, training=True), weights)
      task_weights = self.balancer.task_weights()
      weighted = [task_weights[i] * loss for i, loss in enumerate(task_losses)]
      rest = self.balancer.penalty() + self._regularization()
      total = tf.add_n(weighted) + rest
    grads = self.balancer.combine_gradients(tape, weighted, rest, total, variables)
    self.balancer.after_step(tape, task_losses, self.model.trainable_variables)
    del tape
    self.optimizer.apply_gradients(
        (g, v) for g, v in zip(grads, variables) if g is not None)
    return self._logs(total, tf.stack(task_losses))

  def test_step(self, data):
    features, labels, weights = data
    losses = tf.stack(self.task_losses(labels, self.model(features, training=False), weights))
    total = (tf.reduce_sum(self.balancer.task_weights() * losses) + self.balancer.penalty()
             + self._regularization())
    return self._logs(total, losses)

  def _logs(self, total: tf.Tensor, losses: tf.Tensor) -> Dict[str, tf.Tensor]:
    self._trackers["loss"].update_state(total)
    for i, task in enumerate(self.tasks):
      self._trackers[f"{task.name}_loss"].update_state(losses[i])
    logs = {name: tracker.result() for name, tracker in self._trackers.items()}
    task_weights = self.balancer.task_weights()
    for i, task in enumerate(self.tasks):
      logs[f"weight_{task.name}"] = task_weights[i]
    return logs

  def fit(self, *args, callbacks=None, **kwargs):
    callbacks = list(callbacks or []) + [_EndEpoch(self.balancer)]
    return super().fit(*args, callbacks=callbacks, **kwargs)


def trained_tasks(schema: schema_lib.Schema) -> List[schema_lib.Task]:
  """The tasks a balancer weighs: those with a positive loss weight."""
  return [t for t in schema.tasks if t.loss_weight > 0]


class _EndEpoch(keras.callbacks.Callback):
  def __init__(self, balancer: LossBalancer):
    super().__init__()
    self._balancer = balancer

  def on_epoch_end(self, epoch, logs=None):
    self._balancer.end_epoch()
