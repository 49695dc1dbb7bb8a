"""Versioned SavedModel export: `<export_dir>/<version>/`, as TF Serving watches it.

A version is written under a hidden temporary name and published only when
complete, so the server never loads half a model; versions are seconds since
the epoch, bumped past any existing one, and never overwritten. Every file
operation goes through `tf.io.gfile`, so export directories may be on any
filesystem TensorFlow supports (`gs://`, `ram://`, local disks).
"""

import os
import posixpath
import time
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import models
from mtl_zoo._keras import keras, output_names
from mtl_zoo.serving import signatures
from mtl_zoo.serving import warmup
from pipelines import files
from pipelines import schema as schema_lib

SCHEMA_ASSET = files.join("assets.extra", schema_lib.SCHEMA_FILENAME)
# The file a loader looks for: a version is only usable once it is there.
SAVED_MODEL_FILE = "saved_model.pb"


def split_export_dir(export_dir: str) -> Tuple[str, str]:
  """(the directory that holds the model's base directory, the model's name).

  Args:
    export_dir: a model's base directory, `<parent>/<model name>`.

  Returns:
    (parent, name); a local parent is absolute, so "." and relative names have one.
  """
  if "://" not in export_dir:
    export_dir = os.path.abspath(export_dir)
  return posixpath.split(export_dir.rstrip("/"))


def existing_versions(export_dir: str) -> List[int]:
  """The version numbers under `export_dir`, oldest first ([] if it does not exist)."""
  if not tf.io.gfile.isdir(export_dir):
    return []
  # Some filesystems (gs://) list directories with a trailing "/".
  return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
                if d.rstrip("/").isdigit())


def next_version(export_dir: str) -> int:
  """Seconds since the epoch, bumped past any existing version: always increasing."""
  versions = existing_versions(export_dir)
  return max([int(time.time())] + [v + 1 for v in versions])


def _publish(tmp: str, final: str) -> None:
  """Moves the complete version directory `tmp` to `final`.

  A local rename is atomic. Other filesystems rename a directory object by
  object (gs://) or move only its own entry and leave its files behind
  (ram://), so there the files move one by one, saved_model.pb last: a server
  that looks early finds no model yet rather than half of one.
  """
  if files.is_local(final):
    tf.io.gfile.rename(tmp, final)
    return
  moves = []
  for directory, _, names in tf.io.gfile.walk(tmp):
    relative = directory[len(tmp.rstrip("/")):].strip("/")
    target = files.join(final, relative) if relative else final
    tf.io.gfile.makedirs(target)
    # ram:// also lists a sibling that extends a directory's name as its child
    # (assets.extra under assets, as ".extra"): only paths that exist move.
    moves += [(files.join(directory, n), files.join(target, n)) for n in names
              if tf.io.gfile.exists(files.join(directory, n))]
  model_file = files.join(final, SAVED_MODEL_FILE)
  try:
    for source, target in sorted(moves, key=lambda move: move[1] == model_file):
      tf.io.gfile.rename(source, target)
  except BaseException:
    files.remove(final)  # a failed export leaves no version without its model file
    raise
  files.remove(tmp)


def export_saved_model(model: keras.Model, schema: schema_lib.Schema, export_dir: str,
                       version: Optional[int] = None, serving_task: Optional[str] = None,
                       warmup_examples: Optional[Sequence[bytes]] = None,
                       keep: Optional[int] = None, fusion: Optional[dict] = None) -> str:
  """Writes `<export_dir>/<version>/` with every `signatures.SIGNATURES` row that
  applies, the schema in `assets.extra/schema.json` and, with warm-up examples,
  TF Serving's warm-up requests.

  Args:
    model: the functional model, one output per task of `schema`; a training
      model with a bias tower is exported as its serving model
      (`models.serving_model`).
    schema: the schema the model was built from.
    export_dir: the model's base directory (its name is the serving name).
    version: the version number (default: `next_version`); never overwritten.
    serving_task: the task behind the classify/regress signatures (default: the
      schema's first task).
    warmup_examples: serialized serving-layout tf.Examples for the warm-up file.
    keep: afterwards, delete all but the newest `keep` versions.
    fusion: {"mode": "sum" or "product", "terms": [...], "weights": [...]} adds the
      `rank` signature (see `mtl_zoo.layers.parse_fusion`).

  Returns:
    The version directory's path.
  """
  model = models.serving_model(model)
  missing = [t for t in schema.task_names if t not in output_names(model)]
  if missing:
    raise ValueError(f"model outputs {output_names(model)} lack tasks {missing} of the "
                     "schema; export the model with the schema it was built from.")
  tf.io.gfile.makedirs(export_dir)
  version = next_version(export_dir) if version is None else int(version)
  final = files.join(export_dir, str(version))
  if tf.io.gfile.exists(final):
    raise FileExistsError(f"export version {final} already exists; versions are never "
                          "overwritten, pick another or let it choose the next one.")
  tmp = files.temporary_sibling(final)
  try:
    module = signatures.ServingModule(model, schema, serving_task, fusion)
    tf.saved_model.save(module, tmp, signatures=signatures.build_signatures(module))
    signatures.set_method_names(tmp)
    tf.io.gfile.makedirs(files.join(tmp, "assets.extra"))
    schema.save(files.join(tmp, SCHEMA_ASSET))
    if warmup_examples:
      warmup.write_warmup_requests(files.join(tmp, warmup.WARMUP_ASSET), warmup_examples,
                                   split_export_dir(export_dir)[1])
    _publish(tmp, final)
  finally:
    if tf.io.gfile.exists(tmp):
      files.remove(tmp)
  if keep:
    prune_versions(export_dir, keep)
  return final


def prune_versions(export_dir: str, keep: int) -> List[int]:
  """Deletes all but the newest `keep` versions.

  Args:
    export_dir: the model's base directory.
    keep: how many of the newest versions stay (>= 1).

  Returns:
    The deleted version numbers.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}.")
  doomed = existing_versions(export_dir)[:-keep]
  for version in doomed:
    path = files.join(export_dir, str(version))
    if files.is_local(path):
      # One rename takes the whole version out of the server's sight at once.
      hidden = files.temporary_sibling(path)
      tf.io.gfile.rename(path, hidden)
      path = hidden
    else:
      # Elsewhere a rename copies file by file; without its model file first, a
      # half-deleted version cannot be loaded.
      files.remove(files.join(path, SAVED_MODEL_FILE))
    files.remove(path)
  return doomed
