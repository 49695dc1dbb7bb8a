"""Columnar data -> sharded TFRecords (training layout) + schema.json + manifest.json,
written in chunks and published atomically.

A dataset directory holds `<split>-NNNNN-of-MMMMM.tfrecord[.gz]` shards, the
schema and the manifest (record counts and sizes, `manifest.py`). Splits arrive
as chunks of columns, so memory stays bounded whatever the data's size: each
chunk is encoded with numpy (`records.py`) and appended to its shard, and the
numeric statistics are accumulated as the rows pass. Everything goes into a
hidden temporary directory beside the target, published only when complete
(`files.atomic_path`, schema.json marking completion), so a crash never leaves
a dataset that looks finished, and an existing dataset is only replaced (with
`overwrite=True`) once its successor is whole, in one atomic exchange on Linux.
"""

import dataclasses
import zlib
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from pipelines import files
from pipelines import manifest
from pipelines import progress as progress_lib
from pipelines import records as records_lib
from pipelines import schema as schema_lib

COMPRESSION_SUFFIX = {None: ".tfrecord", "": ".tfrecord", "GZIP": ".tfrecord.gz"}
# Rows encoded at once: the encoder's byte matrices stay near 10 MB.
ENCODE_ROWS = 32_768

Columns = Dict[str, object]


def vocabulary_from_counts(counts: Mapping[str, int], min_count: int = 1) -> List[str]:
  """The vocabulary order of every converter: most frequent first, ties in string order.

  Takes counts rather than values so that converters that count in chunks or
  in parallel (Beam) produce exactly the same vocabulary.
  """
  ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
  return [value for value, count in ranked if count >= min_count]


def statistic_values(feature: schema_lib.Feature, values) -> np.ndarray:
  """The values a numeric feature's mean/std describe: the finite ones, after the
  feature's transform, as models apply them."""
  values = np.asarray(values, np.float64)
  if feature.transform == "log1p":
    values = np.sign(values) * np.log1p(np.abs(values))
  return values[np.isfinite(values)]


@dataclasses.dataclass(frozen=True)
class Moments:
  """Count, mean and sum of squared deviations of a stream of values, merged
  chunk by chunk with the pairwise update of Chan, Golub and LeVeque, which
  stays accurate where a merged sum of squares would cancel: the result matches
  numpy's over the whole column to float64 rounding."""

  count: int = 0
  mean: float = 0.0
  m2: float = 0.0

  @classmethod
  def of(cls, values: np.ndarray) -> "Moments":
    """The moments of the values of one chunk."""
    if not values.size:
      return cls()
    mean = values.mean()
    return cls(int(values.size), float(mean), float(np.square(values - mean).sum()))

  def merge(self, other: "Moments") -> "Moments":
    """The moments of both streams together."""
    if not self.count or not other.count:
      return other if not self.count else self
    n = self.count + other.count
    delta = other.mean - self.mean
    return Moments(n, self.mean + delta * other.count / n,
                   self.m2 + other.m2 + delta * delta * self.count * other.count / n)

  @property
  def std(self) -> float:
    """The population standard deviation."""
    return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0


def with_statistics(schema: schema_lib.Schema,
                    moments: Mapping[str, Moments]) -> schema_lib.Schema:
  """A copy of the schema whose numeric features carry the given statistics.

  Args:
    schema: the schema.
    moments: numeric feature -> the Moments of its `statistic_values`.

  Returns:
    The schema with mean and population std filled in (std 1 for a constant
    feature, so normalising keeps it finite).

  Raises:
    schema_lib.SchemaError: a numeric feature has no finite value.
  """
  features = []
  for f in schema.features:
    if f.kind == schema_lib.NUMERIC:
      m = moments[f.name]
      if m.count == 0:
        raise schema_lib.SchemaError(
            f"numeric feature {f.name!r} has no finite values to compute statistics from.")
      f = dataclasses.replace(f, mean=float(m.mean), std=m.std if m.std > 0 else 1.0)
    features.append(f)
  return schema.replace(features=features)


def with_numeric_statistics(schema: schema_lib.Schema, columns: Columns) -> schema_lib.Schema:
  """A copy of the schema whose numeric features carry mean/std of `columns`."""
  return with_statistics(schema, {f.name: Moments.of(statistic_values(f, columns[f.name]))
                                  for f in schema.numeric})


def slice_columns(columns: Columns, start: int, stop: int) -> Columns:
  """Rows [start, stop) of every column (arrays or lists)."""
  return {name: values[start:stop] for name, values in columns.items()}


