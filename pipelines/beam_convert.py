"""CSV -> TFRecords + schema.json as an Apache Beam pipeline, for data that outgrows one machine.

  pip install .[beam]
  python -m pipelines.beam_convert --csv_schema=my_schema.json \
      --csv='train:data/train-*.csv,eval:data/eval.csv' --out_dir=data/mine
  # the same pipeline on Dataflow (or --runner=FlinkRunner / SparkRunner):
  python -m pipelines.beam_convert --csv_schema=my_schema.json \
      --csv='train:gs://b/raw/train-*.csv' --out_dir=gs://b/data/mine \
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp \
      --setup_file=./setup.py

It is `python -m pipelines.convert --source=csv` spread over workers, and writes
the same records and the same schema: both converters share csv_source's
parsing and encoding and writer's vocabulary order and statistics, and only the
aggregation differs (vocabularies are counted per (feature, string) and merged;
mean/std are merged from per-chunk moments). Records are the same multiset, in
an order and shard assignment that are the runner's. Flags other than those
below are Beam pipeline options, passed to the runner unchanged.

Each split is a file pattern: files are read in parallel and each file's rows
are cut into chunks that are spread over the workers, so a single huge file is
read by one worker but encoded and written by all. The first split gives the
vocabularies and statistics, as in the single-process converter.

Publishing is atomic like pipelines.writer's: the pipeline writes into a hidden
temporary directory beside --out_dir (Beam's own sinks write shards to temporary
names and rename them), writes schema.json last, only once every shard is
final, and only after the whole pipeline succeeded is the directory moved into
place; a failed run leaves any previous dataset untouched.
"""

import argparse
import collections
import io
import os
import shutil
import sys
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio, tfrecordio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.datasets import csv_source

# Rows per chunk: large enough that per-element overhead vanishes next to encoding,
# small enough that a worker holds many chunks at once.
CHUNK_ROWS = 2000

# A chunk of one CSV file: (path, row number of its first row, column -> cells).
Chunk = Tuple[str, int, Dict[str, List[str]]]


class _ReadChunks(beam.DoFn):
  """One CSV file -> chunks of its rows (the needed columns only, as strings)."""

  def __init__(self, needed: Sequence[str], chunk_rows: int):
    self._needed = list(needed)
    self._chunk_rows = chunk_rows

  def process(self, readable_file: fileio.ReadableFile) -> Iterator[Chunk]:
    path = readable_file.metadata.path
    with readable_file.open() as raw:
      rows = csv_source.csv_rows(io.TextIOWrapper(raw, encoding="utf-8", newline=""), path,
                                 self._needed)
      first_row, chunk = 2, []  # row 1 is the header
      for row in rows:
        chunk.append(row)
        if len(chunk) == self._chunk_rows:
          yield self._columns(path, first_row, chunk)
          first_row, chunk = first_row + len(chunk), []
      if chunk:
        yield self._columns(path, first_row, chunk)

  def _columns(self, path: str, first_row: int, rows: List[List[str]]) -> Chunk:
    return path, first_row, {c: [row[i] for row in rows] for i, c in enumerate(self._needed)}


def _count_tokens(chunk: Chunk, features: Dict[str, str], list_separator: str):
  """A chunk -> ((feature, string), count) for every vocabulary string in it."""
  data = chunk[2]
  for name, kind in features.items():
    counts = collections.Counter(csv_source.vocabulary_tokens(kind, data[name],
                                                              list_separator))
    for token, count in counts.items():
      yield (name, token), count


class _VocabulariesFn(beam.CombineFn):
  """((feature, string), total count) -> {feature: vocabulary}, ordered as every
  converter orders it (writer.vocabulary_from_counts)."""

  def __init__(self, names: Sequence[str]):
    self._names = list(names)

  def create_accumulator(self) -> Dict[str, Dict[str, int]]:
    return {name: {} for name in self._names}

  def add_input(self, accumulator, element):
    (name, token), count = element
    accumulator[name][token] = count
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for accumulator in accumulators:
      for name, counts in accumulator.items():
        merged[name].update(counts)  # CombinePerKey made each (feature, string) unique
    return merged

  def extract_output(self, accumulator) -> Dict[str, List[str]]:
    return {name: writer_lib.vocabulary_from_counts(counts)
            for name, counts in accumulator.items()}


