"""Exact per-task evaluation metrics, computed in numpy over a whole eval set.

Keras' streaming AUC bins scores into thresholds and is approximate; the
figures we report (and compare with papers) use the exact rank statistic.
"""

from typing import Dict, Iterable, List, Optional

import numpy as np
import tensorflow as tf

from mtl_zoo import diagnostics
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with tied scores averaged).

  NaN when only one class is present.
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


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
  p = np.clip(np.asarray(probabilities, np.float64).ravel(), eps, 1 - eps)
  y = np.asarray(labels, np.float64).ravel()
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def mse(labels: np.ndarray, predictions: np.ndarray) -> float:
  diff = np.asarray(labels, np.float64).ravel() - np.asarray(predictions, np.float64).ravel()
  return float(np.mean(diff ** 2))


def predict_function(model):
  """A traced inference call that tolerates the smaller last batch and takes
  only the model's inputs from the features (a serving model is evaluated on
  data that also holds the train-only features)."""
  names = set(model.input_names)
  return tf.function(lambda features: model({k: v for k, v in features.items() if k in names},
                                            training=False),
                     reduce_retracing=True)


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
  """AUC and log-loss for binary tasks, MSE for regression, AUC of "any event"
  for ranking tasks; over masked-in examples."""
  results = {}
  for task in schema.tasks:
    data = collected[task.name]
    keep = data["weight"] > 0
    y, p = data["label"][keep], data["prediction"][keep]
    if task.type == schema_lib.BINARY:
      results[task.name] = {"auc": auc(y, p), "logloss": log_loss(y, p),
                            "positive_rate": float(y.mean()) if y.size else float("nan"),
                            "examples": int(keep.sum())}
    elif task.type == schema_lib.RANKING:
      # Scores are only comparable within a request; across requests, how well
      # they separate examples with any event from those without.
      results[task.name] = {"auc": auc(y > 0, p), "examples": int(keep.sum())}
    else:
      results[task.name] = {"mse": mse(y, p), "examples": int(keep.sum())}
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

  def on_epoch_end(self, epoch, logs=None):
    collected = collect(self._probe, self.dataset, self._predict)
    self.latest = task_metrics(self.schema, collected)
    self.gates = diagnostics.gate_report(collected)
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
