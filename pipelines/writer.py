"""Columnar data -> sharded TFRecords (training layout) + schema.json, written atomically.

A dataset directory holds `<split>-NNNNN-of-MMMMM.tfrecord[.gz]` shards and the
schema. Everything is first written into a hidden temporary directory beside the
target and renamed into place only when complete, so a crash never leaves a
dataset that looks finished, and an existing dataset is only replaced (with
`overwrite=True`) once its successor is whole, in one atomic exchange on Linux.
"""

import ctypes
import dataclasses
import os
import shutil
import sys
import uuid
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pipelines import schema as schema_lib

COMPRESSION_SUFFIX = {None: ".tfrecord", "": ".tfrecord", "GZIP": ".tfrecord.gz"}
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: str, b: str) -> bool:
  """Swaps two existing local paths in one atomic step (Linux `renameat2` with
  RENAME_EXCHANGE), so a reader sees the old directory or the new one, never
  neither. False, with nothing changed, where the OS or filesystem cannot."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
    return False
  return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                   _RENAME_EXCHANGE) == 0


def encode_vocabulary(values: Sequence[str],
                      vocabulary: Optional[List[str]] = None,
                      min_count: int = 1) -> Tuple[np.ndarray, List[str]]:
  """Maps strings to ids; builds the vocabulary (most frequent first) when not given.

  Strings outside the vocabulary get id -1, which models send to the OOV row.
  """
  values = np.asarray(values, dtype=object)
  if vocabulary is None:
    uniques, counts = np.unique(values.astype(str), return_counts=True)
    vocabulary = vocabulary_from_counts(dict(zip(uniques.tolist(), counts.tolist())),
                                        min_count)
  index = {v: i for i, v in enumerate(vocabulary)}
  ids = np.fromiter((index.get(str(v), -1) for v in values), np.int64, len(values))
  return ids, list(vocabulary)


def vocabulary_from_counts(counts: Mapping[str, int], min_count: int = 1) -> List[str]:
  """The vocabulary order of every converter: most frequent first, ties in string order.

  Takes counts rather than values so that distributed converters (Beam) that
  count in parallel produce exactly the same vocabulary.
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


def with_statistics(schema: schema_lib.Schema,
                    moments: Mapping[str, Tuple[int, float, float]]) -> schema_lib.Schema:
  """A copy of the schema whose numeric features carry the given statistics.

  `moments` maps each numeric feature to (count, mean, population std) of its
  `statistic_values`; a constant feature gets std 1 so normalising keeps it finite.
  """
  features = []
  for f in schema.features:
    if f.kind == schema_lib.NUMERIC:
      count, mean, std = moments[f.name]
      if count == 0:
        raise schema_lib.SchemaError(
            f"numeric feature {f.name!r} has no finite values to compute statistics from.")
      f = dataclasses.replace(f, mean=float(mean), std=float(std) if std > 0 else 1.0)
    features.append(f)
  return schema_lib.Schema(features, schema.labels, schema.tasks, schema.request_id,
                           schema.name)


def with_numeric_statistics(schema: schema_lib.Schema,
                            columns: Dict[str, np.ndarray]) -> schema_lib.Schema:
  """A copy of the schema whose numeric features carry mean/std of `columns`."""
  moments = {}
  for f in schema.numeric:
    finite = statistic_values(f, columns[f.name])
    moments[f.name] = ((finite.size, finite.mean(), finite.std()) if finite.size
                       else (0, 0.0, 0.0))
  return with_statistics(schema, moments)


class DatasetWriter:
  """Writes splits of one dataset, then publishes directory and schema at once.

  Usage:
    with DatasetWriter(out_dir, schema) as writer:
      writer.write_split("train", train_columns, num_shards=4)
      writer.write_split("eval", eval_columns)
  """

  def __init__(self, out_dir: str, schema: schema_lib.Schema,
               compression: Optional[str] = None, overwrite: bool = False):
    if compression not in COMPRESSION_SUFFIX:
      raise ValueError(f"compression must be None or 'GZIP', got {compression!r}.")
    out_dir = os.path.abspath(out_dir)
    if tf.io.gfile.exists(out_dir) and not overwrite:
      raise FileExistsError(
          f"{out_dir} already exists; choose another output directory or pass "
          "overwrite=True (--overwrite) to replace it once the new data is complete.")
    schema.require_statistics()
    self.out_dir = out_dir
    self.schema = schema
    self.compression = compression or None
    self.counts: Dict[str, int] = {}
    parent = os.path.dirname(out_dir)
    tf.io.gfile.makedirs(parent)
    self._tmp_dir = os.path.join(
        parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")

  def __enter__(self) -> "DatasetWriter":
    tf.io.gfile.makedirs(self._tmp_dir)
    return self

  def write_split(self, split: str, columns: Dict[str, np.ndarray],
                  num_shards: int = 1) -> List[str]:
    """Writes one split as `num_shards` shards of contiguous rows."""
    if split in self.counts:
      raise ValueError(f"split {split!r} was already written.")
    n = self.schema.check_columns(columns, need_labels=True)
    num_shards = max(1, min(num_shards, n))
    options = tf.io.TFRecordOptions(compression_type=self.compression or "")
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    records = self.schema.training_examples(columns)
    names = []
    for shard in range(num_shards):
      name = (f"{split}-{shard:05d}-of-{num_shards:05d}"
              f"{COMPRESSION_SUFFIX[self.compression]}")
      with tf.io.TFRecordWriter(os.path.join(self._tmp_dir, name), options) as w:
        for _ in range(bounds[shard], bounds[shard + 1]):
          w.write(next(records))
      names.append(os.path.join(self.out_dir, name))
    self.counts[split] = n
    return names

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      shutil.rmtree(self._tmp_dir, ignore_errors=True)
      return
    self.schema.save(os.path.join(self._tmp_dir, schema_lib.SCHEMA_FILENAME))
    if not tf.io.gfile.exists(self.out_dir):
      os.rename(self._tmp_dir, self.out_dir)
    elif exchange_paths(self._tmp_dir, self.out_dir):  # the old dataset is now at tmp
      shutil.rmtree(self._tmp_dir, ignore_errors=True)
    else:  # two renames: for an instant out_dir is absent (the old copy is intact)
      backup = self._tmp_dir + ".old"
      os.rename(self.out_dir, backup)
      os.rename(self._tmp_dir, self.out_dir)
      shutil.rmtree(backup, ignore_errors=True)
