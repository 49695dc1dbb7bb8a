"""The one way the project writes files: under a temporary name beside the
target, renamed into place only when complete, through `tf.io.gfile`.

So a crash (or an error half way) never leaves a truncated file where a reader
looks, and every path works on any filesystem TensorFlow supports: local disks,
`gs://`, `s3://` with its plugin, and `ram://` (the tests' stand-in for a
remote filesystem).

  with files.atomic_path("runs/a/model.keras") as tmp:   # a file or a directory
    model.save(tmp)
  files.write_json("runs/a/metrics.json", {"auc": 0.7})
"""

import contextlib
import json
import posixpath
import uuid
from typing import IO, Iterator

import tensorflow as tf


def is_local(path: str) -> bool:
  """Whether `path` is on the local filesystem (no `scheme://` prefix)."""
  return "://" not in path or path.startswith("file://")


def join(*parts: str) -> str:
  """Joins path parts with "/", which every TensorFlow filesystem understands
  (os.path.join would be wrong for `gs://` on Windows, right elsewhere)."""
  return posixpath.join(*parts)


def temporary_sibling(path: str) -> str:
  """A hidden, unique name in `path`'s directory (so the final rename stays on
  one filesystem and readers that skip dot-files never see it)."""
  directory, base = posixpath.split(path.rstrip("/"))
  return posixpath.join(directory, f".tmp-{uuid.uuid4().hex[:8]}-{base}")


def remove(path: str) -> None:
  """Deletes a file or directory tree at `path`, if there is one. Errors other
  than "not found" are raised: a remote delete that fails must not pass
  silently."""
  try:
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    pass


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = True) -> Iterator[str]:
  """Yields a temporary path to write a file or a directory at; on success it is
  renamed to `path`, on an exception it is removed and `path` is untouched.

  Args:
    path: the final file or directory.
    overwrite: replace an existing `path` (a directory is removed first, so for
      an instant none is there); with False an existing `path` raises
      FileExistsError before anything is written.

  Yields:
    The temporary path, in `path`'s directory (which is created).
  """
  if not overwrite and tf.io.gfile.exists(path):
    raise FileExistsError(f"{path} exists; remove it or choose another path.")
  directory = posixpath.dirname(path.rstrip("/"))
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = temporary_sibling(path)
  try:
    yield tmp
    if tf.io.gfile.isdir(tmp) and tf.io.gfile.exists(path):
      remove(path)
    tf.io.gfile.rename(tmp, path, overwrite=overwrite)
  finally:
    if tf.io.gfile.exists(tmp):
      remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """`tf.io.gfile.GFile(path, mode)` written under a temporary name and renamed
  to `path` when the block ends without an exception.

  Args:
    path: the file to write.
    mode: "w" (text) or "wb" (bytes).

  Yields:
    The open file.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}.")
  with atomic_path(path) as tmp:
    with tf.io.gfile.GFile(tmp, mode) as f:
      yield f


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, data) -> None:
  """Writes `data` as indented, key-sorted JSON to `path` atomically."""
  write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  """The JSON value stored at `path` (any filesystem)."""
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
