"""Choose fusion weights: score eval data once, then try weight candidates.

For each candidate the fused score is ranked against every objective
(`mtl_zoo.strategies.objective_report`: per-task AUC, CTCVR AUC, GAUC,
NDCG@k) and the Pareto front over the chosen objectives is printed: the
candidates no other candidate beats on every objective at once. Picking a point
on the front is a business decision; the tool shows what each costs.

  python -m mtl_zoo.fusion_search --saved_model=mtl_zoo_output/export/fusion/<version> \\
      --eval_files='mtl_zoo_output/data/synthetic-v3-seed0/eval-*' \\
      --fusion=product:ctr,cvr,price --grid=0,0.5,1,2 --output=fusion_search.csv

The first term's weight is held at 1: scaling every weight by the same factor
does not change any ranking (for a product it raises the score to a power, for
a sum it multiplies it), so only the ratios matter.
"""

import csv
import itertools
import posixpath
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from mtl_zoo import layers  # importing mtl_zoo pins Keras 2 first
from mtl_zoo import metrics as metrics_lib
from mtl_zoo import serving, strategies
from pipelines import files
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import shards


def grid_candidates(num_terms: int, values: Sequence[float]) -> List[tuple]:
  """Every combination of `values` for the terms after the first (weight 1)."""
  return [(1.0,) + combo for combo in itertools.product(values, repeat=num_terms - 1)]


def random_candidates(num_terms: int, count: int, low: float = 0.0, high: float = 2.0,
                      seed: int = 0) -> List[tuple]:
  """`count` candidates with the later terms' weights uniform in [low, high]."""
  rng = np.random.default_rng(seed)
  return [(1.0,) + tuple(float(w) for w in rng.uniform(low, high, num_terms - 1))
          for _ in range(count)]


def search(outputs: Dict[str, np.ndarray], columns: Dict[str, np.ndarray],
           schema: schema_lib.Schema, mode: str, terms: Sequence[str],
           candidates: Sequence[Sequence[float]], k: int = 10) -> List[dict]:
  """One row per candidate: its weights (`w_<term>`) and its objective report."""
  rows = []
  for weights in candidates:
    fusion = {"mode": mode, "terms": list(terms), "weights": list(weights)}
    score = strategies.ranking_score(outputs, columns, fusion, schema)
    row = {f"w_{t}": float(w) for t, w in zip(terms, weights)}
    row.update(strategies.objective_report(score, columns, schema, k))
    rows.append(row)
  return rows


def pareto_front(rows: Sequence[dict], objectives: Sequence[str]) -> List[dict]:
  """The rows that no other row matches or beats on every objective while
  beating on at least one (all objectives: higher is better)."""
  def dominates(a, b):
    return (all(a[o] >= b[o] for o in objectives)
            and any(a[o] > b[o] for o in objectives))
  return [r for r in rows if not any(dominates(other, r) for other in rows)]


def format_rows(rows: Sequence[dict], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float)
                                    else str(row[c]) for c in columns) + " |")
  return "\n".join(lines)


def load_eval(saved_model: str, eval_files: str, schema_path: Optional[str] = None,
              limit: Optional[int] = None):
  """(outputs, columns, schema): the SavedModel's outputs on the eval shards."""
  schema = schema_lib.Schema.load(
      schema_path or files.join(posixpath.dirname(shards.list_files(eval_files)[0]),
                                schema_lib.SCHEMA_FILENAME))
  loaded = tf.saved_model.load(saved_model)
  columns = reader.read_columns(eval_files, schema, limit=limit)
  outputs = metrics_lib.predict_columns(loaded.signatures[serving.FEATURES_SIGNATURE], schema,
                                        columns)
  return outputs, columns, schema


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  """Writes `rows` (e.g. `search`'s) as CSV with `columns`, atomically, on any
  filesystem TensorFlow supports.

  Args:
    path: the CSV file to write.
    rows: dicts whose keys are `columns`.
    columns: the header, in order.
  """
  with files.atomic_open(path) as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)


