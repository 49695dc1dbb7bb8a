"""Write TFRecords + schema.json + manifest.json from a data source (pipelines.sources).

  python -m pipelines.convert --source=synthetic --out_dir=data/ads
  python -m pipelines.convert --source=census --census_dir=../shared/data/census-income \\
      --out_dir=data/census_group1 --census_group=1
  python -m pipelines.convert --source=csv --csv_schema=my_schema.json \\
      --csv='train:data/train-*.csv,eval:data/eval.csv' --out_dir=data/mine

Every source in SOURCES is a --source; the flags of its options are defined from
its option table, and a source's flag given with another --source is refused.
Train on the result with
  python -m mtl_zoo.train --train_files='<out_dir>/train-*' --eval_files='<out_dir>/eval-*'
"""

import sys
import time
from typing import Any, Dict, List, Tuple

from absl import app, flags

from pipelines.sources import SOURCES, Option

FLAGS = flags.FLAGS
# Option type -> the absl flag that parses it.
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
           bool: flags.DEFINE_boolean, list: flags.DEFINE_list}


def define_flags() -> None:
  """The common flags, then one flag per source option (each option once)."""
  flags.DEFINE_enum("source", None, sorted(SOURCES), "Where the data comes from: " + "; ".join(
      f"{name}: {SOURCES[name].description}" for name in sorted(SOURCES)) + ".")
  flags.DEFINE_string("out_dir", None, "Directory to create with the shards, schema.json "
                      "and manifest.json.")
  flags.DEFINE_integer("num_shards", 4, "Shards of the training split.", lower_bound=1)
  flags.DEFINE_enum("compression", "none", ["none", "gzip"], "TFRecord compression.")
  flags.DEFINE_boolean("overwrite", False, "Replace --out_dir (only once the new data is "
                       "complete).")
  flags.DEFINE_integer("seed", 0, "Seed for generated data and random splits.")
  for _, option in source_options():
    bound = {} if option.lower_bound is None else {"lower_bound": option.lower_bound}
    _DEFINE[option.type](option.name, option.default, option.help, **bound)
  flags.mark_flags_as_required(["source", "out_dir"])


def source_options() -> List[Tuple[str, Option]]:
  """(source name, option) of every source's options, in SOURCES order.

  Raises:
    ValueError: two sources declare an option of the same name (one flag each).
  """
  found = []
  for name, source in SOURCES.items():
    for option in source.options:
      other = next((owner for owner, o in found if o.name == option.name), None)
      if other is not None:
        raise ValueError(f"sources {other!r} and {name!r} both declare option "
                         f"{option.name!r}; an option is one flag, so prefix it with the "
                         "source's name.")
      found.append((name, option))
  return found


def chosen_options(source: str) -> Dict[str, Any]:
  """The chosen source's option values from the flags.

  Raises:
    app.UsageError: an option flag of another source was given.
  """
  for owner, option in source_options():
    if owner != source and FLAGS[option.name].present:
      raise app.UsageError(f"--{option.name} belongs to --source={owner}; it does not "
                           f"apply to --source={source}.")
  return {option.name: FLAGS[option.name].value for option in SOURCES[source].options}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}.")
  options = chosen_options(FLAGS.source)
  start = time.perf_counter()
  try:
    schema = SOURCES[FLAGS.source].write(
        FLAGS.out_dir, num_shards=FLAGS.num_shards,
        compression="GZIP" if FLAGS.compression == "gzip" else None,
        overwrite=FLAGS.overwrite, seed=FLAGS.seed, **options)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {FLAGS.out_dir} in {time.perf_counter() - start:.1f}s: features "
        f"{schema.feature_names}, tasks {schema.task_names}")


define_flags()

if __name__ == "__main__":
  app.run(main)
