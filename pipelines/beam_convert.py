"""A data source -> TFRecords + schema.json as an Apache Beam pipeline, for data
that outgrows one machine; the sources of SOURCES that run on Beam (CSV today).

  pip install .[beam]
  python -m pipelines.beam_convert --csv_schema=my_schema.json \\
      --csv='train:data/train-*.csv,eval:data/eval.csv' --out_dir=data/mine
  # the same pipeline on Dataflow (or --runner=FlinkRunner / SparkRunner):
  python -m pipelines.beam_convert --csv_schema=my_schema.json \\
      --csv='train:gs://b/raw/train-*.csv' --out_dir=gs://b/data/mine \\
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp \\
      --setup_file=./setup.py

It is `python -m pipelines.convert --source=<source>` spread over workers and
writes the same records and the same schema (`Source.build_beam`). Flags other
than those below are Beam pipeline options, passed to the runner unchanged.

Publishing is atomic like pipelines.writer's: the pipeline writes into a hidden
temporary directory beside --out_dir (Beam's own sinks write shards to temporary
names and rename them), writes schema.json last, only once every shard is
final, and only after the whole pipeline succeeded is the directory moved into
place (`files.publish_directory`, schema.json marking completion); a failed run
leaves any previous dataset untouched.
"""

import argparse
import sys
from typing import Optional, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipelines import files
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import SOURCES


# Option type -> what parses its flag (lists stay comma-separated strings, as
# Option.check takes them).
_ARGUMENT_TYPES = {int: int, float: float, str: str, list: str,
                   bool: lambda text: text.lower() in ("1", "true", "yes")}


def beam_sources() -> list:
  """The names of the sources that run on Beam."""
  return sorted(name for name, source in SOURCES.items() if source.runs_on_beam)


def _all_options() -> dict:
  """Option name -> the source that takes it, over every source."""
  return {option.name: name for name, source in SOURCES.items() for option in source.options}


def convert(source: str, out_dir: str, *, num_shards: int = 4,
            compression: Optional[str] = None, overwrite: bool = False,
            options: Optional[PipelineOptions] = None, **source_options) -> schema_lib.Schema:
  """Runs a source's conversion on the runner `options` choose and publishes `out_dir`.

  Args:
    source: a SOURCES name whose source runs on Beam.
    out_dir: the dataset directory to create (local or e.g. gs://).
    num_shards: shards of the training split; 0 lets the runner choose.
    compression: None or "GZIP".
    overwrite: replace an existing `out_dir` once the new data is complete.
    options: Beam pipeline options (default: the DirectRunner).
    **source_options: the source's options (see its `options`).

  Returns:
    The written schema.
  """
  if source not in SOURCES or not SOURCES[source].runs_on_beam:
    raise ValueError(f"source {source!r} does not run on Beam; the sources that do are "
                     f"{beam_sources()}.")
  if compression not in writer_lib.COMPRESSION_SUFFIX:
    raise ValueError(f"compression must be None or 'GZIP', got {compression!r}.")
  values = SOURCES[source].option_values(source_options)
  out_dir = files.absolute(out_dir)
  if tf.io.gfile.exists(out_dir) and not overwrite:
    raise FileExistsError(
        f"{out_dir} already exists; choose another output directory or pass "
        "overwrite=True (--overwrite) to replace it once the new data is complete.")
  with files.atomic_path(out_dir, marker=schema_lib.SCHEMA_FILENAME) as tmp_dir:
    pipeline = beam.Pipeline(options=options or PipelineOptions([]))
    SOURCES[source].build_beam(pipeline, tmp_dir, num_shards=num_shards,
                               compression=compression or None, **values)
    state = pipeline.run().wait_until_finish()
    if state != PipelineState.DONE:
      raise RuntimeError(f"the Beam pipeline ended {state}; {out_dir} is left as it was.")
  return schema_lib.Schema.load(out_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="A data source -> TFRecords + schema.json on Apache Beam. Other flags "
                  "are Beam pipeline options (--runner, --project, --temp_location, ...).")
  parser.add_argument("--source", choices=beam_sources(), default="csv",
                      help="Where the data comes from.")
  parser.add_argument("--out_dir", required=True,
                      help="Directory to create with the shards and schema.json.")
  parser.add_argument("--num_shards", type=int, default=4,
                      help="Shards of the first split; 0 lets the runner choose.")
  parser.add_argument("--compression", choices=["none", "gzip"], default="none",
                      help="TFRecord compression.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace --out_dir (only once the new data is complete).")
  owners = {}
  for name in beam_sources():
    for option in SOURCES[name].options:
      owners[option.name] = name
      parser.add_argument(f"--{option.name}", default=None, help=option.help,
                          type=_ARGUMENT_TYPES[option.type])
  args, beam_args = parser.parse_known_args(argv)
  if args.num_shards < 0:
    parser.error(f"--num_shards must be >= 0, got {args.num_shards}.")
  given = {name: getattr(args, name) for name in owners if getattr(args, name) is not None}
  # A source option among the Beam options would be dropped silently by Beam.
  given.update({arg[2:].split("=", 1)[0]: None for arg in beam_args
                if arg.startswith("--") and arg[2:].split("=", 1)[0] in _all_options()})
  for name in given:
    owner = owners.get(name) or _all_options()[name]
    if owner != args.source:
      parser.error(f"--{name} belongs to --source={owner}; it does not apply to "
                   f"--source={args.source}.")
  try:
    schema = convert(args.source, args.out_dir, num_shards=args.num_shards,
                     compression="GZIP" if args.compression == "gzip" else None,
                     overwrite=args.overwrite, options=PipelineOptions(beam_args), **given)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {args.out_dir}: features {schema.feature_names}, tasks {schema.task_names}")


if __name__ == "__main__":
  main()
