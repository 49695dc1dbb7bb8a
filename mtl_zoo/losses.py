"""Task losses: one Keras loss per schema task, and the list losses of
learning to rank.

`task_loss` picks log-loss for binary tasks, MSE for regression and the task's
list loss for ranking tasks. The list losses (pairwise, listwise) work over
padded lists of examples, one list per request: graded relevance comes from the
schema's ranking task, and `pipelines.reader.make_dataset` batches whole
requests for it. Lists are dense [batch, list_size] tensors; `mask` is 1 for
real examples and 0 for padding, and padding never contributes to a loss.

Masks arrive as per-task sample weights from the reader, so a masked example
adds nothing to its task's loss. `masked_loss` says what a masked task's loss
is averaged over (non-ranking tasks with a schema mask; the others are plain
batch means, and the list losses already average over real examples):
  batch   sum of the kept examples' losses / batch size (Keras' own reduction).
          The task's effective weight is then its kept share of the batch
          (for CVR masked to clicks: the batch's click rate, moving from batch
          to batch).
  masked  sum of the kept examples' losses / number kept: the mean over the
          examples the mask keeps (0 for a batch that keeps none), so the
          schema's loss weight is the task's weight.
"""

from typing import Dict, Optional

import tensorflow as tf

from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


def _mask_or_ones(labels: tf.Tensor, mask: Optional[tf.Tensor]) -> tf.Tensor:
  return tf.ones_like(labels) if mask is None else tf.cast(mask, labels.dtype)


def pairwise_logistic_loss(labels: tf.Tensor, scores: tf.Tensor,
                           mask: Optional[tf.Tensor] = None) -> tf.Tensor:
  """RankNet: mean over pairs (i, j) of one list with label_i > label_j of
  log(1 + exp(-(score_i - score_j))). 0 when no list has such a pair."""
  labels, scores = tf.cast(labels, tf.float32), tf.cast(scores, tf.float32)
  mask = _mask_or_ones(labels, mask)
  valid = mask[:, :, None] * mask[:, None, :]
  pairs = tf.cast(labels[:, :, None] > labels[:, None, :], tf.float32) * valid
  margins = scores[:, :, None] - scores[:, None, :]
  losses = tf.math.softplus(-margins) * pairs
  return tf.math.divide_no_nan(tf.reduce_sum(losses), tf.reduce_sum(pairs))