def _main(argv):
  from absl import app, flags
  if argv[1:]:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
  FLAGS = flags.FLAGS
  mode, sep, body = FLAGS.fusion.partition(":")
  terms = [t.strip() for t in body.split(",") if t.strip()]
  if not sep or mode not in layers.FUSION_MODES or not terms:
    raise app.UsageError(f"--fusion should look like 'product:ctr,cvr,price', got "
                         f"{FLAGS.fusion!r}.")
  try:
    grid = [float(v) for v in FLAGS.grid]
  except ValueError:
    raise app.UsageError(f"--grid takes comma-separated numbers, got {FLAGS.grid}.") from None
  try:
    outputs, columns, schema = load_eval(FLAGS.saved_model, FLAGS.eval_files,
                                         FLAGS.schema, FLAGS.limit)
  except (FileNotFoundError, OSError, schema_lib.SchemaError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  unknown = [t for t in terms if t not in outputs and t not in columns]
  if unknown:
    raise app.UsageError(f"--fusion terms {unknown} are neither outputs {sorted(outputs)} "
                         "of the SavedModel nor numeric columns of the eval data.")
  candidates = (random_candidates(len(terms), FLAGS.random, 0.0, FLAGS.random_max,
                                  FLAGS.seed)
                if FLAGS.random else grid_candidates(len(terms), grid))
  try:
    rows = search(outputs, columns, schema, mode, terms, candidates, FLAGS.k)
  except metrics_lib.MetricError as e:
    print(f"error: --eval_files={FLAGS.eval_files}: {e}", file=sys.stderr)
    sys.exit(1)
  report_columns = [c for c in rows[0] if not c.startswith("w_")]
  objectives = FLAGS.objectives or [c for c in report_columns if c.endswith("_auc")
                                    and not c.endswith("_entire_auc")]
  missing = [o for o in objectives if o not in report_columns]
  if missing:
    raise app.UsageError(f"--objectives {missing} are not report columns "
                         f"{report_columns}.")
  weight_columns = [f"w_{t}" for t in terms]
  print(f"{len(rows)} candidates ({mode} of {', '.join(terms)}) on "
        f"{len(columns[schema.labels[0]])} eval examples:\n")
  print(format_rows(rows, weight_columns + report_columns))
  front = sorted(pareto_front(rows, objectives), key=lambda r: -r[objectives[0]])
  print(f"\nPareto front over {', '.join(objectives)} ({len(front)} candidates):\n")
  print(format_rows(front, weight_columns + objectives))
  if FLAGS.output:
    write_csv(FLAGS.output, rows, weight_columns + report_columns)
    print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("saved_model", None, "An exported version directory (any model "
                      "whose outputs include the fusion's task terms).", required=True)
  flags.DEFINE_string("eval_files", None, "Glob of training-layout eval shards with labels.",
                      required=True)
  flags.DEFINE_string("schema", None, "The data's schema.json (default: beside the shards).")
  flags.DEFINE_string("fusion", "product:ctr,cvr", "mode:term,term,... (task outputs or "
                      "numeric features such as price).")
  flags.DEFINE_list("grid", ["0", "0.25", "0.5", "1", "2", "4"], "Weights tried for each "
                    "term after the first.")
  flags.DEFINE_integer("random", 0, "Instead of the grid, this many random candidates "
                       "(weights uniform in [0, --random_max]).", lower_bound=0)
  flags.DEFINE_float("random_max", 2.0, "Upper bound of random weights.", lower_bound=0.0)
  flags.DEFINE_integer("seed", 0, "Seed of the random candidates.")
  flags.DEFINE_list("objectives", None, "Report columns the Pareto front is taken over "
                    "(default: every task's AUC on its own examples).")
  flags.DEFINE_integer("k", 10, "NDCG cut-off.", lower_bound=1)
  flags.DEFINE_integer("limit", None, "Use only the first N eval records.", lower_bound=1)
  flags.DEFINE_string("output", None, "Also write every candidate's row to this CSV.")
  app.run(_main)
