"""Score fusion: several objectives' scores into one ranking score."""

from typing import Dict, Optional, Sequence

import tensorflow as tf

from mtl_zoo._keras import keras

FUSION_MODES = ("sum", "product")


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ScoreFusion(keras.layers.Layer):
  """Fuses named scores: weighted sum `sum_i w_i * s_i`, or weighted product
  `prod_i s_i ** w_i` (the ads formula ctr^w1 * cvr^w2 * price^w3).

  Terms are task outputs or numeric features (such as price); values are
  clipped at `epsilon` before the product's logarithm, so a zero score gives a
  tiny product instead of NaN.

  Call with `scores` (dict term -> [batch] or [batch, 1]) and optionally
  `weights` [batch, num_terms] that override the configured ones per example.
  Output: [batch].
  """

  def __init__(self, mode: str, terms: Sequence[str], weights: Sequence[float],
               epsilon: float = 1e-7, **kwargs):
    super().__init__(**kwargs)
    if mode not in FUSION_MODES:
      raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}.")
    if len(terms) != len(weights) or not terms:
      raise ValueError(f"fusion needs one weight per term, got terms {list(terms)} and "
                       f"weights {list(weights)}.")
    self.mode, self.terms = mode, list(terms)
    self.weights_config = [float(w) for w in weights]
    self.epsilon = epsilon

  def call(self, scores: Dict[str, tf.Tensor],
           weights: Optional[tf.Tensor] = None) -> tf.Tensor:
    values = tf.stack([tf.reshape(tf.cast(scores[t], tf.float32), [-1]) for t in self.terms],
                      axis=1)
    if weights is None:
      weights = tf.constant(self.weights_config)[None, :]
    if self.mode == "sum":
      return tf.reduce_sum(weights * values, axis=1)
    return tf.exp(tf.reduce_sum(weights * tf.math.log(tf.maximum(values, self.epsilon)),
                                axis=1))

  def get_config(self):
    return {**super().get_config(), "mode": self.mode, "terms": self.terms,
            "weights": self.weights_config, "epsilon": self.epsilon}


def parse_fusion(spec: str) -> dict:
  """'product:ctr=1,cvr=0.5,price=1' -> {"mode": ..., "terms": [...], "weights": [...]}."""
  mode, sep, body = spec.partition(":")
  if not sep or mode not in FUSION_MODES or not body:
    raise ValueError(f"fusion spec {spec!r} should look like 'sum:ctr=1,cvr=2' or "
                     "'product:ctr=1,cvr=0.5,price=1'.")
  terms, weights = [], []
  for item in body.split(","):
    name, eq, weight = item.partition("=")
    try:
      weights.append(float(weight))
    except ValueError:
      raise ValueError(f"fusion term {item!r} should be name=weight.") from None
    if not eq or not name:
      raise ValueError(f"fusion term {item!r} should be name=weight.")
    terms.append(name.strip())
  return {"mode": mode, "terms": terms, "weights": weights}
