"""Uncertainty weighting (Kendall et al., CVPR 2018)."""

import tensorflow as tf

from mtl_zoo.balancers.base import LossBalancer


class UncertaintyWeighting(LossBalancer):
  """sum_t exp(-s_t) L_t + s_t with learned log-variances s_t: noisier tasks get
  less weight. The s_t train with the model (the `penalty` keeps them from
  growing without bound)."""

  def __init__(self, base_weights, **options):
    super().__init__(base_weights, **options)
    self.log_variances = self.add_weight(name="log_variances", shape=[self.num_tasks],
                                         initializer="zeros", trainable=True)

  def task_weights(self) -> tf.Tensor:
    return tf.exp(-self.log_variances)

  def penalty(self) -> tf.Tensor:
    return tf.reduce_sum(self.log_variances)