class _ShardFile:
  """One shard being written: framed records appended, GZIP-compressed as
  TensorFlow's writer would when asked."""

  def __init__(self, path: str, compression: Optional[str]):
    self.path = path
    self.records = 0
    self._file = tf.io.gfile.GFile(path, "wb")
    # wbits 31: a gzip stream, what TensorFlow's GZIP reader expects.
    self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31) if compression else None

  def write(self, packed: Dict[str, np.ndarray]) -> None:
    """Appends one record per row of training-layout arrays."""
    framed = records_lib.tfrecords(packed)
    self._file.write(self._gzip.compress(framed) if self._gzip else framed)
    self.records += len(packed[schema_lib.PACKED_LABELS])

  def close(self) -> int:
    """Closes the shard; returns its size in bytes."""
    if self._gzip:
      self._file.write(self._gzip.flush())
    self._file.close()
    return tf.io.gfile.stat(self.path).length


class _Shards:
  """The shards of one split, opened one after another as rows reach their bounds."""

  def __init__(self, directory: str, names: List[str], compression: Optional[str]):
    self._directory, self._names, self._compression = directory, names, compression
    self.closed: List[Tuple[str, int, int]] = []  # (file name, records, bytes)
    self._current: Optional[_ShardFile] = None

  def at(self, row: int, bounds: np.ndarray) -> Tuple[_ShardFile, int]:
    """The shard that holds `row` and its first row past the end (shard i
    holds rows [bounds[i], bounds[i + 1]))."""
    while self._current is None or row >= bounds[len(self.closed) + 1]:
      self._next()
    return self._current, bounds[len(self.closed) + 1]

  def finish(self) -> List[Tuple[str, int, int]]:
    """Closes the last shard, writing the empty ones a short split leaves."""
    while len(self.closed) < len(self._names):
      self._next()
    return self.closed

  def _next(self) -> None:
    if self._current is not None:
      name = self._names[len(self.closed)]
      self.closed.append((name, self._current.records, self._current.close()))
      self._current = None
    if len(self.closed) < len(self._names):
      self._current = _ShardFile(files.join(self._directory, self._names[len(self.closed)]),
                                 self._compression)


