"""Logistic-regression baseline per binary task, on any converted dataset.

  python scripts/baseline_logreg.py --data_dir=mtl_zoo_output/data/synthetic-v3-seed0
  python scripts/baseline_logreg.py --train_files='d/train-*' --eval_files='d/eval-*' \\
      --schema=d/schema.json --output=results/baseline.json

For each binary task of the schema: a logistic regression on one-hot
categorical ids (multi-hot for list features; out-of-vocabulary ids in one
extra column per feature, hashed ids folded as the models fold them) plus the
standardized numeric features (the schema's transform, mean and std; a missing
value is the mean), on the examples the task's mask selects (CVR on clicked
impressions). The inverse regularization C is tuned on the eval split (the
validation data) over --Cs; the table gives per task the best C, its eval AUC
(exact, as the zoo reports it) and log-loss, and the same on the test split
where there is one (test-* in --data_dir, or --test_files). The one-hot matrix
is sparse (scipy), so a million rows take a few hundred MB.

A model that does not beat this baseline has not learned anything the ids and
numbers do not give away linearly.
"""

import os
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
from absl import app, flags
from scipy import sparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import metrics  # noqa: E402  (pins Keras 2 before TensorFlow is used)
from pipelines import files, reader, shards  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
import tensorflow as tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Converted data: schema.json, train-* and eval-* "
                    "shards, optionally test-*.")
flags.DEFINE_string("train_files", None, "Glob of training shards (instead of --data_dir).")
flags.DEFINE_string("eval_files", None, "Glob of validation shards C is tuned on.")
flags.DEFINE_string("test_files", None, "Optional glob of test shards.")
flags.DEFINE_string("schema", None, "schema.json (default: next to the training shards).")
flags.DEFINE_list("Cs", ["0.001", "0.01", "0.1", "1", "10"],
                  "Inverse regularization strengths tried (log-spaced).")
flags.DEFINE_integer("max_iter", 300, "L-BFGS iterations per fit.")
flags.DEFINE_string("output", None, "Also write the results as JSON here.")


def design_matrix(schema: schema_lib.Schema, columns: Dict[str, np.ndarray]
                  ) -> sparse.csr_matrix:
  """Features -> a sparse [rows, columns] matrix: per categorical feature one
  column per embedding row (ids mapped as the models map them), list features
  multi-hot, then one standardized column per numeric feature. Train-only
  features (e.g. the logged position) are left out, as the served models
  leave them out: a server does not know them.

  Args:
    schema: the data's schema (numeric mean/std filled by the converter).
    columns: `reader.read_columns` of the data.

  Returns:
    The float32 CSR matrix; its column layout depends on the schema only, so
    train, eval and test matrices line up.
  """
  n = len(columns[schema.labels[0]])
  blocks = []
  for f in schema.serving_features:
    if f.kind == schema_lib.CATEGORICAL:
      ids = metrics.item_rows(columns[f.name], f)
      blocks.append(sparse.csr_matrix((np.ones(n, np.float32), (np.arange(n), ids)),
                                      shape=(n, f.num_embedding_rows)))
    elif f.kind == schema_lib.CATEGORICAL_LIST:
      lists = np.asarray(columns[f.name])
      row, slot = np.nonzero(lists != schema_lib.LIST_PADDING_ID)
      ids = metrics.item_rows(lists[row, slot], f)
      matrix = sparse.csr_matrix((np.ones(len(ids), np.float32), (row, ids)),
                                 shape=(n, f.num_embedding_rows))
      matrix.sum_duplicates()
      matrix.data[:] = 1.0  # an id listed twice is still one
      blocks.append(matrix)
    else:
      values = np.asarray(columns[f.name], np.float64)
      if f.transform == "log1p":
        values = np.sign(values) * np.log1p(np.abs(values))
      standardized = (values - f.mean) / f.std
      # Missing (NaN) is the mean; an infinite value saturates, as in the models.
      standardized = np.clip(np.nan_to_num(standardized, nan=0.0), -1e3, 1e3)
      blocks.append(sparse.csr_matrix(standardized.astype(np.float32)[:, None]))
  return sparse.hstack(blocks, format="csr")


def task_rows(task: schema_lib.Task, columns: Dict[str, np.ndarray]
              ) -> Tuple[np.ndarray, np.ndarray]:
  """(rows the task learns from: its mask is 1, or all; their 0/1 labels)."""
  label = np.asarray(columns[task.label], np.float64)
  keep = (np.asarray(columns[task.mask]) > 0.5 if task.mask
          else np.ones(label.size, bool))
  return keep, label[keep]


