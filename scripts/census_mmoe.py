"""MMoE on UCI Census-Income (KDD), MMoE-paper Group 1 (or 2): prints test AUC per task.

  python scripts/census_mmoe.py                       # Group 1, 3 seeds
  python scripts/census_mmoe.py --census_dir=/data/census-income --group=2 --seeds=0

Converts the raw files to TFRecords on first use (under --data_dir), then for each
seed trains on the training split and reports exact AUC on the validation half
(what the settings were chosen by) and the test half of the census test file.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import experiments, models  # noqa: E402  (chooses the Keras first)
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with census-income.data.gz and census-income.test.gz.")
flags.DEFINE_string("data_dir", None, "Where the TFRecords go (default: "
                    "mtl_zoo_output/data/census_group<group>).")
flags.DEFINE_integer("group", 1, "MMoE paper task group: 1 or 2.")
flags.DEFINE_enum("model", "mmoe", sorted(models.MODELS), "Architecture.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_integer("epochs", 12, "Epochs.")
flags.DEFINE_integer("batch_size", 2048, "Batch size.")
flags.DEFINE_float("learning_rate", 4e-3, "Adam learning rate.")
flags.DEFINE_integer("num_experts", 8, "Experts.")
flags.DEFINE_list("expert_units", ["16"], "Expert layer sizes.")
flags.DEFINE_list("tower_units", ["8"], "Tower layer sizes.")
flags.DEFINE_list("bottom_units", ["128"], "Shared-bottom layer sizes.")


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or os.path.join("mtl_zoo_output", "data",
                                            f"census_group{FLAGS.group}")
  schema = SOURCES["census"].write_if_missing(data_dir, census_dir=FLAGS.census_dir,
                                                census_group=FLAGS.group)
  hparams = models.hyperparameters_of(FLAGS.model, dict(
      num_experts=FLAGS.num_experts, expert_units=[int(u) for u in FLAGS.expert_units],
      tower_units=[int(u) for u in FLAGS.tower_units],
      bottom_units=[int(u) for u in FLAGS.bottom_units]))
  splits = {s: os.path.join(data_dir, f"{s}-*") for s in ("validation", "test")}
  aucs = {s: {t: [] for t in schema.task_names} for s in splits}
  for seed in (int(s) for s in FLAGS.seeds):
    result = experiments.run_trial(schema, os.path.join(data_dir, "train-*"), splits,
                                   FLAGS.model, hparams, FLAGS.epochs, FLAGS.batch_size,
                                   FLAGS.learning_rate, seed)
    for split, per_task in result["metrics"].items():
      for t in schema.task_names:
        aucs[split][t].append(per_task[t]["auc"])
    print(f"seed {seed}: " + "; ".join(
        f"{split} AUC " + ", ".join(f"{t} {aucs[split][t][-1]:.4f}" for t in schema.task_names)
        for split in splits) + f" ({result['train_seconds']:.1f}s training)", flush=True)
  print(f"\n{FLAGS.model} on census group {FLAGS.group}, {len(FLAGS.seeds)} seeds, "
        f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, lr {FLAGS.learning_rate}, {hparams}")
  print("| task | split | mean AUC | min | max |\n|---|---|---|---|---|")
  for t in schema.task_names:
    for split in splits:
      values = aucs[split][t]
      print(f"| {t} | {split} | {sum(values) / len(values):.4f} | {min(values):.4f} | "
            f"{max(values):.4f} |")


if __name__ == "__main__":
  app.run(main)
