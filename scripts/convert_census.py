"""Convert UCI Census-Income (KDD) to TFRecords + schema.json, MMoE-paper setup.

  python scripts/convert_census.py                                  # Group 1, shared data
  python scripts/convert_census.py --census_dir=/path/to/census-income \
      --out_dir=data/census_group2 --group=2

Then: python -m mtl_zoo.train --train_files='<out_dir>/train-*' \
          --eval_files='<out_dir>/validation-*'
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.datasets import census  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with census-income.data.gz and census-income.test.gz.")
flags.DEFINE_string("out_dir", None, "Output folder (default: "
                    "mtl_zoo_output/data/census_group<group>).")
flags.DEFINE_integer("group", 1, "1: income + never married; 2: education + never married.")
flags.DEFINE_integer("seed", 0, "Seed of the validation/test split.")
flags.DEFINE_integer("num_shards", 4, "Training shards.")
flags.DEFINE_boolean("gzip", False, "GZIP-compress the shards.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --out_dir.")


def main(argv):
  del argv
  out_dir = FLAGS.out_dir or os.path.join("mtl_zoo_output", "data",
                                          f"census_group{FLAGS.group}")
  try:
    schema = census.write(FLAGS.census_dir, out_dir, FLAGS.group, seed=FLAGS.seed,
                          num_shards=FLAGS.num_shards,
                          compression="GZIP" if FLAGS.gzip else None,
                          overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {out_dir} (train, validation, test) with tasks {schema.task_names}")


if __name__ == "__main__":
  app.run(main)
