"""Write TFRecords + schema.json from a data source.

  python -m pipelines.convert --source=synthetic --out_dir=data/ads
  python -m pipelines.convert --source=census --census_dir=../shared/data/census-income \
      --out_dir=data/census_group1 --census_group=1
  python -m pipelines.convert --source=csv --csv_schema=my_schema.json \
      --csv=train:data/train.csv,eval:data/eval.csv --out_dir=data/mine

Train on the result with
  python -m mtl_zoo.train --train_files='<out_dir>/train-*' --eval_files='<out_dir>/eval-*'
"""

import sys

from absl import app, flags

from pipelines.datasets import census, csv_source, synthetic_ads

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, ["synthetic", "census", "csv"], "Where the data comes from.")
flags.DEFINE_string("out_dir", None, "Directory to create with the shards and schema.json.")
flags.DEFINE_integer("num_shards", 4, "Shards of the training split.", lower_bound=1)
flags.DEFINE_enum("compression", "none", ["none", "gzip"], "TFRecord compression.")
flags.DEFINE_boolean("overwrite", False, "Replace --out_dir (only once the new data is "
                     "complete).")
flags.DEFINE_integer("seed", 0, "Seed for generated data and random splits.")
flags.DEFINE_integer("synthetic_requests", 12_000, "synthetic: training requests (10 "
                     "impressions each); eval gets a quarter as many.", lower_bound=1)
flags.DEFINE_string("census_dir", "../shared/data/census-income",
                    "census: folder with census-income.data.gz and census-income.test.gz.")
flags.DEFINE_integer("census_group", 1, "census: 1 (income, marital) or 2 (education, "
                     "marital), as in the MMoE paper.")
flags.DEFINE_string("csv_schema", None, "csv: schema template JSON (see "
                    "pipelines/datasets/csv_source.py).")
flags.DEFINE_list("csv", None, "csv: split:path pairs; the first split gives vocabularies "
                  "and statistics.")
flags.mark_flags_as_required(["source", "out_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}.")
  compression = "GZIP" if FLAGS.compression == "gzip" else None
  common = dict(num_shards=FLAGS.num_shards, compression=compression,
                overwrite=FLAGS.overwrite)
  try:
    if FLAGS.source == "synthetic":
      schema = synthetic_ads.write(FLAGS.out_dir, num_train_requests=FLAGS.synthetic_requests,
                                   num_eval_requests=max(1, FLAGS.synthetic_requests // 4),
                                   seed=FLAGS.seed, **common)
    elif FLAGS.source == "census":
      schema = census.write(FLAGS.census_dir, FLAGS.out_dir, FLAGS.census_group,
                            seed=FLAGS.seed, **common)
    else:
      if not FLAGS.csv_schema or not FLAGS.csv:
        raise app.UsageError("--source=csv needs --csv_schema and --csv=split:path,...")
      splits = []
      for item in FLAGS.csv:
        name, sep, path = item.partition(":")
        if not sep or not name or not path:
          raise app.UsageError(f"--csv entries look like train:path.csv, got {item!r}.")
        splits.append((name, path))
      schema = csv_source.convert(csv_source.load_template(FLAGS.csv_schema), splits,
                                  FLAGS.out_dir, **common)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {FLAGS.out_dir}: features {schema.feature_names}, tasks {schema.task_names}")


if __name__ == "__main__":
  app.run(main)
