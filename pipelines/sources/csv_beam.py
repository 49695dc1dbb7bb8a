"""The CSV source as an Apache Beam pipeline (`CsvSource.build_beam`), for data
that outgrows one machine; imported only when Beam runs it (extra `beam`).

It writes the same records and the same schema as the single-process CSV
source: both read with csv_reading.py's `read_blocks`, encode with its
`Encoder`, `tokens` and `numbers`, and order vocabularies as
`writer.vocabulary_from_counts` does; only the aggregation differs (strings are counted per (feature, string)
and merged; mean/std are merged from per-chunk `writer.Moments`). Records are
the same multiset, in an order and shard assignment that are the runner's.

Each split is a file pattern: files are read in parallel and each file's rows
are cut into chunks spread over the workers, so a single huge file is read by
one worker but encoded and written by all. The first split gives the
vocabularies and statistics. schema.json is written last, once every shard is
final (`files.write_text`: temporary name, then rename). No manifest.json is
written: Beam's sinks do not report per-shard counts, so readers count and
scan these shards themselves.
"""

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow.compute as pc
from apache_beam.io import fileio, tfrecordio

from pipelines import files
from pipelines import records as records_lib
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import csv_reading

# Rows per chunk: large enough that per-element overhead vanishes next to encoding,
# small enough that a worker holds many chunks at once.
CHUNK_ROWS = 2000

# A chunk of one CSV file: (path, row number of its first row, column -> cells).
Chunk = Tuple[str, int, Dict[str, List[Optional[str]]]]


class _ReadChunks(beam.DoFn):
  """One CSV file -> chunks of its rows (the needed columns only, as strings)."""

  def __init__(self, needed: Sequence[str], chunk_rows: int):
    self._needed = list(needed)
    self._chunk_rows = chunk_rows

  def process(self, readable_file: fileio.ReadableFile) -> Iterator[Chunk]:
    path = readable_file.metadata.path
    with readable_file.open() as raw:
      first_row = 2  # row 1 is the header
      for batch in csv_reading.read_blocks(path, self._needed, source=raw):
        for start in range(0, batch.num_rows, self._chunk_rows):
          part = batch.slice(start, self._chunk_rows)
          yield path, first_row + start, {c: part.column(i).to_pylist()
                                          for i, c in enumerate(self._needed)}
        first_row += batch.num_rows


def _count_tokens(chunk: Chunk, features: Dict[str, str], list_separator: str):
  """A chunk -> ((feature, string), count) for every vocabulary string in it."""
  data = chunk[2]
  for name, kind in features.items():
    counted = pc.value_counts(csv_reading.tokens(data[name], kind, list_separator)[0])
    for token, count in zip(counted.field("values").to_pylist(),
                            counted.field("counts").to_pylist()):
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
  """Chunks -> {numeric feature: writer.Moments of its writer.statistic_values}."""

  def __init__(self, features: Sequence[schema_lib.Feature]):
    self._features = list(features)

  def create_accumulator(self) -> Dict[str, writer_lib.Moments]:
    return {f.name: writer_lib.Moments() for f in self._features}

  def add_input(self, accumulator, chunk: Chunk):
    path, first_row, data = chunk
    for f in self._features:
      values = writer_lib.statistic_values(
          f, csv_reading.numbers(data[f.name], f.name, path, first_row))
      accumulator[f.name] = accumulator[f.name].merge(writer_lib.Moments.of(values))
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for accumulator in accumulators:
      for name, part in accumulator.items():
        merged[name] = merged[name].merge(part)
    return merged

  def extract_output(self, accumulator) -> Dict[str, writer_lib.Moments]:
    return accumulator


def _complete_schema(_, template: dict, vocabularies: Dict[str, List[str]],
                     moments: Dict[str, writer_lib.Moments]) -> str:
  schema = csv_reading.schema_with_vocabularies(template, vocabularies)
  return writer_lib.with_statistics(schema, moments).to_json()


class _EncodeChunk(beam.DoFn):
  """A chunk -> serialized training-layout records, with the completed schema."""

  def __init__(self, list_separator: str):
    self._list_separator = list_separator
    self._schema_json: Optional[str] = None
    self._encoder: Optional[csv_reading.Encoder] = None

  def process(self, chunk: Chunk, schema_json: str,
              vocabularies: Dict[str, List[str]]) -> Iterator[bytes]:
    if schema_json != self._schema_json:  # build the encoder once per worker
      self._schema_json = schema_json
      self._encoder = csv_reading.Encoder(schema_lib.Schema.from_json(schema_json),
                                         vocabularies, self._list_separator)
    path, first_row, data = chunk
    columns = self._encoder.encode(data, path, first_row)
    serialized, lengths = records_lib.encode_examples(
        self._encoder.schema.pack_columns(columns))
    ends = np.cumsum(lengths)
    for start, end in zip((ends - lengths).tolist(), ends.tolist()):
      yield serialized[start:end].tobytes()


def _save_schema(schema_json: str, out_dir: str, _shards: List[str]) -> None:
  """Writes schema.json; `_shards` is a side input only so this runs after every write."""
  files.write_text(files.join(out_dir, schema_lib.SCHEMA_FILENAME), schema_json + "\n")


def build(pipeline: beam.Pipeline, template: dict, splits: Sequence[Tuple[str, str]],
          out_dir: str, num_shards: int = 4, compression: Optional[str] = None,
          list_separator: str = "|") -> None:
  """Adds the conversion of each (split, CSV file pattern) into `out_dir` to `pipeline`.

  Args:
    pipeline: the Beam pipeline.
    template: the schema template.
    splits: (split, file pattern), the first giving vocabularies and statistics.
    out_dir: where the shards and schema.json go.
    num_shards: shards of the first split (0: as many as the runner likes); the
      others get one each, as in the single-process converter.
    compression: None or "GZIP".
    list_separator: what separates the values of a categorical_list cell.
  """
  for name, pattern in splits:  # fail now, before any worker starts
    csv_reading.match_files(name, pattern)
  string_features = csv_reading.vocabulary_features(template)
  numeric = csv_reading.schema_with_vocabularies(
      template, {name: [] for name in string_features}).numeric  # validates the template
  chunks = []
  for name, pattern in splits:
    chunks.append(
        pipeline
        | f"Match {name}" >> fileio.MatchFiles(pattern)
        | f"Open {name}" >> fileio.ReadMatches()
        | f"Read {name}" >> beam.ParDo(_ReadChunks(csv_reading.needed_columns(template),
                                                   CHUNK_ROWS))
        | f"Spread {name}" >> beam.Reshuffle())
  vocabularies = (
      chunks[0]
      | "Count strings" >> beam.FlatMap(_count_tokens, string_features, list_separator)
      | "Sum counts" >> beam.CombinePerKey(sum)
      | "Vocabularies" >> beam.CombineGlobally(_VocabulariesFn(list(string_features))))
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
            files.join(out_dir, name),
            file_name_suffix=writer_lib.COMPRESSION_SUFFIX[compression],
            num_shards=num_shards if i == 0 else 1,
            shard_name_template="-SSSSS-of-NNNNN"))
  _ = schema_json | "Write schema" >> beam.Map(
      _save_schema, out_dir, beam.pvalue.AsList(shards | "All shards" >> beam.Flatten()))