class _MomentsFn(beam.CombineFn):
  """Chunks -> {numeric feature: (count, mean, population std)} of its
  writer.statistic_values.

  Partial results are (count, mean, sum of squared deviations) merged with the
  pairwise update of Chan, Golub and LeVeque, which stays accurate where a merged
  sum of squares would cancel; results match numpy's over the whole column to
  float64 rounding.
  """

  def __init__(self, features: Sequence[schema_lib.Feature]):
    self._features = list(features)

  def create_accumulator(self) -> Dict[str, Tuple[int, float, float]]:
    return {f.name: (0, 0.0, 0.0) for f in self._features}

  def add_input(self, accumulator, chunk: Chunk):
    path, first_row, data = chunk
    for f in self._features:
      values = writer_lib.statistic_values(
          f, csv_source.parse_numbers(data[f.name], f.name, path, first_row))
      if values.size:
        mean = values.mean()
        part = (values.size, float(mean), float(np.square(values - mean).sum()))
        accumulator[f.name] = _merge_moments(accumulator[f.name], part)
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for accumulator in accumulators:
      for name, part in accumulator.items():
        merged[name] = _merge_moments(merged[name], part)
    return merged

  def extract_output(self, accumulator) -> Dict[str, Tuple[int, float, float]]:
    return {name: (n, mean, float(np.sqrt(m2 / n)) if n else 0.0)
            for name, (n, mean, m2) in accumulator.items()}


def _merge_moments(a: Tuple[int, float, float],
                   b: Tuple[int, float, float]) -> Tuple[int, float, float]:
  (na, mean_a, m2a), (nb, mean_b, m2b) = a, b
  if not na or not nb:
    return b if not na else a
  n = na + nb
  delta = mean_b - mean_a
  return n, mean_a + delta * nb / n, m2a + m2b + delta * delta * na * nb / n


def _complete_schema(_, template: dict, vocabularies: Dict[str, List[str]],
                     moments: Dict[str, Tuple[int, float, float]]) -> str:
  schema = csv_source.schema_with_vocabularies(template, vocabularies)
  return writer_lib.with_statistics(schema, moments).to_json()


class _EncodeChunk(beam.DoFn):
  """A chunk -> serialized training-layout records, with the completed schema."""

  def __init__(self, list_separator: str):
    self._list_separator = list_separator
    self._schema_json: Optional[str] = None
    self._schema: Optional[schema_lib.Schema] = None

  def process(self, chunk: Chunk, schema_json: str,
              vocabularies: Dict[str, List[str]]) -> Iterator[bytes]:
    if schema_json != self._schema_json:  # parse the side input once per worker
      self._schema_json, self._schema = schema_json, schema_lib.Schema.from_json(schema_json)
    path, first_row, data = chunk
    columns = csv_source.encode_columns(self._schema, data, vocabularies, path,
                                        self._list_separator, first_row)
    yield from self._schema.training_examples(columns)


def _save_schema(schema_json: str, out_dir: str, _shards: List[str]) -> None:
  """Writes schema.json; `_shards` is a side input only so this runs after every write."""
  path = FileSystems.join(out_dir, schema_lib.SCHEMA_FILENAME)
  with FileSystems.create(path + ".tmp") as f:
    f.write((schema_json + "\n").encode("utf-8"))
  FileSystems.rename([path + ".tmp"], [path])