def fit_task(task: schema_lib.Task, splits: Dict[str, Tuple[sparse.csr_matrix, dict]],
             cs: List[float], max_iter: int) -> dict:
  """Fits one logistic regression per C on the train split; keeps the C with
  the best eval AUC; its eval (and test) AUC and log-loss.

  Args:
    task: a binary task.
    splits: "train", "eval" and optionally "test" -> (design matrix, columns).
    cs: the C values to try.
    max_iter: L-BFGS iterations per fit.

  Returns:
    {"C", "eval_auc", "eval_logloss", ["test_auc", "test_logloss"], "tried":
    {C: eval AUC}, "train_examples"}.

  Raises:
    metrics.MetricError: a split has no positive (or negative) example for the task.
  """
  from sklearn.linear_model import LogisticRegression  # the `baseline` extra
  where = (f" where {task.mask} is 1" if task.mask else "") + f" (task {task.name})"
  data = {}
  for split, (matrix, columns) in splits.items():
    keep, y = task_rows(task, columns)
    data[split] = (matrix[keep], y)
  x, y = data["train"]
  if len(np.unique(y)) < 2:
    raise metrics.MetricError(f"{task.label} has one class in the training data{where}; "
                              "nothing to fit.")
  best, tried = None, {}
  for c in cs:
    model = LogisticRegression(C=c, max_iter=max_iter).fit(x, y)
    p = model.predict_proba(data["eval"][0])[:, 1]
    tried[c] = metrics.reported_auc(data["eval"][1], p, task.label, where)
    if best is None or tried[c] > tried[best[0]]:
      best = (c, model)
  c, model = best
  result = {"C": c, "train_examples": int(y.size), "tried": {str(k): v for k, v in tried.items()}}
  for split in ("eval", "test"):
    if split in data:
      x_split, y_split = data[split]
      p = model.predict_proba(x_split)[:, 1]
      result[f"{split}_auc"] = metrics.reported_auc(y_split, p, task.label, where)
      result[f"{split}_logloss"] = metrics.log_loss(y_split, p)
  return result


def resolve_files() -> Tuple[Dict[str, str], schema_lib.Schema]:
  """Split -> file glob from the flags, and the schema."""
  if FLAGS.data_dir:
    patterns = {s: files.join(FLAGS.data_dir, f"{s}-*") for s in ("train", "eval", "test")}
    if FLAGS.test_files:
      patterns["test"] = FLAGS.test_files
    elif not tf.io.gfile.glob(patterns["test"]):
      del patterns["test"]
  else:
    if not (FLAGS.train_files and FLAGS.eval_files):
      raise app.UsageError("give --data_dir, or --train_files and --eval_files (C is tuned "
                           "on the eval files).")
    patterns = {"train": FLAGS.train_files, "eval": FLAGS.eval_files}
    if FLAGS.test_files:
      patterns["test"] = FLAGS.test_files
  schema_path = FLAGS.schema or FLAGS.data_dir or os.path.dirname(
      shards.list_files(patterns["train"])[0])
  return patterns, schema_lib.Schema.load(schema_path)


def run(patterns: Dict[str, str], schema: schema_lib.Schema, cs: List[float],
        max_iter: int) -> Dict[str, dict]:
  """Task name -> `fit_task` result, for every binary task of `schema`."""
  schema.require_statistics()
  splits = {}
  for split, pattern in patterns.items():
    columns = reader.read_columns(pattern, schema)
    splits[split] = (design_matrix(schema, columns), columns)
  tasks = [t for t in schema.tasks if t.type == schema_lib.BINARY and not t.events]
  if not tasks:
    raise app.UsageError(f"schema {schema.name!r} has no binary task; its tasks are "
                         f"{schema.task_names}.")
  return {t.name: fit_task(t, splits, cs, max_iter) for t in tasks}


def main(argv):
  del argv
  try:
    cs = [float(c) for c in FLAGS.Cs]
  except ValueError:
    raise app.UsageError(f"--Cs takes comma-separated numbers, got {FLAGS.Cs}.") from None
  patterns, schema = resolve_files()
  start = time.perf_counter()
  try:
    results = run(patterns, schema, cs, FLAGS.max_iter)
  except metrics.MetricError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  seconds = time.perf_counter() - start
  columns = ["C", "eval_auc", "eval_logloss"] + (
      ["test_auc", "test_logloss"] if "test" in patterns else []) + ["train_examples"]
  print(f"Logistic regression per task on {schema.name} ({', '.join(patterns.values())}); "
        f"C tuned on eval over {cs}; {seconds:.1f} s.")
  print(metrics.format_table(results, columns))
  if FLAGS.output:
    files.write_json(FLAGS.output, {"files": patterns, "Cs": cs, "seconds": seconds,
                                    "tasks": results})
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
