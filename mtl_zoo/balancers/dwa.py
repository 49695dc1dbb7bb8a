"""Dynamic Weight Average (Liu et al., CVPR 2019)."""

import tensorflow as tf

from mtl_zoo.balancers.base import AdaptiveWeights


def dwa_weights(previous: tf.Tensor, before_previous: tf.Tensor,
                temperature: float) -> tf.Tensor:
  """DWA's weights from the two previous epochs' mean task losses.

  Args:
    previous: [T] mean task losses of the last epoch.
    before_previous: [T] those of the epoch before.
    temperature: softmax temperature; larger is more even.

  Returns:
    [T] weights T * softmax_t(r_t / temperature), r_t = previous / before; they
    sum to T.
  """
  ratios = previous / tf.maximum(before_previous, 1e-12)
  num_tasks = tf.cast(tf.size(previous), tf.float32)
  return num_tasks * tf.nn.softmax(ratios / temperature)


class DynamicWeightAverage(AdaptiveWeights):
  """Weights from how fast each task's loss fell over the last two epochs (the
  slower, the more weight); the base weights, normalised to sum to T, for the
  first two epochs."""

  OPTIONS = {"dwa_temperature": (2.0, "DWA's softmax temperature: larger spreads the "
                                      "task weights more evenly.")}

  def __init__(self, base_weights, **options):
    super().__init__(base_weights, **options)
    n = self.num_tasks
    self._epoch_sums = tf.Variable(tf.zeros([n]), trainable=False, name="epoch_loss_sums")
    self._epoch_steps = tf.Variable(0.0, trainable=False, name="epoch_steps")
    self._history = tf.Variable(tf.zeros([2, n]), trainable=False, name="loss_history")
    self._epochs_seen = tf.Variable(0, trainable=False, name="epochs_seen")

  def after_step(self, tape, task_losses, variables) -> None:
    self._epoch_sums.assign_add(tf.stack(task_losses))
    self._epoch_steps.assign_add(1.0)

  def end_epoch(self) -> None:
    if self._epoch_steps.numpy() == 0:
      return
    means = self._epoch_sums / self._epoch_steps
    self._history.assign(tf.stack([means, self._history[0]]))
    self._epochs_seen.assign_add(1)
    self._epoch_sums.assign(tf.zeros_like(self._epoch_sums))
    self._epoch_steps.assign(0.0)
    if self._epochs_seen.numpy() >= 2:
      self._weights.assign(dwa_weights(self._history[0], self._history[1],
                                       self.dwa_temperature))
