"""What a converter wrote: `manifest.json` beside the shards, with every split's
record count and every shard's record count and size in bytes.

Readers use it to skip work the converter already did: a shard whose size is
the size listed here was not truncated or replaced since, so its record count
is the listed one (no counting pass) and its framing needs no scan before
reading (TensorFlow's reader still checks every record's checksum as it reads).
A shard that is not listed, or whose size differs, is counted and scanned as
before; a missing or unreadable manifest only costs that time.

  {"format_version": 1,
   "splits": {"train": {"records": 3000, "files": ["train-00000-of-00002.tfrecord", ...]}},
   "files": {"train-00000-of-00002.tfrecord": {"records": 1500, "bytes": 241562}, ...}}
"""

import json
import posixpath
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import tensorflow as tf

from pipelines import files as files_lib

MANIFEST_FILENAME = "manifest.json"
FORMAT_VERSION = 1


def write(directory: str, splits: Mapping[str, Sequence[Tuple[str, int, int]]]) -> None:
  """Writes the manifest of a dataset directory (atomically).

  Args:
    directory: the dataset directory.
    splits: split -> its shards as (file name in `directory`, records, bytes).
  """
  listed = {
      "format_version": FORMAT_VERSION,
      "splits": {split: {"records": sum(n for _, n, _ in shards),
                         "files": [name for name, _, _ in shards]}
                 for split, shards in splits.items()},
      "files": {name: {"records": n, "bytes": size}
                for shards in splits.values() for name, n, size in shards},
  }
  files_lib.write_json(files_lib.join(directory, MANIFEST_FILENAME), listed)


def _listed_files(directory: str) -> Dict[str, Dict[str, int]]:
  """File name -> {"records", "bytes"} from `directory`'s manifest; empty when
  there is none or it cannot be used (the caller then counts itself)."""
  path = files_lib.join(directory, MANIFEST_FILENAME)
  try:
    listed = files_lib.read_json(path)
  except (tf.errors.OpError, json.JSONDecodeError, UnicodeDecodeError):
    return {}
  if not isinstance(listed, dict) or listed.get("format_version") != FORMAT_VERSION:
    return {}
  entries = listed.get("files")
  if not isinstance(entries, dict):
    return {}
  return {name: entry for name, entry in entries.items()
          if isinstance(entry, dict) and isinstance(entry.get("records"), int)
          and isinstance(entry.get("bytes"), int)}


def vouched_counts(files: Iterable[str]) -> Dict[str, int]:
  """Record counts of the shards the manifest beside them vouches for.

  Args:
    files: shard paths (any directories, any filesystem).

  Returns:
    path -> record count, for each shard listed in its directory's manifest
    with the size it has now; shards not listed, or changed, are left out.
  """
  by_directory: Dict[str, list] = {}
  for path in files:
    by_directory.setdefault(posixpath.dirname(path), []).append(path)
  counts = {}
  for directory, paths in by_directory.items():
    listed = _listed_files(directory)
    for path in paths:
      entry = listed.get(posixpath.basename(path))
      if entry is None:
        continue
      try:
        size = tf.io.gfile.stat(path).length
      except tf.errors.NotFoundError:
        continue
      if size == entry["bytes"]:
        counts[path] = entry["records"]
  return counts
