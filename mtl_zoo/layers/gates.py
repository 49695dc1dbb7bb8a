"""Gates that mix expert outputs: the heart of MoE-style multi-task models."""

import tensorflow as tf

from mtl_zoo._keras import keras


@keras.utils.register_keras_serializable(package="mtl_zoo")
class SoftmaxGate(keras.layers.Layer):
  """A softmax over experts computed from the gate input (MMoE, OMoE, CGC, PLE).

  Input: [batch, features]. Output: [batch, num_experts] weights that sum to 1.
  Kept apart from the mixing so the weights can be read for diagnostics.
  """

  def __init__(self, num_experts: int, **kwargs):
    super().__init__(**kwargs)
    self.num_experts = int(num_experts)
    self._logits = keras.layers.Dense(self.num_experts, name="logits")

  def call(self, x: tf.Tensor) -> tf.Tensor:
    # Written out: oneDNN builds rewrite tf.nn.softmax into a kernel that takes
    # ~100 us on a [256, 8] batch on CPU, a third of the whole model's time.
    logits = self._logits(x)
    exp = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))
    return exp / tf.reduce_sum(exp, axis=-1, keepdims=True)

  def get_config(self):
    return {**super().get_config(), "num_experts": self.num_experts}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ExpertMixture(keras.layers.Layer):
  """Weighted sum of expert outputs.

  Inputs: [experts [batch, num_experts, units], weights [batch, num_experts]].
  Output: [batch, units].
  """

  def call(self, inputs):
    experts, weights = inputs
    # Multiply-and-sum: ~5x cheaper on CPU than the equivalent einsum.
    return tf.reduce_sum(experts * weights[:, :, None], axis=1)