def build(pipeline: beam.Pipeline, template: dict, splits: Sequence[Tuple[str, str]],
          out_dir: str, num_shards: int = 4, compression: Optional[str] = None,
          list_separator: str = "|", chunk_rows: int = CHUNK_ROWS) -> None:
  """Adds the conversion of each (split, CSV file pattern) into `out_dir` to `pipeline`.

  The first split is written in `num_shards` shards (0: as many as the runner
  likes), the others in one each, as in the single-process converter.
  """
  vocabulary_features = csv_source.vocabulary_features(template)
  # Validates the template now, before any worker starts.
  numeric = csv_source.schema_with_vocabularies(
      template, {name: [] for name in vocabulary_features}).numeric
  chunks = []
  for name, pattern in splits:
    chunks.append(
        pipeline
        | f"Match {name}" >> fileio.MatchFiles(pattern)
        | f"Open {name}" >> fileio.ReadMatches()
        | f"Read {name}" >> beam.ParDo(_ReadChunks(csv_source.needed_columns(template),
                                                       chunk_rows))
        | f"Spread {name}" >> beam.Reshuffle())
  vocabularies = (
      chunks[0]
      | "Count strings" >> beam.FlatMap(_count_tokens, vocabulary_features, list_separator)
      | "Sum counts" >> beam.CombinePerKey(sum)
      | "Vocabularies" >> beam.CombineGlobally(_VocabulariesFn(list(vocabulary_features))))
  moments = chunks[0] | "Statistics" >> beam.CombineGlobally(_MomentsFn(numeric))
  schema_json = (
      pipeline
      | "Start" >> beam.Create([None])
      | "Complete schema" >> beam.Map(_complete_schema, template,
                                      beam.pvalue.AsSingleton(vocabularies),
                                      beam.pvalue.AsSingleton(moments)))
  shards = []
  for i, ((name, _), split_chunks) in enumerate(zip(splits, chunks)):
    shards.append(
        split_chunks
        | f"Encode {name}" >> beam.ParDo(_EncodeChunk(list_separator),
                                         beam.pvalue.AsSingleton(schema_json),
                                         beam.pvalue.AsSingleton(vocabularies))
        | f"Write {name}" >> tfrecordio.WriteToTFRecord(
            FileSystems.join(out_dir, name),
            file_name_suffix=writer_lib.COMPRESSION_SUFFIX[compression],
            num_shards=num_shards if i == 0 else 1,
            shard_name_template="-SSSSS-of-NNNNN"))
  _ = schema_json | "Write schema" >> beam.Map(
      _save_schema, out_dir,
      beam.pvalue.AsList(shards | "All shards" >> beam.Flatten()))


def _is_local(path: str) -> bool:
  return FileSystems.get_scheme(path) in (None, "file")


def _exists(path: str) -> bool:
  if _is_local(path):
    return os.path.exists(path)
  return bool(FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list)


def _make_dir(directory: str) -> None:
  if _is_local(directory):
    os.makedirs(directory, exist_ok=True)
  else:
    FileSystems.mkdirs(directory)  # a no-op on object stores, which have no directories


def _remove(directory: str) -> None:
  if _is_local(directory):
    shutil.rmtree(directory)
  else:
    FileSystems.delete([directory + "/"])  # the trailing slash deletes recursively


def _files(directory: str) -> List[str]:
  return sorted(m.path for m in
                FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list)


def _move_files(paths: Sequence[str], directory: str, schema_first: bool) -> None:
  """Moves files into `directory`, schema.json in a call of its own (a batch rename
  on an object store has no order) before or after the others."""
  is_schema = lambda p: p.rsplit("/", 1)[-1] == schema_lib.SCHEMA_FILENAME
  batches = [[p for p in paths if not is_schema(p)], [p for p in paths if is_schema(p)]]
  for batch in (batches[::-1] if schema_first else batches):
    if batch:
      FileSystems.rename(batch, [FileSystems.join(directory, p.rsplit("/", 1)[-1])
                                 for p in batch])


def publish(tmp_dir: str, out_dir: str, by_file: Optional[bool] = None) -> None:
  """Moves the finished dataset in `tmp_dir` to `out_dir`, replacing any old one.

  Local directories are renamed whole, replacing an old one in one atomic
  exchange on Linux (`writer.exchange_paths`). Object stores have no directory
  rename, so there (or with `by_file`) files move one batch at a time: the old
  dataset is first moved aside, its schema.json first, the new one moved in with
  its schema.json last, and the old one deleted only then. A crash in between
  loses nothing: `out_dir` has no schema.json (so no reader takes it for
  complete), the old dataset is whole in `<tmp_dir>.old`, the new one is in
  `tmp_dir` and `out_dir`.
  """
  backup = tmp_dir + ".old"
  if by_file if by_file is not None else not _is_local(out_dir):
    old = _files(out_dir) if _exists(out_dir) else []
    if old:
      _make_dir(backup)
      _move_files(old, backup, schema_first=True)
    _make_dir(out_dir)
    _move_files(_files(tmp_dir), out_dir, schema_first=False)
    _remove(tmp_dir)
    if old:
      _remove(backup)
  elif not os.path.exists(out_dir):
    os.rename(tmp_dir, out_dir)
  elif writer_lib.exchange_paths(tmp_dir, out_dir):  # the old dataset is now at tmp_dir
    _remove(tmp_dir)
  else:  # two renames: for an instant out_dir is absent (the old copy is whole)
    os.rename(out_dir, backup)
    os.rename(tmp_dir, out_dir)
    _remove(backup)


