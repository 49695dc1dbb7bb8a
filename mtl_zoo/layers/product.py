"""Entire-space probability: the product of conditional stage probabilities."""

from mtl_zoo._keras import Layer, keras


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ProbabilityProduct(Layer):
  """Multiplies probabilities element-wise: p(click & convert) = pCTR x pCVR
  (ESMM, Ma et al., SIGIR 2018).

  Input: a list of tensors of one shape. Output: their product. No weights.

  Args:
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    probabilities: list of one or more tensors of one shape, e.g. [batch, 1].

  Returns:
    Their element-wise product, of the same shape.
  """

  def call(self, probabilities):
    result = probabilities[0]
    for p in probabilities[1:]:
      result = result * p
    return result
