"""Regularisation defaults chosen on a realistic sparse log, not on census alone.

Trains MMoE with the train CLI's defaults on the built-in synthetic ads log
(Zipf users and items, position bias, click-bait) over a grid of embedding L2,
learning rate and dropout, with early stopping on the eval split (validation);
prints each setting's validation metrics and, for the best by the monitor,
its metrics on the held-out calibration split (never used for choosing).

  python scripts/choose_defaults.py                          # 120k impressions
  python scripts/choose_defaults.py --synthetic_requests=100000   # 1M
"""

import itertools
import json
import os
import tempfile

from absl import app, flags

from mtl_zoo import metrics, runner
from mtl_zoo.config import RunConfig
from pipelines import files
from pipelines import reader

flags.DEFINE_integer("synthetic_requests", 12_000, "Training requests (10 impressions).")
flags.DEFINE_list("embeddings_l2", ["0", "1e-5", "3e-5", "1e-4"], "Grid of --embeddings_l2.")
flags.DEFINE_list("learning_rate", ["2e-3", "1e-3"], "Grid of --learning_rate.")
flags.DEFINE_list("dropout", ["0", "0.2"], "Grid of --dropout.")
flags.DEFINE_string("output_dir", None, "Where the data is written (default: a temp dir).")
flags.DEFINE_string("output", None, "Also write the table as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  output_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="mtl_zoo-defaults-")
  source_options = {"synthetic_requests": FLAGS.synthetic_requests}
  rows = []
  for l2, lr, dropout in itertools.product(FLAGS.embeddings_l2, FLAGS.learning_rate,
                                           FLAGS.dropout):
    result = runner.run(RunConfig(
        output_dir=output_dir, export_dir="", source_options=source_options, quiet=True,
        learning_rate=float(lr), learning_rate_decay_steps=0,  # the grid's constant rates
        hyperparameters={"embeddings_l2": float(l2), "dropout": float(dropout)}))
    summary = result.summary
    row = {"embeddings_l2": float(l2), "learning_rate": float(lr),
           "dropout": float(dropout), "best_epoch": summary["monitor"]["best_epoch"],
           "monitor": max(summary["monitor"]["values"]),
           "train_seconds": summary["train_seconds"]}
    for task, values in summary["eval"].items():
      row.update({f"{task}_{k}": values[k] for k in ("auc", "logloss", "ne")})
    rows.append((row, result))
    print(json.dumps(row), flush=True)
  best_row, best = max(rows, key=lambda r: r[0]["monitor"])
  data_dir = os.path.dirname(best.summary["train_files"])
  held_out = metrics.evaluate(
      best.model, best.schema,
      reader.make_dataset(os.path.join(data_dir, "calibration-*"), best.schema, 8192,
                          shuffle=False))
  columns = ["embeddings_l2", "learning_rate", "dropout", "best_epoch", "ctr_auc",
             "ctr_logloss", "ctr_ne", "cvr_auc", "cvr_logloss", "cvr_ne", "train_seconds"]
  print(f"\nMMoE on the synthetic log ({FLAGS.synthetic_requests * 10:,} training "
        "impressions), early stopping on eval (validation):")
  print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
  for row, _ in rows:
    print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                            for c in columns) + " |")
  print(f"\nBest by the monitor: embeddings_l2={best_row['embeddings_l2']:g}, "
        f"learning_rate={best_row['learning_rate']:g}, dropout={best_row['dropout']:g}; "
        "on the held-out calibration split: "
        + ", ".join(f"{t} AUC {v['auc']:.4f} log-loss {v['logloss']:.4f} NE {v['ne']:.4f}"
                    for t, v in held_out.items()))
  if FLAGS.output:
    files.write_json(FLAGS.output, {"rows": [r for r, _ in rows], "best": best_row,
                                    "held_out": held_out})


if __name__ == "__main__":
  app.run(main)
