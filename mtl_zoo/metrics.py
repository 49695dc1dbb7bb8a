"""Exact per-task evaluation metrics, computed in numpy over a whole eval set.

Keras' streaming AUC bins scores into thresholds and is approximate; the
figures we report (and compare with papers) use the exact rank statistic.
"""

import weakref
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from mtl_zoo import diagnostics
from mtl_zoo._keras import input_names, keras
from pipelines import schema as schema_lib


class MetricError(ValueError):
  """A reported metric is undefined on the data (an AUC without positives, a
  label with missing values); the message names the label column and why. The
  runner reports it as a data error instead of printing NaN."""


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with tied scores averaged).

  NaN when only one class is present (`reported_auc` raises instead).
  """
  labels = np.asarray(labels, np.float64).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  positives = labels.sum()
  negatives = labels.size - positives
  if positives == 0 or negatives == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(labels.size, np.float64)
  # Average the ranks of tied scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [labels.size]])
  average_rank = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(average_rank, ends - starts)
  return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2)
               / (positives * negatives))


def check_labels(labels: np.ndarray, column: str, where: str = "") -> np.ndarray:
  """`labels` as float64, or a MetricError when some are missing (NaN).

  Args:
    labels: label values.
    column: the label column they come from, for the message.
    where: which examples they are, for the message (e.g. " where click is 1").

  Returns:
    The labels, flattened.
  """
  labels = np.asarray(labels, np.float64).ravel()
  missing = int(np.isnan(labels).sum())
  if missing:
    raise MetricError(f"label column {column} has {missing} missing values{where} in the "
                      "eval data; a label may be missing only where its gate (the schema's "
                      "label_masks) is 0. Fix the data, or leave such records out "
                      "(--bad_records=skip).")
  return labels


def reported_auc(labels: np.ndarray, scores: np.ndarray, column: str, where: str = ""
                 ) -> float:
  """`auc` for a report: a MetricError, naming `column`, where it is undefined.

  Args:
    labels: 0/1 labels (values > 0.5 count as positive).
    scores: scores of the same examples.
    column: the label column, for the message.
    where: which examples these are, for the message (e.g. " where click is 1").

  Returns:
    The AUC.

  Raises:
    MetricError: missing labels, or no positive or no negative example.
  """
  positive = check_labels(labels, column, where) > 0.5
  for found, kind in ((positive.sum(), "positive"), ((~positive).sum(), "negative")):
    if not found:
      raise MetricError(f"no {kind} {column} in the eval data{where} ({positive.size} "
                        f"examples): its AUC is undefined. Evaluate on more data.")
  return auc(positive, scores)


def _groups(group_ids: np.ndarray) -> List[np.ndarray]:
  """Index arrays of the examples of each group (request or user), in id order."""
  group_ids = np.asarray(group_ids).ravel()
  order = np.argsort(group_ids, kind="mergesort")
  bounds = np.flatnonzero(np.diff(group_ids[order])) + 1
  return np.split(order, bounds)


def gauc(labels: np.ndarray, scores: np.ndarray, group_ids: np.ndarray) -> float:
  """Group AUC: per-group (request or user) AUC averaged with weights equal to
  the group's number of examples. Groups with only one label class have no AUC
  and are skipped. NaN when no group has both classes."""
  labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
  total, weight = 0.0, 0
  for index in _groups(group_ids):
    value = auc(labels[index], scores[index])
    if not np.isnan(value):
      total += value * index.size
      weight += index.size
  return total / weight if weight else float("nan")


def ndcg_at_k(relevance: np.ndarray, scores: np.ndarray, group_ids: np.ndarray,
              k: int = 10) -> float:
  """Mean NDCG@k over groups, gain 2^rel - 1 and discount 1/log2(rank + 1).

  Groups whose ideal DCG is 0 (nothing relevant) are skipped. Tied scores keep
  the input order (stable sort), so results are deterministic.
  """
  relevance, scores = np.asarray(relevance, np.float64).ravel(), np.asarray(scores).ravel()
  values = []
  for index in _groups(group_ids):
    rel = relevance[index]
    ranked = rel[np.argsort(-scores[index], kind="mergesort")][:k]
    ideal = np.sort(rel)[::-1][:k]
    discounts = 1.0 / np.log2(np.arange(2, ranked.size + 2))
    ideal_dcg = float(((2.0 ** ideal - 1) * discounts[:ideal.size]).sum())
    if ideal_dcg > 0:
      values.append(float(((2.0 ** ranked - 1) * discounts).sum()) / ideal_dcg)
  return float(np.mean(values)) if values else float("nan")


def top_k_lists(scores: np.ndarray, group_ids: np.ndarray, k: int = 10) -> List[np.ndarray]:
  """Per group (request), in group id order, the indices of its `k`
  highest-scored examples, best first (ties keep the input order)."""
  scores = np.asarray(scores).ravel()
  return [index[np.argsort(-scores[index], kind="mergesort")][:k]
          for index in _groups(group_ids)]


def item_rows(ids: np.ndarray, feature: schema_lib.Feature) -> np.ndarray:
  """Categorical ids -> the embedding rows models look them up in: hashed ids
  folded into vocab_size buckets, other ids outside [0, vocab_size) to the
  out-of-vocabulary row vocab_size (as `layers.feature_embedding` does)."""
  ids = np.asarray(ids, np.int64).ravel()
  if feature.hashed:
    return np.mod(ids, feature.vocab_size)
  return np.where((ids >= 0) & (ids < feature.vocab_size), ids, feature.vocab_size)


def catalog_coverage(lists: Sequence[np.ndarray], catalog_size: int) -> float:
  """Share of the catalog's items shown in any list: distinct ids in
  [0, catalog_size) over all lists, / catalog_size (out-of-vocabulary ids are
  no catalog item).

  Args:
    lists: per request, the item ids (embedding rows, `item_rows`) it shows.
    catalog_size: items in the catalog (the item feature's vocab_size).

  Returns:
    The coverage in [0, 1].
  """
  shown = np.unique(np.concatenate([np.asarray(l, np.int64).ravel() for l in lists] or [[]]))
  return float(np.sum((shown >= 0) & (shown < catalog_size))) / catalog_size


def intra_list_diversity(category_lists: Sequence[np.ndarray]) -> float:
  """Mean over lists of the share of item pairs whose categories differ
  (intra-list diversity with the 0/1 category distance, Ziegler et al. 2005):
  1 when every shown item has its own category, 0 when all share one. Lists of
  fewer than two items have no pairs and are left out.

  Args:
    category_lists: per request, the categories of the items it shows.

  Returns:
    The mean diversity in [0, 1].

  Raises:
    MetricError: no list has two items.
  """
  values = []
  for categories in category_lists:
    categories = np.asarray(categories).ravel()
    n = categories.size
    if n >= 2:
      same = np.sum(categories[:, None] == categories[None, :]) - n  # ordered pairs
      values.append(1.0 - same / (n * (n - 1)))
  if not values:
    raise MetricError("no request shows two items: intra-list diversity is undefined.")
  return float(np.mean(values))


def popularity(counts: np.ndarray) -> np.ndarray:
  """Item popularity from training impressions per item: the item's share of
  them, with one pseudo-impression per item (add-one smoothing) so that an
  item never shown in training has a finite self-information."""
  counts = np.asarray(counts, np.float64)
  return (counts + 1.0) / (counts.sum() + counts.size)


def novelty(lists: Sequence[np.ndarray], item_popularity: np.ndarray) -> float:
  """Mean self-information -log2(popularity) of the shown items (Zhou et al.
  2010): higher means less popular, more novel recommendations.

  Args:
    lists: per request, the item ids (embedding rows, `item_rows`) it shows.
    item_popularity: popularity of each id (`popularity`), all > 0.

  Returns:
    Bits per shown item.
  """
  shown = np.concatenate([np.asarray(l, np.int64).ravel() for l in lists] or [[]])
  if not shown.size:
    raise MetricError("no item is shown: novelty is undefined.")
  return float(np.mean(-np.log2(np.asarray(item_popularity, np.float64)[shown])))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
  p = np.clip(np.asarray(probabilities, np.float64).ravel(), eps, 1 - eps)
  y = np.asarray(labels, np.float64).ravel()
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def pcoc(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """Predicted over observed: sum of predictions / sum of labels (1 when the
  predictions add up to the events that happened; NaN without a positive)."""
  positives = float(np.sum(np.asarray(labels, np.float64)))
  return float(np.sum(np.asarray(probabilities, np.float64))) / positives if positives \
      else float("nan")


ECE_BINS = 20


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
                     ) -> Dict[str, np.ndarray]:
  """Equal-frequency bins of the predictions: each holds ~1/`bins` of the
  examples, cut at the predictions' quantiles; equal predictions share a bin,
  and bins left empty by ties are dropped.

  Equal-frequency rather than equal-width: click and conversion probabilities
  crowd near 0, where equal-width bins would put nearly every example into the
  first one or two bins and leave the others with a handful each, so the error
  would rest on a few noisy bins. With equal counts, every bin's observed rate
  has about the same noise.

  Args:
    labels: 0/1 labels.
    probabilities: predicted probabilities, one per label.
    bins: the number of quantile bins.

  Returns:
    {"prediction": mean prediction per bin, "rate": observed rate per bin,
     "count": examples per bin}, bins in increasing order of prediction.
  """
  y = np.asarray(labels, np.float64).ravel()
  p = np.asarray(probabilities, np.float64).ravel()
  edges = np.quantile(p, np.arange(1, bins) / bins) if p.size else np.zeros(0)
  index = np.searchsorted(edges, p, side="left")
  count = np.bincount(index, minlength=bins).astype(np.float64)
  used = count > 0
  return {"prediction": np.bincount(index, p, bins)[used] / count[used],
          "rate": np.bincount(index, y, bins)[used] / count[used],
          "count": count[used].astype(np.int64)}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               bins: int = ECE_BINS) -> float:
  """ECE: |mean prediction - observed rate| per bin, averaged with weights equal
  to the bins' example counts, over `bins` equal-frequency bins
  (`calibration_bins` says why equal-frequency). NaN without examples."""
  binned = calibration_bins(labels, probabilities, bins)
  if not binned["count"].size:
    return float("nan")
  gap = np.abs(binned["prediction"] - binned["rate"])
  return float(np.sum(gap * binned["count"]) / np.sum(binned["count"]))


def normalized_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """NE: log-loss divided by the entropy of the labels' base rate, i.e. by the
  log-loss of always predicting that rate. Below 1: better than that constant;
  exactly 1 for it. NaN when the labels hold only one class."""
  y = np.asarray(labels, np.float64).ravel()
  rate = y.mean() if y.size else 0.0
  if rate <= 0 or rate >= 1:
    return float("nan")
  entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
  return float(log_loss(y, probabilities) / entropy)


def mse(labels: np.ndarray, predictions: np.ndarray) -> float:
  diff = np.asarray(labels, np.float64).ravel() - np.asarray(predictions, np.float64).ravel()
  return float(np.mean(diff ** 2))


# One inference call per live model: the end of a run scores the same model
# several times (eval, reports, oracle), and a fresh tf.function each time would
# trace it again (and trip TensorFlow's "frequent retracing" warning).
_PREDICT_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def predict_function(model):
  """A traced inference call that takes any batch size and only the model's
  inputs from the features (a serving model is evaluated on data that also
  holds the train-only features and labels). It is traced once per layout of
  the features it is given (their names, dtypes and per-example shapes), with
  the batch dimension left open, so the smaller last batch costs no second
  trace. AutoGraph off: a dict comprehension and the model's call leave it
  nothing to rewrite.

  Args:
    model: a Keras model taking a dict of features. The function does not keep
      it alive: hold the model while you use the function.

  Returns:
    A function of a feature dict (tensors or arrays, batch first) returning the
    model's outputs; the same one for the same model while it lives.
  """
  if model in _PREDICT_FUNCTIONS:
    return _PREDICT_FUNCTIONS[model]
  names = set(input_names(model))
  live = weakref.ref(model)  # a strong reference would keep the model alive here for good
  traced = {}

  def call(features):
    target = live()
    if target is None:
      raise RuntimeError("the model of this predict_function was deleted; keep a reference "
                         "to the model while you use its predict function.")
    return target({k: v for k, v in features.items() if k in names}, training=False)

  def predict(features):
    features = {k: tf.convert_to_tensor(v) for k, v in features.items()}
    specs = {k: tf.TensorSpec([None, *v.shape[1:]] if v.shape.rank else [], v.dtype)
             for k, v in features.items()}
    layout = tuple(sorted((k, spec.dtype.name, tuple(spec.shape)) for k, spec in specs.items()))
    if layout not in traced:
      traced[layout] = tf.function(call, input_signature=[specs], autograph=False)
    return traced[layout](features)

  _PREDICT_FUNCTIONS[model] = predict
  return predict


def predict_columns(model, schema: schema_lib.Schema, columns: Dict[str, np.ndarray],
                    batch_size: int = 8192) -> Dict[str, np.ndarray]:
  """Every output of `model` (a Keras model, or a SavedModel's `features`
  signature) over feature columns as `pipelines.reader.read_columns` returns
  them, in row order; [rows, 1] outputs come back as [rows]."""
  if isinstance(model, tf.types.experimental.ConcreteFunction):
    call = model
  else:
    traced = predict_function(model)
    call = lambda **features: traced(features)  # noqa: E731
  n = len(columns[schema.features[0].name])
  parts: Dict[str, list] = {}
  for start in range(0, n, batch_size):
    batch = {f.name: tf.constant(columns[f.name][start:start + batch_size])
             for f in schema.serving_features}
    for name, output in call(**batch).items():
      output = output.numpy()
      parts.setdefault(name, []).append(output[:, 0] if output.shape[1:] == (1,) else output)
  return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def collect(model, dataset: tf.data.Dataset, predict=None
            ) -> Dict[str, Dict[str, np.ndarray]]:
  """Runs `model` over a (features, labels, weights) dataset and gathers, per
  output, its predictions and, for task outputs, labels and weights (the task's
  mask). Outputs without labels (e.g. gate weights) keep their shape
  [examples, ...]. Pass `predict` (from `predict_function`) when calling
  repeatedly, to trace once."""
  predict = predict or predict_function(model)
  parts: Dict[str, Dict[str, list]] = {}
  for features, labels, weights in dataset:
    for name, output in predict(features).items():
      part = parts.setdefault(name, {"prediction": []})
      if name in labels:
        part["prediction"].append(output.numpy().ravel())
        part.setdefault("label", []).append(labels[name].numpy().ravel())
        part.setdefault("weight", []).append(weights[name].numpy().ravel())
      else:
        part["prediction"].append(output.numpy())
  return {name: {k: np.concatenate(v) for k, v in part.items()}
          for name, part in parts.items()}


def task_metrics(schema: schema_lib.Schema, collected: Dict[str, Dict[str, np.ndarray]]
                 ) -> Dict[str, Dict[str, float]]:
  """AUC, log-loss and calibration (PCOC, ECE, NE: `pcoc`,
  `expected_calibration_error`, `normalized_entropy`) for binary tasks, MSE
  for regression, AUC of "any event" for ranking tasks; over masked-in
  examples.

  Raises:
    MetricError: a metric is undefined: a task without positive (or negative)
      examples, a regression task without examples, or missing labels.
  """
  results = {}
  for task in schema.tasks:
    data = collected[task.name]
    keep = data["weight"] > 0
    y, p = data["label"][keep], data["prediction"][keep]
    where = (f" where {task.mask} is 1" if task.mask else "") + f" (task {task.name})"
    if task.type == schema_lib.BINARY:
      results[task.name] = {"auc": reported_auc(y, p, task.label, where),
                            "logloss": log_loss(y, p),
                            "pcoc": pcoc(y, p), "ece": expected_calibration_error(y, p),
                            "ne": normalized_entropy(y, p), "positive_rate": float(y.mean()),
                            "examples": int(keep.sum())}
    elif task.type == schema_lib.RANKING:
      # Scores are only comparable within a request; across requests, how well
      # they separate examples with any event from those without.
      events = "/".join(task.events)
      results[task.name] = {"auc": reported_auc(y > 0, p, events, where),
                            "examples": int(keep.sum())}
    else:
      if not y.size:
        raise MetricError(f"no example of {task.label} in the eval data{where}: its MSE is "
                          "undefined. Evaluate on more data.")
      results[task.name] = {"mse": mse(check_labels(y, task.label, where), p),
                            "examples": int(keep.sum())}
  return results


def evaluate(model, schema: schema_lib.Schema, dataset: tf.data.Dataset, predict=None
             ) -> Dict[str, Dict[str, float]]:
  return task_metrics(schema, collect(model, dataset, predict))


def format_table(results: Dict[str, Dict[str, float]],
                 columns: Optional[Iterable[str]] = None) -> str:
  """A markdown table, one row per task."""
  columns = list(columns or sorted({k for r in results.values() for k in r}))
  lines = ["| task | " + " | ".join(columns) + " |",
           "|---|" + "---|" * len(columns)]
  for task, values in results.items():
    cells = []
    for c in columns:
      v = values.get(c, "")
      cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


class EpochEvaluation(keras.callbacks.Callback):
  """Exact per-task metrics on one dataset after every epoch.

  Keeps `latest` (task -> metric -> value), `curve` (per epoch: its training
  `step`, with `steps_per_epoch`, and the metrics) and, for gated models,
  `gates` (`diagnostics.gate_report`: one pass yields predictions and gate
  weights). With `report`, also into the fit logs as `eval_<task>_<metric>`
  (so TensorBoard and the progress line show them) and printed; with `log_dir`,
  the gates' weights go to TensorBoard there. Pass the functional model, not a
  loss-weighting wrapper that `fit` trains.
  """

  def __init__(self, model, schema: schema_lib.Schema, dataset: tf.data.Dataset,
               steps_per_epoch: Optional[int] = None, log_dir: Optional[str] = None,
               report: bool = False):
    super().__init__()
    self.schema, self.dataset = schema, dataset
    self.steps_per_epoch, self.report = steps_per_epoch, report
    self.latest: Dict[str, Dict[str, float]] = {}
    self.gates: Dict[str, dict] = {}
    self.curve: List[dict] = []
    self._probe = diagnostics.with_gate_outputs(model)
    self._predict = predict_function(self._probe)
    self._writer = tf.summary.create_file_writer(log_dir) if log_dir else None

  def evaluate(self) -> None:
    """Evaluates the model as it is now into `latest` and `gates` (also used
    after training, once the best epoch's weights are back)."""
    collected = collect(self._probe, self.dataset, self._predict)
    self.latest = task_metrics(self.schema, collected)
    self.gates = diagnostics.gate_report(collected)

  def on_epoch_end(self, epoch, logs=None):
    self.evaluate()
    self.curve.append({"step": (epoch + 1) * (self.steps_per_epoch or 0),
                       "metrics": self.latest})
    if self._writer:
      diagnostics.write_summaries(self.gates, self._writer, epoch + 1)
    if not self.report:
      return
    summary = []
    for task, values in self.latest.items():
      for name, value in values.items():
        if name in ("auc", "logloss", "mse"):
          if logs is not None:
            logs[f"eval_{task}_{name}"] = value
          summary.append(f"{task} {name} {value:.4f}")
    print(f"  epoch {epoch + 1} eval: " + ", ".join(summary), flush=True)
