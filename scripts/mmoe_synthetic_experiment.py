"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018, section 3.2).

  python scripts/mmoe_synthetic_experiment.py                # 10 runs per model
  python scripts/mmoe_synthetic_experiment.py --runs=3 --correlations=1.0,0.5

For each task correlation p, one fixed draw of the data (100k training, 20k test
examples, 100 inputs); Shared-Bottom (bottom of 113 units, the paper's
parameter-matched size), OMoE and MMoE (8 experts of 16 units), towers of 8,
all with the same hyper-parameters (no per-model tuning); `--runs` seeds per
model. Reports the final test loss (mean over the two tasks of the test MSE
after the last epoch, as the paper's curves end; no epoch is chosen on the test
data): mean and 95% interval per model and correlation, writes a markdown table,
a JSON of every run and a PNG of test loss vs training steps (mean and 95% band).
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import experiments, models  # noqa: E402  (pins Keras 2 first)
from pipelines import files  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("correlations", ["1.0", "0.9", "0.5"], "Task correlations p.")
flags.DEFINE_list("models", ["shared_bottom", "omoe", "mmoe"], "Architectures.")
flags.DEFINE_integer("runs", 10, "Seeds per model and correlation.")
flags.DEFINE_integer("epochs", 10, "Epochs per run.")
flags.DEFINE_integer("batch_size", 1024, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (same for every model).")
flags.DEFINE_integer("num_train", 100_000, "Training examples per correlation.")
flags.DEFINE_integer("data_seed", 7, "Seed of the data draw (one per correlation).")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "mmoe_synthetic"),
                    "Where the TFRecords go.")
flags.DEFINE_string("out", os.path.join("results", "mmoe_synthetic"),
                    "Output prefix for .md, .json and .png.")

HPARAMS = {"num_experts": 8, "expert_units": [16], "tower_units": [8], "bottom_units": [113]}


def test_loss(result_metrics: dict) -> float:
  """The mean over the tasks of their MSE."""
  return float(np.mean([m["mse"] for m in result_metrics.values()]))


def final_test_loss(run: dict) -> float:
  """The test loss after the run's last epoch (its curve's last point). The
  run's own "metrics" are of the epoch the runner kept, the best by its eval
  data, which here is the test split: reporting them would select on test."""
  return test_loss(run["curve"][-1]["metrics"])


def plot(runs: list, path: str) -> None:
  import matplotlib  # plotting only: an optional dependency of the scripts
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  correlations = FLAGS.correlations
  fig, axes = plt.subplots(1, len(correlations), figsize=(5 * len(correlations), 4),
                           sharey=True)
  for ax, p in zip(np.atleast_1d(axes), correlations):
    for model in FLAGS.models:
      curves = [r["curve"] for r in runs if r["correlation"] == p and r["model"] == model]
      steps = [point["step"] for point in curves[0]]
      losses = np.array([[test_loss(point["metrics"]) for point in c] for c in curves])
      stats = [experiments.mean_interval(losses[:, i]) for i in range(len(steps))]
      mean = np.array([s["mean"] for s in stats])
      half = np.nan_to_num(np.array([s["ci95"] for s in stats]))
      ax.plot(steps, mean, label=model)
      ax.fill_between(steps, mean - half, mean + half, alpha=0.25)
    ax.set_title(f"task correlation {p}")
    ax.set_xlabel("training steps")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("test loss (mean task MSE)")
  np.atleast_1d(axes)[0].legend()
  fig.tight_layout()
  with files.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)


def main(argv):
  del argv
  runs = []
  for p in FLAGS.correlations:
    data_dir = os.path.join(FLAGS.data_dir, f"p{p}-seed{FLAGS.data_seed}-n{FLAGS.num_train}")
    if not os.path.exists(os.path.join(data_dir, schema_lib.SCHEMA_FILENAME)):
      SOURCES["mmoe_synthetic"].write(data_dir, seed=FLAGS.data_seed, mmoe_correlation=float(p),
                                      mmoe_train_examples=FLAGS.num_train)
    schema = schema_lib.Schema.load(data_dir)
    for model in FLAGS.models:
      for seed in range(FLAGS.runs):
        result = experiments.run_trial(
            schema, os.path.join(data_dir, "train-*"),
            {"test": os.path.join(data_dir, "test-*")}, model,
            models.hyperparameters_of(model, HPARAMS), FLAGS.epochs,
            FLAGS.batch_size, FLAGS.learning_rate, seed, curve_split="test",
            patience=0)
        result["correlation"] = p
        del result["metrics"]  # the best epoch by test loss: see final_test_loss
        runs.append(result)
        print(f"p={p} {model} seed {seed}: test loss "
              f"{final_test_loss(result):.4f}", flush=True)

  lines = ["# MMoE synthetic experiment\n",
           f"{FLAGS.runs} runs per cell, {FLAGS.epochs} epochs, batch {FLAGS.batch_size}, "
           f"lr {FLAGS.learning_rate}, {FLAGS.num_train} training examples, one data draw "
           f"per correlation (seed {FLAGS.data_seed}). Final test loss = mean of the two "
           "tasks' test MSE after the last epoch; mean ± 95% interval of the mean.\n",
           "| correlation | " + " | ".join(FLAGS.models) + " | best |",
           "|---|" + "---|" * (len(FLAGS.models) + 1)]
  summary = {}
  for p in FLAGS.correlations:
    cells = {}
    for model in FLAGS.models:
      values = [final_test_loss(r) for r in runs
                if r["correlation"] == p and r["model"] == model]
      cells[model] = experiments.mean_interval(values)
    summary[p] = cells
    best = min(cells, key=lambda m: cells[m]["mean"])
    lines.append(f"| {p} | " + " | ".join(
        f"{cells[m]['mean']:.4f} ± {cells[m]['ci95']:.4f}" for m in FLAGS.models)
        + f" | {best} |")
  first, last = FLAGS.correlations[0], FLAGS.correlations[-1]
  lines.append(f"\nDegradation from p={first} to p={last} (increase in mean test loss): "
               + ", ".join(f"{m} {summary[last][m]['mean'] - summary[first][m]['mean']:+.4f}"
                           for m in FLAGS.models))
  table = "\n".join(lines)
  print("\n" + table)
  files.write_text(FLAGS.out + ".md", table + "\n")
  settings = {k: FLAGS[k].value for k in ("correlations", "models", "runs", "epochs",
                                          "batch_size", "learning_rate", "num_train",
                                          "data_seed")}
  files.write_json(FLAGS.out + ".json",
                   {"flags": settings, "hyperparameters": HPARAMS, "runs": runs})
  plot(runs, FLAGS.out + ".png")
  print(f"wrote {FLAGS.out}.md, .json, .png")


if __name__ == "__main__":
  app.run(main)
