"""Score fusion: several objectives' scores into one ranking score."""

from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from mtl_zoo._keras import Layer, keras
from pipelines import schema as schema_lib

FUSION_MODES = ("sum", "product")
# Just inside float32's normal range: exp of the exact logs rounds past it (to
# inf, or to a denormal that CPUs flush to 0).
_LOG_FLOAT32_TINY = float(np.log(np.finfo(np.float32).tiny)) + 1e-3
_LOG_FLOAT32_MAX = float(np.log(np.finfo(np.float32).max)) - 1e-3


@keras.utils.register_keras_serializable(package="mtl_zoo")
class ScoreFusion(Layer):
  """Fuses named scores: weighted sum `sum_i w_i * s_i`, or weighted product
  `prod_i s_i ** w_i` (the ads formula ctr^w1 * cvr^w2 * price^w3).

  Terms are task outputs or numeric features (such as price); values are
  clipped at `epsilon` before the product's logarithm, so a zero score gives a
  tiny product instead of NaN.

  Call with `scores` (dict term -> [batch] or [batch, 1]) and optionally
  `weights` [batch, num_terms] that override the configured ones per example.
  Those come from clients, so a NaN or infinite weight counts as missing (the
  configured weight), and scores saturate at float32's limits instead of
  overflowing: for finite scores every output is finite, and a ranking never
  meets NaN. A term in `missing_values` (a numeric feature such as price) that
  is NaN or infinite takes its missing value, the value models see for a
  missing feature; `score_fusion` sets them from the schema, and both the
  served `rank` signature and the offline `strategies.ranking_score` fuse
  through it, so offline and served scores agree. Other non-finite scores are
  not sanitised: a NaN score gives a NaN output. Output: [batch].

  Args:
    mode: "sum" or "product" (`FUSION_MODES`).
    terms: names of the fused scores, keys of the call's `scores`.
    weights: one float weight per term, in the order of `terms`.
    epsilon: "product" only: scores are clipped below at `epsilon` before
      their logarithm.
    missing_values: term -> the value a non-finite score of that term takes
      (default: none replaced).
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    scores: dict term -> [batch] or [batch, 1] tensor (cast to float32); keys
      beyond `terms` are ignored.
    weights: optional [batch, num_terms] float32 per-example weights, columns in
      the order of `terms`; non-finite entries fall back to the configured
      weight.

  Returns:
    [batch] float32 fused scores.

  Raises:
    ValueError: unknown `mode`, no terms, or not one weight per term.
  """

  def __init__(self, mode: str, terms: Sequence[str], weights: Sequence[float],
               epsilon: float = 1e-7, missing_values: Optional[Dict[str, float]] = None,
               **kwargs):
    super().__init__(**kwargs)
    if mode not in FUSION_MODES:
      raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}.")
    if len(terms) != len(weights) or not terms:
      raise ValueError(f"fusion needs one weight per term, got terms {list(terms)} and "
                       f"weights {list(weights)}.")
    self.mode, self.terms = mode, list(terms)
    self.weights_config = [float(w) for w in weights]
    self.epsilon = epsilon
    self.missing_values = {t: float(v) for t, v in (missing_values or {}).items()}

  def _term(self, scores: Dict[str, tf.Tensor], term: str) -> tf.Tensor:
    value = tf.reshape(tf.cast(scores[term], tf.float32), [-1])
    if term in self.missing_values:
      value = tf.where(tf.math.is_finite(value), value, self.missing_values[term])
    return value

  def call(self, scores: Dict[str, tf.Tensor],
           weights: Optional[tf.Tensor] = None) -> tf.Tensor:
    values = tf.stack([self._term(scores, t) for t in self.terms], axis=1)
    configured = tf.constant(self.weights_config)[None, :]
    weights = configured if weights is None else tf.where(
        tf.math.is_finite(weights), weights, configured)
    if self.mode == "sum":
      # Each term within max/num_terms, so no sum of finite terms overflows.
      bound = np.finfo(np.float32).max / len(self.terms)
      return tf.reduce_sum(tf.clip_by_value(weights * values, -bound, bound), axis=1)
    log_score = tf.reduce_sum(weights * tf.math.log(tf.maximum(values, self.epsilon)), axis=1)
    return tf.exp(tf.clip_by_value(log_score, _LOG_FLOAT32_TINY, _LOG_FLOAT32_MAX))

  def get_config(self):
    return {**super().get_config(), "mode": self.mode, "terms": self.terms,
            "weights": self.weights_config, "epsilon": self.epsilon,
            "missing_values": dict(self.missing_values)}


def score_fusion(fusion: dict, schema: schema_lib.Schema,
                 task_names: Optional[Sequence[str]] = None) -> ScoreFusion:
  """The one fusion layer of a ranking score, for serving and offline alike.

  Args:
    fusion: {"mode", "terms", "weights"} (`parse_fusion`); terms are tasks of
      `schema` or its numeric features.
    schema: the schema whose numeric features may be terms.
    task_names: the model outputs that may be terms (default: the schema's tasks).

  Returns:
    A `ScoreFusion` whose numeric-feature terms read a NaN or infinite value
    as missing: the raw value models see as the training mean
    (`Schema.missing_numeric_value`).

  Raises:
    pipelines.schema.SchemaError: a term is neither a task nor a numeric feature.
  """
  tasks = list(schema.task_names if task_names is None else task_names)
  # A server has no train-only feature to fuse.
  numeric = {f.name: f for f in schema.numeric if not f.train_only}
  unknown = [t for t in fusion["terms"] if t not in tasks and t not in numeric]
  if unknown:
    raise schema_lib.SchemaError(f"fusion terms {unknown} are neither tasks {tasks} nor "
                                 f"numeric features {list(numeric)}.")
  return ScoreFusion(fusion["mode"], fusion["terms"], fusion["weights"],
                     missing_values={t: schema.missing_numeric_value(numeric[t])
                                     for t in fusion["terms"] if t not in tasks})


def parse_fusion(spec: str) -> dict:
  """Parses a fusion spec such as 'product:ctr=1,cvr=0.5,price=1'.

  Args:
    spec: "<mode>:<term>=<weight>,..." with mode "sum" or "product".

  Returns:
    {"mode": str, "terms": [str], "weights": [float]}: the `ScoreFusion`
    constructor arguments (also the `fusion` argument of
    `mtl_zoo.serving.export_saved_model`).

  Raises:
    ValueError: unknown mode, no terms, or a term that is not name=number.
  """
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
