"""Plain building blocks: MLPs, fused banks of expert MLPs, task output heads."""

from typing import Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import Layer, keras
from pipelines import schema as schema_lib


@keras.utils.register_keras_serializable(package="mtl_zoo")
class MLP(Layer):
  """Dense layers with an activation and optional dropout after each.

  Used for shared bottoms, towers and single experts. The activation (and
  dropout) also follows the last layer.

  Args:
    units: width of each Dense layer, input to output.
    activation: Keras activation name applied after every layer.
    dropout: dropout rate after every layer (training only); 0 adds none.
    kernel_l2: L2 penalty on every kernel (not biases); 0 adds none.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    x: [batch, features] float tensor.
    training: whether dropout is active.

  Returns:
    [batch, units[-1]].
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
class ExpertBank(Layer):
  """`num_experts` independent MLPs over the same input, computed together.

  Kernels are [fan_in, num_experts, units]: the first layer of every expert is
  one plain matmul of the input with the kernel viewed as [fan_in, experts *
  units], about 4x cheaper on CPU than an einsum or `num_experts` Dense calls
  (TF's einsum transposes its operands on every call). Deeper layers apply each
  expert's kernel to its own activations.

  Each expert is an `MLP(units, activation, dropout)`: the activation and dropout
  follow every layer, the last included.

  Args:
    num_experts: number of experts, >= 1.
    units: width of each expert layer, input to output; at least one.
    activation: Keras activation name applied after every layer.
    dropout: dropout rate after every layer (training only); 0 adds none.
    kernel_l2: L2 penalty on every kernel (not biases); 0 adds none.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    x: [batch, features] float tensor.
    training: whether dropout is active.

  Returns:
    [batch, num_experts, units[-1]]: every expert's output.

  Raises:
    ValueError: `num_experts` < 1 or `units` empty.
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
          name=f"kernel_{i}", shape=[fan_in, self.num_experts, u],
          initializer=_ExpertGlorotUniform(), regularizer=reg))
      self.biases.append(self.add_weight(name=f"bias_{i}", shape=[self.num_experts, u],
                                         initializer="zeros"))
      fan_in = u
    super().build(input_shape)

  def call(self, x: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
    first = self.kernels[0]
    # matmul, bias_add and the activation on 2-D tensors: Grappler fuses them
    # into one kernel; the reshape to [batch, experts, units] comes after.
    h = tf.nn.bias_add(tf.matmul(x, tf.reshape(first, [first.shape[0], -1])),
                       tf.reshape(self.biases[0], [-1]))
    h = tf.reshape(self._activation(h), [-1, self.num_experts, self.units[0]])
    h = self._apply_dropout(h, training)
    for kernel, bias in zip(self.kernels[1:], self.biases[1:]):
      h = self._apply_dropout(self._activation(tf.einsum("bei,ieo->beo", h, kernel) + bias),
                              training)
    return h

  def expert_weights(self, expert: int) -> list:
    """One expert's parameters, as a stack of Dense layers holds them.

    Args:
      expert: index of the expert, in [0, num_experts).

    Returns:
      [kernel_0, bias_0, kernel_1, bias_1, ...]: kernels [fan_in, units[i]],
      biases [units[i]]; tensors sliced from the bank's variables.
    """
    return [w for kernel, bias in zip(self.kernels, self.biases)
            for w in (kernel[:, expert], bias[expert])]

  def _apply_dropout(self, h, training):
    return self._dropout(h, training=training) if self._dropout else h

  def compute_output_shape(self, input_shape):
    return tf.TensorShape([input_shape[0], self.num_experts, self.units[-1]])

  def get_config(self):
    return {**super().get_config(), "num_experts": self.num_experts, "units": self.units,
            "activation": self.activation, "dropout": self.dropout,
            "kernel_l2": self.kernel_l2}


class _ExpertGlorotUniform(keras.initializers.Initializer):
  """Glorot uniform over a [fan_in, experts, units] kernel with the fans Keras
  gives an [experts, fan_in, units] one (fan_in * experts, units * experts), so
  expert banks keep the initial scale they were tuned with."""

  def __call__(self, shape, dtype=None, **kwargs):
    fan_in, experts, units = shape
    limit = (6.0 / (experts * (fan_in + units))) ** 0.5
    return tf.random.uniform(shape, -limit, limit, dtype=dtype or tf.float32)


@keras.utils.register_keras_serializable(package="mtl_zoo")
class TaskHead(Layer):
  """One output unit: a sigmoid probability (binary) or a linear value
  (regression, and the score of ranking tasks).

  Name the layer after its task so the model output is.

  Args:
    task_type: one of `pipelines.schema.TASK_TYPES`: "binary" applies a
      sigmoid to the logit; "regression" and "ranking" return the logit.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    x: [batch, features] float tensor.

  Returns:
    [batch, 1].

  Raises:
    ValueError: unknown `task_type`.
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