class DatasetWriter:
  """Writes the splits of one dataset, then publishes directory, schema and
  manifest at once.

  Usage:
    with DatasetWriter(out_dir, schema, statistics_split="train") as writer:
      writer.write_chunks("train", chunks, num_rows=n, num_shards=4)  # streamed
      writer.write_split("eval", eval_columns)                          # in memory

  Args:
    out_dir: the dataset directory to create (or replace, with `overwrite`).
    schema: the data's schema; its numeric statistics may be missing when
      `statistics_split` computes them.
    compression: None or "GZIP".
    overwrite: replace an existing `out_dir` once the new data is complete.
    statistics_split: the split whose numeric values give the schema's mean
      and std, accumulated as it is written (None: the schema's own).
    verbose: print each split's progress and rate to stderr.
  """

  def __init__(self, out_dir: str, schema: schema_lib.Schema,
               compression: Optional[str] = None, overwrite: bool = False,
               statistics_split: Optional[str] = None, verbose: bool = False):
    if compression not in COMPRESSION_SUFFIX:
      raise ValueError(f"compression must be None or 'GZIP', got {compression!r}.")
    out_dir = files.absolute(out_dir)
    if tf.io.gfile.exists(out_dir) and not overwrite:
      raise FileExistsError(
          f"{out_dir} already exists; choose another output directory or pass "
          "overwrite=True (--overwrite) to replace it once the new data is complete.")
    if statistics_split is None:
      schema.require_statistics()
    self.out_dir = out_dir
    self.schema = schema
    self.compression = compression or None
    self.statistics_split = statistics_split
    self.verbose = verbose
    self.counts: Dict[str, int] = {}
    self._overwrite = overwrite
    self._shards: Dict[str, List[Tuple[str, int, int]]] = {}
    self._moments = {f.name: Moments() for f in schema.numeric}
    self._publish = None
    self._tmp_dir = None

  def __enter__(self) -> "DatasetWriter":
    self._publish = files.atomic_path(self.out_dir, overwrite=self._overwrite,
                                      marker=schema_lib.SCHEMA_FILENAME)
    self._tmp_dir = self._publish.__enter__()
    tf.io.gfile.makedirs(self._tmp_dir)
    return self

  def write_split(self, split: str, columns: Columns, num_shards: int = 1) -> List[str]:
    """Writes one split held in memory as `num_shards` shards of contiguous rows.

    Args:
      split: the split's name (the shards' file name prefix).
      columns: feature and label columns (what `Schema.pack_columns` takes).
      num_shards: shards to cut the split into (at most one per row).

    Returns:
      The paths the shards will have once published.
    """
    n = self.schema.check_columns(columns, need_labels=True)
    chunks = (slice_columns(columns, start, start + ENCODE_ROWS)
              for start in range(0, n, ENCODE_ROWS))
    return self.write_chunks(split, chunks, n, num_shards)

  def write_chunks(self, split: str, chunks: Iterable[Columns], num_rows: Optional[int],
                   num_shards: int = 1) -> List[str]:
    """Writes one split from chunks of columns, as `num_shards` shards of
    contiguous rows; only one chunk is held at a time.

    Args:
      split: the split's name (the shards' file name prefix).
      chunks: the split's rows, in order, as chunks of columns.
      num_rows: the rows the chunks hold in all (None: unknown, one shard).
      num_shards: shards to cut the split into (at most one per row).

    Returns:
      The paths the shards will have once published.

    Raises:
      ValueError: the split was written already, or the chunks hold another
        number of rows than `num_rows`.
    """
    if self._tmp_dir is None:
      raise RuntimeError("DatasetWriter writes inside its `with` block.")
    if split in self.counts:
      raise ValueError(f"split {split!r} was already written.")
    if num_rows is None and num_shards > 1:
      raise ValueError(f"split {split!r}: {num_shards} shards of contiguous rows need "
                       "num_rows, the split's row count.")
    num_shards = max(1, min(num_shards, num_rows if num_rows is not None else 1))
    bounds = (np.linspace(0, num_rows, num_shards + 1).astype(int)
              if num_rows is not None else np.array([0, np.iinfo(np.int64).max]))
    names = [f"{split}-{shard:05d}-of-{num_shards:05d}{COMPRESSION_SUFFIX[self.compression]}"
             for shard in range(num_shards)]
    progress = progress_lib.Progress(f"{split}: wrote", num_rows) if self.verbose else None
    shards, written = _Shards(self._tmp_dir, names, self.compression), 0
    for columns in chunks:
      n = self.schema.check_columns(columns, need_labels=True)
      if num_rows is not None and written + n > num_rows:
        raise ValueError(f"split {split!r} holds more than the {num_rows:,} rows it was "
                         "announced with; did its input change while it was converted?")
      if split == self.statistics_split:
        self._add_statistics(columns)
      for start in range(0, n, ENCODE_ROWS):
        packed = self.schema.pack_columns(slice_columns(columns, start, start + ENCODE_ROWS))
        rows, row = len(packed[schema_lib.PACKED_LABELS]), 0
        while row < rows:  # a chunk may end one shard and start the next
          shard, end = shards.at(written + row, bounds)
          take = min(rows - row, end - written - row)
          shard.write(slice_columns(packed, row, row + take))
          row += take
        written += rows
      if progress:
        progress.add(n)
    if num_rows is not None and written != num_rows:
      raise ValueError(f"split {split!r} holds {written:,} rows, not the {num_rows:,} it was "
                       "announced with; did its input change while it was converted?")
    self._shards[split] = shards.finish()
    self.counts[split] = written
    if progress:
      progress.done()
    return [files.join(self.out_dir, name) for name in names]

  def path(self, name: str) -> str:
    """Where to write, inside the `with` block, a file that belongs with the
    dataset (e.g. a generated log's oracle): it is published with the shards.

    Args:
      name: the file's name in the dataset directory.
    """
    if self._tmp_dir is None:
      raise RuntimeError("DatasetWriter writes inside its `with` block.")
    return files.join(self._tmp_dir, name)

  def _add_statistics(self, columns: Columns) -> None:
    for f in self.schema.numeric:
      self._moments[f.name] = self._moments[f.name].merge(
          Moments.of(statistic_values(f, columns[f.name])))

  def __exit__(self, exc_type, exc, tb) -> None:
    publish, self._publish = self._publish, None
    if exc_type is None:
      try:
        if self.statistics_split is not None:
          if self.statistics_split not in self.counts:
            raise ValueError(f"statistics_split {self.statistics_split!r} was not written; "
                             f"the splits are {sorted(self.counts)}.")
          self.schema = with_statistics(self.schema, self._moments)
        self.schema.save(files.join(self._tmp_dir, schema_lib.SCHEMA_FILENAME))
        manifest.write(self._tmp_dir, self._shards)
      except BaseException as e:
        if not publish.__exit__(type(e), e, e.__traceback__):
          raise
        return
    publish.__exit__(exc_type, exc, tb)
