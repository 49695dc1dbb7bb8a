"""Maps from a task's probability to a calibrated one, applied inside the model
so that every serving signature returns what the run evaluated.

All three are fixed maps whose parameters live in the layer's config (no
weights): fitted after training (`mtl_zoo.calibration`), saved with the Keras
model and traced into the SavedModel.
"""

from typing import Sequence

import tensorflow as tf

from mtl_zoo._keras import Layer, keras

# Probabilities are clipped this far inside (0, 1) before taking their logit.
LOGIT_EPSILON = 1e-6


@keras.utils.register_keras_serializable(package="mtl_zoo")
class NegativeSamplingCorrection(Layer):
  """Undoes training on a fraction `rate` of the negatives: p -> p / (p + (1 - p)
  / rate). A model trained with every negative kept with probability `rate` learns
  odds 1/rate times the true ones; this multiplies them back by `rate`.

  Args:
    rate: the fraction of negatives training read, in (0, 1].
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    probabilities: a tensor of probabilities, e.g. [batch, 1].

  Returns:
    The corrected probabilities, of the same shape.
  """

  def __init__(self, rate: float, **kwargs):
    super().__init__(**kwargs)
    if not 0 < rate <= 1:
      raise ValueError(f"rate must be in (0, 1], got {rate}.")
    self.rate = float(rate)

  def call(self, probabilities):
    return probabilities / (probabilities + (1.0 - probabilities) / self.rate)

  def get_config(self):
    return {**super().get_config(), "rate": self.rate}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class PlattCalibration(Layer):
  """Platt scaling on the logit: p -> sigmoid(slope * logit(p) + intercept).

  Args:
    slope: the logit's coefficient (1 and intercept 0: the identity).
    intercept: the added constant.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    probabilities: a tensor of probabilities, e.g. [batch, 1]; clipped to
      [LOGIT_EPSILON, 1 - LOGIT_EPSILON] before the logit.

  Returns:
    The calibrated probabilities, of the same shape.
  """

  def __init__(self, slope: float, intercept: float, **kwargs):
    super().__init__(**kwargs)
    self.slope, self.intercept = float(slope), float(intercept)

  def call(self, probabilities):
    p = tf.clip_by_value(probabilities, LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
    return tf.sigmoid(self.slope * (tf.math.log(p) - tf.math.log1p(-p)) + self.intercept)

  def get_config(self):
    return {**super().get_config(), "slope": self.slope, "intercept": self.intercept}


@keras.utils.register_keras_serializable(package="mtl_zoo")
class IsotonicCalibration(Layer):
  """A monotone piecewise-linear map through knots (x_i, y_i): linear between
  neighbouring knots, constant (y_0, y_last) outside them, as `numpy.interp`.

  Args:
    x: knot positions, strictly increasing (e.g. the mean prediction of each
      block of isotonic regression).
    y: knot values, non-decreasing, one per position.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    probabilities: a tensor of probabilities, e.g. [batch, 1].

  Returns:
    The mapped probabilities, of the same shape.
  """

  def __init__(self, x: Sequence[float], y: Sequence[float], **kwargs):
    super().__init__(**kwargs)
    self.x, self.y = [float(v) for v in x], [float(v) for v in y]
    if not self.x or len(self.x) != len(self.y):
      raise ValueError(f"x and y need the same, non-zero length; got {len(self.x)} and "
                       f"{len(self.y)}.")
    if any(b <= a for a, b in zip(self.x, self.x[1:])):
      raise ValueError("x must be strictly increasing.")
    if any(b < a for a, b in zip(self.y, self.y[1:])):
      raise ValueError("y must be non-decreasing (a monotone map).")

  def call(self, probabilities):
    x, y = tf.constant(self.x, tf.float32), tf.constant(self.y, tf.float32)
    p = tf.reshape(tf.cast(probabilities, tf.float32), [-1])
    last = len(self.x) - 1
    above = tf.searchsorted(x, p, side="right")  # knots at or below each p
    lower = tf.clip_by_value(above - 1, 0, last)
    upper = tf.clip_by_value(above, 0, last)
    x0, x1 = tf.gather(x, lower), tf.gather(x, upper)
    y0, y1 = tf.gather(y, lower), tf.gather(y, upper)
    # Outside the knots lower == upper: the end value.
    t = tf.math.divide_no_nan(p - x0, x1 - x0)
    return tf.reshape(y0 + t * (y1 - y0), tf.shape(probabilities))

  def get_config(self):
    return {**super().get_config(), "x": self.x, "y": self.y}
