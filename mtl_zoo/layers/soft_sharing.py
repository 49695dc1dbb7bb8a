"""Soft parameter sharing between per-task networks."""

from typing import List, Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import keras


@keras.utils.register_keras_serializable(package="mtl_zoo")
class CrossStitch(keras.layers.Layer):
  """A cross-stitch unit (Misra et al., CVPR 2016).

  Input: a list of `num_tasks` tensors of one shape [batch, units], one per task
  network. Output: the same list, each a learned linear combination
  out_i = sum_j alpha[i, j] * in_j. Alpha starts near the identity
  (`self_weight` on the diagonal, the rest spread evenly), so each network first
  mostly keeps its own activations and learns how much to borrow.
  """

  def __init__(self, self_weight: float = 0.9, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= self_weight <= 1.0:
      raise ValueError(f"self_weight must be in [0, 1], got {self_weight}.")
    self.self_weight = self_weight

  def build(self, input_shape):
    n = len(input_shape)
    if n < 2:
      raise ValueError("CrossStitch needs the outputs of at least two task networks.")
    other = (1.0 - self.self_weight) / (n - 1)
    init = other * tf.ones([n, n]) + (self.self_weight - other) * tf.eye(n)
    self.alpha = self.add_weight("alpha", shape=[n, n],
                                 initializer=keras.initializers.Constant(init.numpy()))
    super().build(input_shape)

  def call(self, inputs) -> List[tf.Tensor]:
    stacked = tf.stack(inputs, axis=1)  # [batch, tasks, units]
    mixed = tf.einsum("ij,bju->biu", self.alpha, stacked)
    return tf.unstack(mixed, num=len(inputs), axis=1)

  def get_config(self):
    return {**super().get_config(), "self_weight": self.self_weight}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class L2ConstrainedNetworks(keras.layers.Layer):
  """`num_tasks` MLPs of one shape over the same input, pulled together by an L2
  penalty on the distance between their parameters (Duong et al., ACL 2015).

  The penalty, `distance_weight * sum over layers and task pairs of
  ||W_a - W_b||^2` (kernels and biases), is added to the model's losses.
  Input: [batch, features]. Output: a list of `num_tasks` tensors [batch, units[-1]].
  """

  def __init__(self, num_tasks: int, units: Sequence[int], distance_weight: float = 1e-3,
               activation: str = "relu", **kwargs):
    super().__init__(**kwargs)
    if num_tasks < 2 or not units:
      raise ValueError("L2ConstrainedNetworks needs num_tasks >= 2 and at least one layer.")
    self.num_tasks = int(num_tasks)
    self.units = [int(u) for u in units]
    self.distance_weight = distance_weight
    self.activation = activation
    self._activation = keras.activations.get(activation)

  def build(self, input_shape):
    fan_in = int(input_shape[-1])
    self.kernels, self.biases = [], []
    for i, u in enumerate(self.units):
      self.kernels.append(self.add_weight(
          f"kernel_{i}", shape=[self.num_tasks, fan_in, u],
          initializer=keras.initializers.GlorotUniform()))
      self.biases.append(self.add_weight(f"bias_{i}", shape=[self.num_tasks, u],
                                         initializer="zeros"))
      fan_in = u
    super().build(input_shape)

  def parameter_distance(self) -> tf.Tensor:
    """Sum over layers and task pairs of squared parameter distances."""
    total = 0.0
    for weight in [*self.kernels, *self.biases]:
      flat = tf.reshape(weight, [self.num_tasks, -1])
      # sum_{a<b} ||w_a - w_b||^2 = T * sum_a ||w_a||^2 - ||sum_a w_a||^2
      total += (self.num_tasks * tf.reduce_sum(tf.square(flat))
                - tf.reduce_sum(tf.square(tf.reduce_sum(flat, axis=0))))
    return total

  def call(self, x: tf.Tensor, training: Optional[bool] = None) -> List[tf.Tensor]:
    if self.distance_weight:
      self.add_loss(self.distance_weight * self.parameter_distance())
    h = self._activation(tf.einsum("bi,tio->bto", x, self.kernels[0]) + self.biases[0])
    for kernel, bias in zip(self.kernels[1:], self.biases[1:]):
      h = self._activation(tf.einsum("bti,tio->bto", h, kernel) + bias)
    return tf.unstack(h, num=self.num_tasks, axis=1)

  def get_config(self):
    return {**super().get_config(), "num_tasks": self.num_tasks, "units": self.units,
            "distance_weight": self.distance_weight, "activation": self.activation}