def listwise_softmax_loss(labels: tf.Tensor, scores: tf.Tensor,
                          mask: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Softmax cross-entropy between each list's relevance distribution
  (labels / sum) and the softmax of its scores over real examples; mean over
  lists with any relevance (lists without are skipped)."""
  labels, scores = tf.cast(labels, tf.float32), tf.cast(scores, tf.float32)
  mask = _mask_or_ones(labels, mask)
  labels = labels * mask
  totals = tf.reduce_sum(labels, axis=1, keepdims=True)
  targets = tf.math.divide_no_nan(labels, totals)
  masked_scores = tf.where(mask > 0, scores, tf.float32.min)
  log_probs = tf.nn.log_softmax(masked_scores, axis=1)
  per_list = -tf.reduce_sum(tf.where(mask > 0, targets * log_probs, 0.0), axis=1)
  has_relevance = tf.cast(totals[:, 0] > 0, tf.float32)
  return tf.math.divide_no_nan(tf.reduce_sum(per_list * has_relevance),
                               tf.reduce_sum(has_relevance))


class _ListLoss(keras.losses.Loss):
  """A list loss as a Keras loss. The sample weight is the list mask. With
  `list_size`, inputs are flat [lists * list_size] or [lists * list_size, 1]
  (how `pipelines.reader.make_dataset` batches ranking tasks) and are cut into
  lists; without it they already are [lists, list_size]."""

  list_loss = None

  def __init__(self, list_size: Optional[int] = None, **kwargs):
    super().__init__(**kwargs)
    self.list_size = list_size

  def __call__(self, y_true, y_pred, sample_weight=None):
    if self.list_size:
      y_true, y_pred = self._lists(y_true), self._lists(y_pred)
      sample_weight = None if sample_weight is None else self._lists(sample_weight)
    return type(self).list_loss(y_true, y_pred, sample_weight)

  def _lists(self, values):
    return tf.reshape(values, [-1, self.list_size])

  def get_config(self):
    return {**super().get_config(), "list_size": self.list_size}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class PairwiseLogisticLoss(_ListLoss):
  """`pairwise_logistic_loss` as a Keras loss (see `_ListLoss`)."""

  list_loss = staticmethod(pairwise_logistic_loss)


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ListwiseSoftmaxLoss(_ListLoss):
  """`listwise_softmax_loss` as a Keras loss (see `_ListLoss`)."""

  list_loss = staticmethod(listwise_softmax_loss)


RANKING_LOSSES = {"pairwise": PairwiseLogisticLoss, "listwise": ListwiseSoftmaxLoss}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class MaskedMeanLoss(keras.losses.Loss):
  """A per-example Keras loss averaged over the examples its sample weights
  (the task's mask) keep: sum(w * loss) / sum(w); 0 when the batch keeps none.
  Without sample weights, the plain mean.

  Args:
    loss: the per-example loss, a `keras.losses.Loss` config (its reduction is
      replaced by none).
    **kwargs: `keras.losses.Loss` arguments (`name`).
  """

  def __init__(self, loss: dict, **kwargs):
    super().__init__(**kwargs)
    self.loss = loss
    self._per_example = keras.losses.deserialize(loss)
    self._per_example.reduction = keras.losses.Reduction.NONE

  def __call__(self, y_true, y_pred, sample_weight=None):
    values = tf.reshape(self._per_example(y_true, y_pred), [-1])
    if sample_weight is None:
      return tf.reduce_mean(values)
    weights = tf.reshape(tf.cast(sample_weight, values.dtype), [-1])
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))

  def get_config(self):
    return {**super().get_config(), "loss": self.loss}


BATCH = "batch"
MASKED = "masked"
MASKED_LOSSES = (BATCH, MASKED)
DEFAULT_MASKED_LOSS = BATCH  # measured: BUILD_NOTES "Masked task losses"


def task_loss(task: schema_lib.Task, masked_loss: str = DEFAULT_MASKED_LOSS
              ) -> keras.losses.Loss:
  """The loss a task trains with.

  Args:
    task: a schema task.
    masked_loss: BATCH or MASKED: what a masked task's loss is averaged over
      (see the module docstring); unmasked and ranking tasks ignore it.

  Returns:
    Log-loss for binary tasks, MSE for regression, the task's list loss
    (`task.ranking_loss`) for ranking tasks; named `<task>_<loss>`.

  Raises:
    ValueError: unknown `masked_loss`.
  """
  if masked_loss not in MASKED_LOSSES:
    raise ValueError(f"masked_loss must be one of {list(MASKED_LOSSES)}, got "
                     f"{masked_loss!r}.")
  if task.type == schema_lib.RANKING:
    return RANKING_LOSSES[task.ranking_loss](task.list_size,
                                             name=f"{task.name}_{task.ranking_loss}")
  if task.type == schema_lib.BINARY:
    loss = keras.losses.BinaryCrossentropy(name=f"{task.name}_logloss")
  else:
    loss = keras.losses.MeanSquaredError(name=f"{task.name}_mse")
  if task.mask and masked_loss == MASKED:
    return MaskedMeanLoss(keras.losses.serialize(loss), name=loss.name)
  return loss


def task_losses(schema: schema_lib.Schema, masked_loss: str = DEFAULT_MASKED_LOSS
                ) -> Dict[str, keras.losses.Loss]:
  """`task_loss` of every task of `schema` (with `masked_loss`), by task name."""
  return {t.name: task_loss(t, masked_loss) for t in schema.tasks}
