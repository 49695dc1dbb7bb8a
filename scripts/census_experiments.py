"""Census-Income comparisons: every architecture, or MMoE with every loss weighting.

  python scripts/census_experiments.py --experiment=architectures --group=1
  python scripts/census_experiments.py --experiment=architectures --group=2
  python scripts/census_experiments.py --experiment=weighting --group=1

Each cell: --seeds runs with the same settings for every model (12 epochs, batch
2048, Adam lr 4e-3, 8 experts of 16 units, towers of 8; builders' defaults
otherwise; no per-model tuning). Reports test AUC mean ± std per task, writes
results/census_group<g>_<experiment>.md/.json/.png.
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import balancers, experiments, models  # noqa: E402  (pins Keras 2 first)
from pipelines import files  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "architectures", ["architectures", "weighting"],
                  "What to compare.")
flags.DEFINE_integer("group", 1, "MMoE paper task group: 1 or 2.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_list("models", None, "Architectures (default: every one the data supports).")
flags.DEFINE_integer("epochs", 12, "Epochs.")
flags.DEFINE_integer("batch_size", 2048, "Batch size.")
flags.DEFINE_float("learning_rate", 4e-3, "Adam learning rate.")
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", None, "TFRecords (default mtl_zoo_output/data/"
                    "census_group<group>, written on first use).")
flags.DEFINE_string("out_dir", "results", "Where the table, JSON and plot go.")

HPARAMS = {"num_experts": 8, "expert_units": [16], "tower_units": [8]}


def plot(table: dict, tasks: list, path: str, title: str) -> None:
  import matplotlib  # plotting only: an optional dependency of the scripts
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4))
  for ax, task in zip(np.atleast_1d(axes), tasks):
    names = list(table)
    means = [table[n][task]["mean"] for n in names]
    stds = [table[n][task]["std"] for n in names]
    ax.barh(names, means, xerr=stds, color="tab:blue", alpha=0.7)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(low - 0.002, max(m + s for m, s in zip(means, stds)) + 0.002)
    ax.set_title(f"{task}: test AUC (mean ± std)")
    ax.invert_yaxis()
  fig.suptitle(title)
  fig.tight_layout()
  with files.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or os.path.join("mtl_zoo_output", "data",
                                            f"census_group{FLAGS.group}")
  schema = SOURCES["census"].write_if_missing(data_dir, census_dir=FLAGS.census_dir,
                                                census_group=FLAGS.group)
  if FLAGS.experiment == "architectures":
    names = FLAGS.models or [m for m in models.MODELS if m not in models.TRAINING_SCHEMAS]
    cells = [(name, name, "fixed") for name in names]
  else:
    cells = [(method, "mmoe", method) for method in balancers.BALANCERS]
  splits = {s: os.path.join(data_dir, f"{s}-*") for s in ("validation", "test")}
  runs, table = [], {}
  for label, model_name, method in cells:
    per_task = {t: [] for t in schema.task_names}
    for seed in (int(s) for s in FLAGS.seeds):
      result = experiments.run_trial(schema, os.path.join(data_dir, "train-*"), splits,
                                     model_name, models.hyperparameters_of(model_name, HPARAMS),
                                     FLAGS.epochs, FLAGS.batch_size,
                                     FLAGS.learning_rate, seed, weighting=method)
      runs.append(result)
      for t in schema.task_names:
        per_task[t].append(result["metrics"]["test"][t]["auc"])
      print(f"{label} seed {seed}: " + ", ".join(
          f"{t} {per_task[t][-1]:.4f}" for t in schema.task_names)
          + f" ({result['train_seconds']:.0f}s)", flush=True)
    table[label] = {t: experiments.mean_interval(v) for t, v in per_task.items()}

  title = (f"Census-Income group {FLAGS.group}, {FLAGS.experiment}: test AUC over "
           f"{len(FLAGS.seeds)} seeds")
  lines = [f"# {title}\n", f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, lr "
           f"{FLAGS.learning_rate}, {HPARAMS} (builder defaults otherwise).\n",
           "| " + ("weighting (MMoE)" if FLAGS.experiment == "weighting" else "model") + " | "
           + " | ".join(f"{t} AUC" for t in schema.task_names) + " |",
           "|---|" + "---|" * len(schema.task_names)]
  for label, stats in table.items():
    lines.append(f"| {label} | " + " | ".join(
        f"{stats[t]['mean']:.4f} ± {stats[t]['std']:.4f}" for t in schema.task_names) + " |")
  if FLAGS.experiment == "architectures" and "esmm" not in table:
    lines.append("\nesmm is not run: census tasks form no funnel (no task is masked by "
                 "another's label).")
  text = "\n".join(lines)
  print("\n" + text)
  out = os.path.join(FLAGS.out_dir, f"census_group{FLAGS.group}_{FLAGS.experiment}")
  files.write_text(out + ".md", text + "\n")
  files.write_json(out + ".json", {"hyperparameters": HPARAMS, "epochs": FLAGS.epochs,
                                   "batch_size": FLAGS.batch_size,
                                   "learning_rate": FLAGS.learning_rate, "runs": runs})
  plot(table, schema.task_names, out + ".png", title)
  print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
  app.run(main)
