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
import ctypes
import json
import os
import posixpath
import sys
import uuid
from typing import IO, Iterator, List, Optional

import tensorflow as tf

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def is_local(path: str) -> bool:
  """Whether `path` is on the local filesystem (no `scheme://` prefix)."""
  return "://" not in path or path.startswith("file://")


def absolute(path: str) -> str:
  """A local path made absolute; a `scheme://` path without a trailing slash."""
  return os.path.abspath(_local(path)) if is_local(path) else path.rstrip("/")


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


def exchange_paths(a: str, b: str) -> bool:
  """Swaps two existing local paths in one atomic step (Linux `renameat2` with
  RENAME_EXCHANGE), so a reader sees the old directory or the new one, never
  neither. False, with nothing changed, where the OS or filesystem cannot."""
  if not sys.platform.startswith("linux") or not (is_local(a) and is_local(b)):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
    return False
  return renameat2(_AT_FDCWD, os.fsencode(_local(a)), _AT_FDCWD, os.fsencode(_local(b)),
                   _RENAME_EXCHANGE) == 0


def _local(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def _files_under(directory: str) -> List[str]:
  """Every file under `directory`, as paths relative to it."""
  found = []
  for root, _, names in tf.io.gfile.walk(directory):
    relative = root[len(directory.rstrip("/")):].lstrip("/")
    found += [posixpath.join(relative, name) if relative else name for name in names]
  return sorted(found)


def _move_files(source: str, target: str, names: List[str]) -> None:
  for name in names:
    destination = join(target, name)
    tf.io.gfile.makedirs(posixpath.dirname(destination))
    tf.io.gfile.rename(join(source, name), destination, overwrite=True)


def publish_directory(tmp_dir: str, path: str, marker: Optional[str] = None,
                      by_file: Optional[bool] = None) -> None:
  """Moves the finished directory `tmp_dir` to `path`, replacing any old one.

  A local directory is renamed whole, replacing an old one in one atomic
  exchange on Linux (`exchange_paths`; elsewhere with two renames, between
  which `path` is briefly absent). Object stores have no directory rename, so
  there (or with `by_file`) files move one at a time: the old ones aside first,
  `marker` first, so the old directory stops looking complete at once; then
  the new ones, `marker` last, so the new one looks complete only when it is;
  the old copy is deleted only then. A crash in between loses nothing: `path`
  lacks `marker`, the old directory is whole in `<tmp_dir>.old`, the new one
  in `tmp_dir` and `path`.

  Args:
    tmp_dir: the complete new directory, beside `path`.
    path: where it goes.
    marker: the file (relative to the directory) whose presence tells readers
      the directory is complete, e.g. schema.json; None: no such file.
    by_file: move file by file (default: where `path` is not local).
  """
  backup = tmp_dir.rstrip("/") + ".old"
  if by_file if by_file is not None else not is_local(path):
    marker_last = lambda names: sorted(names, key=lambda name: name == marker)
    old = _files_under(path) if tf.io.gfile.exists(path) else []
    if old:
      _move_files(path, backup, marker_last(old)[::-1])
    _move_files(tmp_dir, path, marker_last(_files_under(tmp_dir)))
    remove(tmp_dir)
    if old:
      remove(backup)
  elif not tf.io.gfile.exists(path):
    tf.io.gfile.rename(tmp_dir, path)
  elif exchange_paths(tmp_dir, path):  # the old directory is now at tmp_dir
    remove(tmp_dir)
  else:
    tf.io.gfile.rename(path, backup)
    tf.io.gfile.rename(tmp_dir, path)
    remove(backup)


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = True,
                marker: Optional[str] = None) -> Iterator[str]:
  """Yields a temporary path to write a file or a directory at; on success it is
  renamed to `path`, on an exception it is removed and `path` is untouched.

  Args:
    path: the final file or directory.
    overwrite: replace an existing `path` (a directory as `publish_directory`
      says); with False an existing `path` raises FileExistsError before
      anything is written.
    marker: for a directory, the file that marks it complete (see
      `publish_directory`).

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
    if tf.io.gfile.isdir(tmp):
      publish_directory(tmp, path, marker)
    else:
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
