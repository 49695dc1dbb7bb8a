"""Soft parameter sharing between per-task networks."""

from typing import List, Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import Layer, keras
from mtl_zoo.layers.dense import ExpertBank


@keras.utils.register_keras_serializable(package="mtl_zoo")
class CrossStitch(Layer):
  """A cross-stitch unit (Misra et al., CVPR 2016).

  Input: a list of `num_tasks` tensors of one shape [batch, units], one per task
  network. Output: the same list, each a learned linear combination
  out_i = sum_j alpha[i, j] * in_j. Alpha starts near the identity
  (`self_weight` on the diagonal, the rest spread evenly), so each network first
  mostly keeps its own activations and learns how much to borrow. Alpha is
  [num_tasks, num_tasks], sized from the input list when the layer is built, and
  is not constrained during training.

  Args:
    self_weight: initial alpha[i, i], in [0, 1]; the off-diagonal entries start
      at (1 - self_weight) / (num_tasks - 1), so every row starts summing to 1.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    inputs: list of `num_tasks` >= 2 tensors [batch, units].

  Returns:
    List of `num_tasks` tensors [batch, units], out_i = sum_j alpha[i, j] * in_j.

  Raises:
    ValueError: `self_weight` outside [0, 1], or (when built) fewer than two
      inputs.
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
    self.alpha = self.add_weight(name="alpha", shape=[n, n],
                                 initializer=keras.initializers.Constant(init.numpy()))
    super().build(input_shape)

  def call(self, inputs) -> List[tf.Tensor]:
    stacked = tf.stack(inputs, axis=1)  # [batch, tasks, units]
    mixed = tf.einsum("ij,bju->biu", self.alpha, stacked)
    return tf.unstack(mixed, num=len(inputs), axis=1)

  def get_config(self):
    return {**super().get_config(), "self_weight": self.self_weight}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class L2ConstrainedNetworks(ExpertBank):
  """`num_tasks` MLPs of one shape over the same input, pulled together by an L2
  penalty on the distance between their parameters (Duong et al., ACL 2015).

  An `ExpertBank` with one "expert" per task, whose outputs go to the tasks one
  each instead of through gates. The penalty, `distance_weight * sum over layers
  and task pairs of ||W_a - W_b||^2` (kernels and biases), is added to the
  model's losses (`add_loss`, on every call).
  Input: [batch, features]. Output: a list of `num_tasks` tensors [batch, units[-1]].

  Args:
    num_tasks: number of task networks, >= 2.
    units: width of each network layer, input to output; at least one.
    distance_weight: weight of the parameter-distance penalty; 0 adds none.
    activation: Keras activation name applied after every layer.
    dropout: dropout rate after every layer (training only); 0 adds none.
    kernel_l2: plain L2 penalty on every kernel, on top of the distance one.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    x: [batch, features] float tensor, the input of every task network.
    training: whether dropout is active.

  Returns:
    List of `num_tasks` tensors [batch, units[-1]], one per network, in order.

  Raises:
    ValueError: `num_tasks` < 2 or `units` empty.
  """

  def __init__(self, num_tasks: int, units: Sequence[int], distance_weight: float = 1e-3,
               activation: str = "relu", dropout: float = 0.0, kernel_l2: float = 0.0,
               **kwargs):
    if num_tasks < 2:
      raise ValueError("L2ConstrainedNetworks needs num_tasks >= 2.")
    super().__init__(num_tasks, units, activation, dropout, kernel_l2, **kwargs)
    self.distance_weight = distance_weight

  def parameter_distance(self) -> tf.Tensor:
    """Sum over layers and task pairs of squared parameter distances.

    Returns:
      Scalar: sum over layers and pairs a < b of ||W_a - W_b||^2 +
      ||b_a - b_b||^2, before `distance_weight`.
    """
    n = self.num_experts
    total = 0.0
    # Kernels are [fan_in, tasks, units]; put the task axis first.
    weights = [tf.transpose(k, [1, 0, 2]) for k in self.kernels] + list(self.biases)
    for weight in weights:
      flat = tf.reshape(weight, [n, -1])
      # sum_{a<b} ||w_a - w_b||^2 = n * sum_a ||w_a||^2 - ||sum_a w_a||^2
      total += (n * tf.reduce_sum(tf.square(flat))
                - tf.reduce_sum(tf.square(tf.reduce_sum(flat, axis=0))))
    return total

  def call(self, x: tf.Tensor, training: Optional[bool] = None) -> List[tf.Tensor]:
    if self.distance_weight:
      self.add_loss(self.distance_weight * self.parameter_distance())
    return tf.unstack(super().call(x, training), num=self.num_experts, axis=1)

  def compute_output_shape(self, input_shape):
    return [tf.TensorShape([input_shape[0], self.units[-1]])] * self.num_experts

  def get_config(self):
    config = super().get_config()
    config["num_tasks"] = config.pop("num_experts")
    return {**config, "distance_weight": self.distance_weight}
