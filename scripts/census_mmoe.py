"""MMoE on UCI Census-Income (KDD), MMoE-paper Group 1 (or 2): prints test AUC per task.

  python scripts/census_mmoe.py                       # Group 1, 3 seeds
  python scripts/census_mmoe.py --census_dir=/data/census-income --group=2 --seeds=0

Converts the raw files to TFRecords on first use (under --data_dir), then for each
seed trains on the training split and reports exact AUC on the validation half
(what settings were chosen by) and the test half of the census test file.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (pins Keras 2 first)
from mtl_zoo import metrics, models  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines.datasets import census  # noqa: E402

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
  schema = models.training_schema(
      FLAGS.model, census.write_if_missing(FLAGS.census_dir, data_dir, FLAGS.group))
  hparams = dict(num_experts=FLAGS.num_experts,
                 expert_units=[int(u) for u in FLAGS.expert_units],
                 tower_units=[int(u) for u in FLAGS.tower_units],
                 bottom_units=[int(u) for u in FLAGS.bottom_units])
  heldout = {split: reader.make_dataset(os.path.join(data_dir, f"{split}-*"), schema, 8192,
                                       shuffle=False)
             for split in ("validation", "test")}
  rows = []
  for seed in (int(s) for s in FLAGS.seeds):
    mtl_zoo.keras.utils.set_random_seed(seed)
    model = models.build(FLAGS.model, schema, **hparams)
    models.compile_model(model, schema, learning_rate=FLAGS.learning_rate)
    train = reader.make_dataset(os.path.join(data_dir, "train-*"), schema,
                                FLAGS.batch_size, seed=seed)
    start = time.perf_counter()
    model.fit(train, epochs=FLAGS.epochs, verbose=0)
    seconds = time.perf_counter() - start
    predict = metrics.predict_function(model)
    aucs = {split: [metrics.evaluate(model, schema, ds, predict)[t]["auc"]
                    for t in schema.task_names] for split, ds in heldout.items()}
    rows.append(aucs)
    print(f"seed {seed}: " + "; ".join(
        f"{split} AUC " + ", ".join(f"{t} {a:.4f}" for t, a in zip(schema.task_names, v))
        for split, v in aucs.items()) + f" ({seconds:.1f}s training)", flush=True)
  print(f"\n{FLAGS.model} on census group {FLAGS.group}, {len(rows)} seeds, "
        f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, lr {FLAGS.learning_rate}, "
        f"{models.hyperparameters_of(FLAGS.model, hparams)}")
  print("| task | split | mean AUC | min | max |\n|---|---|---|---|---|")
  for i, task in enumerate(schema.task_names):
    for split in heldout:
      values = [r[split][i] for r in rows]
      print(f"| {task} | {split} | {sum(values) / len(values):.4f} | {min(values):.4f} | "
            f"{max(values):.4f} |")


if __name__ == "__main__":
  app.run(main)
