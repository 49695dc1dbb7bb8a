"""SavedModel export for TF Serving, with signatures derived from the schema.

Every export has:
  serving_default  examples: string [batch] of serialized serving-layout
                   tf.Examples (one named feature per schema feature) ->
                   one float32 [batch] output per task, named by task.
  features         the schema's raw feature tensors (see
                   `Schema.feature_signature`) -> the same outputs.
Labels are never inputs. The schema travels in `assets.extra/schema.json` so
clients can build requests from it. Versions are written to a hidden temporary
directory and renamed into `<export_dir>/<version>` only when complete, so TF
Serving (which watches numeric directories) never sees a half-written model.
"""

import os
import shutil
import time
import uuid
from typing import Dict, Optional

import tensorflow as tf

from mtl_zoo._keras import keras
from pipelines import schema as schema_lib

SERVING_DEFAULT = "serving_default"
FEATURES_SIGNATURE = "features"
SCHEMA_ASSET = os.path.join("assets.extra", schema_lib.SCHEMA_FILENAME)


class ServingModule(tf.Module):
  """Wraps a Keras model with the schema's parse and per-task outputs."""

  def __init__(self, model: keras.Model, schema: schema_lib.Schema):
    super().__init__(name="mtl_zoo_serving")
    self.model = model
    self._schema = schema
    self.serve_examples = tf.function(
        self._serve_examples,
        input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    self.serve_features = tf.function(
        self._predict, input_signature=[schema.feature_signature()])

  def _predict(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    outputs = self.model(features, training=False)
    return {task: tf.reshape(outputs[task], [-1]) for task in self._schema.task_names}

  def _serve_examples(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
    return self._predict(self._schema.parse_serving_examples(examples))

  def signatures(self) -> dict:
    return {SERVING_DEFAULT: self.serve_examples.get_concrete_function(),
            FEATURES_SIGNATURE: self.serve_features.get_concrete_function()}


def existing_versions(export_dir: str) -> list:
  if not tf.io.gfile.isdir(export_dir):
    return []
  return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
                if d.rstrip("/").isdigit())


def next_version(export_dir: str) -> int:
  """Seconds since the epoch, bumped past any existing version: always increasing."""
  versions = existing_versions(export_dir)
  return max([int(time.time())] + [v + 1 for v in versions])


def export_saved_model(model: keras.Model, schema: schema_lib.Schema, export_dir: str,
                       version: Optional[int] = None) -> str:
  """Writes `<export_dir>/<version>/` atomically and returns its path."""
  missing = [t for t in schema.task_names if t not in model.output_names]
  if missing:
    raise ValueError(f"model outputs {model.output_names} lack tasks {missing} of the "
                     "schema; export the model with the schema it was built from.")
  tf.io.gfile.makedirs(export_dir)
  version = next_version(export_dir) if version is None else int(version)
  final = os.path.join(export_dir, str(version))
  if tf.io.gfile.exists(final):
    raise FileExistsError(f"export version {final} already exists; versions are never "
                          "overwritten, pick another or let it choose the next one.")
  tmp = os.path.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
  try:
    module = ServingModule(model, schema)
    tf.saved_model.save(module, tmp, signatures=module.signatures())
    tf.io.gfile.makedirs(os.path.dirname(os.path.join(tmp, SCHEMA_ASSET)))
    schema.save(os.path.join(tmp, SCHEMA_ASSET))
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final