def convert(template: dict, splits: Sequence[Tuple[str, str]], out_dir: str,
            num_shards: int = 4, compression: Optional[str] = None, overwrite: bool = False,
            list_separator: str = "|", options: Optional[PipelineOptions] = None,
            chunk_rows: int = CHUNK_ROWS) -> schema_lib.Schema:
  """Runs the conversion (on the runner `options` choose) and publishes `out_dir`."""
  if not splits:
    raise ValueError("give at least one split, e.g. train:data/train.csv.")
  if compression not in writer_lib.COMPRESSION_SUFFIX:
    raise ValueError(f"compression must be None or 'GZIP', got {compression!r}.")
  out_dir = os.path.abspath(out_dir) if _is_local(out_dir) else out_dir.rstrip("/")
  if _exists(out_dir) and not overwrite:
    raise FileExistsError(
        f"{out_dir} already exists; choose another output directory or pass "
        "overwrite=True (--overwrite) to replace it once the new data is complete.")
  for name, pattern in splits:
    if not FileSystems.match([pattern])[0].metadata_list:
      raise FileNotFoundError(f"split {name!r}: no CSV file matches {pattern}.")
  parent, base = out_dir.rsplit("/", 1)
  tmp_dir = FileSystems.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    pipeline = beam.Pipeline(options=options or PipelineOptions([]))
    build(pipeline, template, splits, tmp_dir, num_shards, compression, list_separator,
          chunk_rows)
    state = pipeline.run().wait_until_finish()
    if state != PipelineState.DONE:
      raise RuntimeError(f"the Beam pipeline ended {state}; {out_dir} is left as it was.")
  except BaseException:
    if _exists(tmp_dir):
      _remove(tmp_dir)
    raise
  publish(tmp_dir, out_dir)
  with FileSystems.open(FileSystems.join(out_dir, schema_lib.SCHEMA_FILENAME)) as f:
    return schema_lib.Schema.from_json(f.read().decode("utf-8"))


def parse_splits(items: Sequence[str]) -> List[Tuple[str, str]]:
  """['train:data/train-*.csv', ...] -> [(split, pattern), ...]."""
  splits = []
  for item in items:
    name, sep, pattern = item.partition(":")
    if not sep or not name or not pattern:
      raise ValueError(f"--csv entries look like train:data/train-*.csv, got {item!r}.")
    splits.append((name, pattern))
  return splits


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="CSV -> TFRecords + schema.json on Apache Beam. Other flags are Beam "
                  "pipeline options (--runner, --project, --temp_location, ...).")
  parser.add_argument("--csv", required=True,
                      help="split:file_pattern pairs, comma-separated; the first split "
                           "gives vocabularies and statistics.")
  parser.add_argument("--csv_schema", required=True,
                      help="schema template JSON (see pipelines/datasets/csv_source.py).")
  parser.add_argument("--out_dir", required=True,
                      help="Directory to create with the shards and schema.json.")
  parser.add_argument("--num_shards", type=int, default=4,
                      help="Shards of the first split; 0 lets the runner choose.")
  parser.add_argument("--compression", choices=["none", "gzip"], default="none",
                      help="TFRecord compression.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace --out_dir (only once the new data is complete).")
  args, beam_args = parser.parse_known_args(argv)
  if args.num_shards < 0:
    parser.error(f"--num_shards must be >= 0, got {args.num_shards}.")
  try:
    schema = convert(csv_source.load_template(args.csv_schema),
                     parse_splits(args.csv.split(",")), args.out_dir,
                     num_shards=args.num_shards,
                     compression="GZIP" if args.compression == "gzip" else None,
                     overwrite=args.overwrite, options=PipelineOptions(beam_args))
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {args.out_dir}: features {schema.feature_names}, tasks {schema.task_names}")


if __name__ == "__main__":
  main()
