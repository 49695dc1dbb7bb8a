"""Plain building blocks: MLPs, fused banks of expert MLPs, task output heads."""

from typing import Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


@keras.utils.register_keras_serializable(package="mtl_zoo")
class MLP(keras.layers.Layer):
  """Dense layers with an activation and optional dropout after each.

  Used for shared bottoms, towers and single experts.
  """

  def __init__(self, units: Sequence[int], activation: str = "relu",
               dropout: float = 0.0, kernel_l2: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.units = [int(u) for u in units]
    self.activation = activation
    self.dropout = dropout
    self.kernel_l2 = kernel_l2
    reg = keras.regularizers.l2(kernel_l2) if kernel_l2 else None
    self._dense = [keras.layers.Dense(u, activation=activation, kernel_regularizer=reg,
                                      name=f"dense_{i}") for i, u in enumerate(self.units)]
    self._dropout = [keras.layers.Dropout(dropout) for _ in self.units] if dropout else []

  def call(self, x: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
    for i, dense in enumerate(self._dense):
      x = dense(x)
      if self._dropout:
        x = self._dropout[i](x, training=training)
    return x

  def get_config(self):
    return {**super().get_config(), "units": self.units, "activation": self.activation,
            "dropout": self.dropout, "kernel_l2": self.kernel_l2}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ExpertBank(keras.layers.Layer):
  """`num_experts` independent MLPs over the same input, computed together.

  Each layer of all experts is one batched einsum over a [experts, in, out]
  kernel instead of `num_experts` separate Dense calls, which matters on CPU
  where per-op overhead dominates small experts.

  Input: [batch, features]. Output: [batch, num_experts, units[-1]].
  """

  def __init__(self, num_experts: int, units: Sequence[int], activation: str = "relu",
               dropout: float = 0.0, kernel_l2: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    if num_experts < 1 or not units:
      raise ValueError("ExpertBank needs num_experts >= 1 and at least one layer of units.")
    self.num_experts = int(num_experts)
    self.units = [int(u) for u in units]
    self.activation = activation
    self.dropout = dropout
    self.kernel_l2 = kernel_l2
    self._activation = keras.activations.get(activation)
    self._dropout = keras.layers.Dropout(dropout) if dropout else None

  def build(self, input_shape):
    reg = keras.regularizers.l2(self.kernel_l2) if self.kernel_l2 else None
    fan_in = int(input_shape[-1])
    self.kernels, self.biases = [], []
    for i, u in enumerate(self.units):
      self.kernels.append(self.add_weight(
          f"kernel_{i}", shape=[self.num_experts, fan_in, u],
          initializer=keras.initializers.GlorotUniform(), regularizer=reg))
      self.biases.append(self.add_weight(f"bias_{i}", shape=[self.num_experts, u],
                                         initializer="zeros"))
      fan_in = u
    super().build(input_shape)

  def call(self, x: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
    h = tf.einsum("bi,eio->beo", x, self.kernels[0]) + self.biases[0]
    h = self._apply_dropout(self._activation(h), training)
    for kernel, bias in zip(self.kernels[1:], self.biases[1:]):
      h = self._apply_dropout(self._activation(tf.einsum("bei,eio->beo", h, kernel) + bias),
                              training)
    return h

  def _apply_dropout(self, h, training):
    return self._dropout(h, training=training) if self._dropout else h

  def compute_output_shape(self, input_shape):
    return tf.TensorShape([input_shape[0], self.num_experts, self.units[-1]])

  def get_config(self):
    return {**super().get_config(), "num_experts": self.num_experts, "units": self.units,
            "activation": self.activation, "dropout": self.dropout,
            "kernel_l2": self.kernel_l2}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class TaskHead(keras.layers.Layer):
  """One output unit: a sigmoid probability (binary) or a linear value (regression).

  Output: [batch, 1]. Name the layer after its task so the model output is.
  """

  def __init__(self, task_type: str = schema_lib.BINARY, **kwargs):
    super().__init__(**kwargs)
    if task_type not in schema_lib.TASK_TYPES:
      raise ValueError(f"task_type must be one of {schema_lib.TASK_TYPES}, got {task_type!r}.")
    self.task_type = task_type
    self._logit = keras.layers.Dense(1, name="logit")

  def call(self, x: tf.Tensor) -> tf.Tensor:
    logit = self._logit(x)
    return tf.sigmoid(logit) if self.task_type == schema_lib.BINARY else logit

  def get_config(self):
    return {**super().get_config(), "task_type": self.task_type}
