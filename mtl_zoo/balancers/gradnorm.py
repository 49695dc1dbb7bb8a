"""GradNorm (Chen et al., ICML 2018)."""

import tensorflow as tf

from mtl_zoo.balancers.base import AdaptiveWeights


class GradNorm(AdaptiveWeights):
  """Learned weights w_t moved each step so that each task's gradient norm on
  the balanced shared dense parameters (`balancers.shared`: by default the last
  shared layer, as in the paper) tracks its relative training rate (L_t / L_t(0) over
  the mean of those ratios, to the power alpha); renormalised to sum to T. The
  weight step is the gradient of GradNorm's L_grad divided by the mean gradient
  norm, so it does not depend on the losses' scale. Memory per step: tasks x
  balanced parameters floats."""

  OPTIONS = {
      "gradnorm_alpha": (1.5, "GradNorm's asymmetry: how strongly a task that trains "
                              "slower than the others is boosted."),
      "gradnorm_learning_rate": (0.025, "Step size of GradNorm's task-weight update."),
  }
  persistent_tape = True
  uses_task_gradients = True

  def __init__(self, base_weights, **options):
    super().__init__(base_weights, **options)
    self._initial_losses = tf.Variable(tf.zeros([self.num_tasks]), trainable=False,
                                       name="initial_losses")
    self._has_initial = tf.Variable(False, trainable=False, name="has_initial_losses")

  def after_step(self, tape, task_losses, variables) -> None:
    balanced = [variables[i] for i in self.balanced]
    norms = tf.stack([tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads
                                        if g is not None] or [tf.constant(0.0)]))
                      for grads in (tape.gradient(loss, balanced) for loss in task_losses)])
    losses = tf.stack(task_losses)
    self._initial_losses.assign(tf.where(self._has_initial, self._initial_losses, losses))
    self._has_initial.assign(True)
    weighted_norms = self._weights * norms
    ratios = losses / tf.maximum(self._initial_losses, 1e-12)
    relative = ratios / tf.reduce_mean(ratios)
    target = tf.stop_gradient(tf.reduce_mean(weighted_norms) * relative ** self.gradnorm_alpha)
    # d/dw_t sum_k |w_k G_k - target_k| with G_k and the targets held constant,
    # divided by the mean norm so the step does not depend on the losses' scale.
    grad = tf.sign(weighted_norms - target) * norms / (tf.reduce_mean(norms) + 1e-12)
    updated = tf.maximum(self._weights - self.gradnorm_learning_rate * grad, 1e-3)
    n = tf.cast(self.num_tasks, tf.float32)
    self._weights.assign(updated * n / tf.reduce_sum(updated))
