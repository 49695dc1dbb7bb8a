"""SavedModel export for TF Serving, with signatures derived from the schema.

Every export has:
  serving_default  examples: string [batch] of serialized serving-layout
                   tf.Examples (one named feature per schema feature) ->
                   one float32 [batch] output per task, named by task.
  features         the schema's raw feature tensors (see
                   `Schema.feature_signature`) -> the same outputs.
  classify         (binary serving task) TF Serving's Classify API: inputs
                   (serialized tf.Examples) -> scores float32 [batch, 2]
                   (P(0), P(1)) and classes string [batch, 2] ("0", "1").
  regress          TF Serving's Regress API: inputs -> outputs float32 [batch],
                   the serving task's value (its probability, if binary).
  rank             (with a fusion) examples -> every task output and `score`, the
                   fused ranking score (`mtl_zoo.layers.ScoreFusion`). A request
                   may override the fusion weights per example with the float
                   feature `__fusion_weights__` (one weight per term, in order).
The serving task is `serving_task`, by default the schema's first task. Labels
are never inputs. The schema travels in `assets.extra/schema.json` so clients
can build requests from it; with warm-up examples, `assets.extra/
tf_serving_warmup_requests` holds PredictionLog records TF Serving replays
before it takes traffic. Versions are written to a hidden temporary directory
and renamed into `<export_dir>/<version>` only when complete, so TF Serving
(which watches numeric directories) never sees a half-written model.
"""

import os
import shutil
import time
import uuid
from typing import Dict, Optional, Sequence

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from mtl_zoo import layers
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib

SERVING_DEFAULT = "serving_default"
FEATURES_SIGNATURE = "features"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
RANK_SIGNATURE = "rank"
FUSION_WEIGHTS_FEATURE = "__fusion_weights__"
SCHEMA_ASSET = os.path.join("assets.extra", schema_lib.SCHEMA_FILENAME)
WARMUP_ASSET = os.path.join("assets.extra", "tf_serving_warmup_requests")


class ServingModule(tf.Module):
  """Wraps a Keras model with the schema's parse and per-task outputs."""

  def __init__(self, model: keras.Model, schema: schema_lib.Schema,
               serving_task: Optional[str] = None, fusion: Optional[dict] = None):
    super().__init__(name="mtl_zoo_serving")
    self.model = model
    self._schema = schema
    self._task = schema.task(serving_task or schema.task_names[0])
    self._fusion = None
    if fusion:
      numeric = [f.name for f in schema.numeric]
      unknown = [t for t in fusion["terms"] if t not in schema.task_names + numeric]
      if unknown:
        raise schema_lib.SchemaError(
            f"fusion terms {unknown} are neither tasks {schema.task_names} nor numeric "
            f"features {numeric}.")
      self._fusion = layers.ScoreFusion(fusion["mode"], fusion["terms"], fusion["weights"])
    examples = tf.TensorSpec([None], tf.string, name="examples")
    inputs = tf.TensorSpec([None], tf.string, name=tf.saved_model.CLASSIFY_INPUTS)
    self.serve_examples = tf.function(self._serve_examples, input_signature=[examples])
    self.serve_features = tf.function(
        self._predict, input_signature=[schema.feature_signature()])
    self.classify = tf.function(self._classify, input_signature=[inputs])
    self.regress = tf.function(self._regress, input_signature=[inputs])
    if self._fusion:
      self.rank = tf.function(self._rank, input_signature=[examples])

  def _predict(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    outputs = self.model(features, training=False)
    return {task: tf.reshape(outputs[task], [-1]) for task in self._schema.task_names}

  def _serve_examples(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
    return self._predict(self._schema.parse_serving_examples(examples))

  def _classify(self, inputs: tf.Tensor) -> Dict[str, tf.Tensor]:
    p = self._serve_examples(inputs)[self._task.name]
    scores = tf.stack([1.0 - p, p], axis=1)
    classes = tf.tile(tf.constant([["0", "1"]]), [tf.shape(p)[0], 1])
    return {tf.saved_model.CLASSIFY_OUTPUT_SCORES: scores,
            tf.saved_model.CLASSIFY_OUTPUT_CLASSES: classes}

  def _regress(self, inputs: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {tf.saved_model.REGRESS_OUTPUTS: self._serve_examples(inputs)[self._task.name]}

  def _rank(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
    weights_spec = {FUSION_WEIGHTS_FEATURE: tf.io.FixedLenFeature(
        [len(self._fusion.terms)], tf.float32, default_value=self._fusion.weights_config)}
    parsed = self._schema.parse_serving_examples(examples, weights_spec)
    weights = parsed.pop(FUSION_WEIGHTS_FEATURE)
    outputs = self._predict(parsed)
    # Numeric terms use the raw value the caller sent (e.g. the price); a
    # non-finite one counts as missing, as in the model, not as a NaN score.
    terms = {**{f.name: tf.where(tf.math.is_finite(parsed[f.name]), parsed[f.name],
                                 self._schema.missing_numeric_value(f))
                for f in self._schema.numeric}, **outputs}
    return {**outputs, "score": self._fusion(terms, weights)}

  def signatures(self) -> dict:
    signatures = {SERVING_DEFAULT: self.serve_examples.get_concrete_function(),
                  FEATURES_SIGNATURE: self.serve_features.get_concrete_function(),
                  REGRESS_SIGNATURE: self.regress.get_concrete_function()}
    if self._task.type == schema_lib.BINARY:
      signatures[CLASSIFY_SIGNATURE] = self.classify.get_concrete_function()
    if self._fusion:
      signatures[RANK_SIGNATURE] = self.rank.get_concrete_function()
    return signatures


METHOD_NAMES = {CLASSIFY_SIGNATURE: tf.saved_model.CLASSIFY_METHOD_NAME,
                REGRESS_SIGNATURE: tf.saved_model.REGRESS_METHOD_NAME}


def combine_models(models: Sequence[keras.Model], schema: schema_lib.Schema,
                   name: str = "combined") -> keras.Model:
  """One functional model over `schema`'s features whose outputs are all the given
  models' outputs (e.g. one single-objective model per task), so several models
  export, fuse and serve as one SavedModel. Task names must not repeat."""
  inputs = layers.schema_inputs(schema)
  outputs = {}
  names = [model.name for model in models]
  for model in models:
    if names.count(model.name) > 1:
      # A nested model is a layer, and layer names must be unique (separately
      # trained runs are often all called e.g. "single_task").
      model._name = f"{model.name}_{'_'.join(model.output_names)}"
    produced = model({n: inputs[n] for n in model.input_names})
    clash = set(produced) & set(outputs)
    if clash:
      raise ValueError(f"models {[m.name for m in models]} both output {sorted(clash)}; "
                       "combined models need distinct task names.")
    # A named pass-through per output: nested models would otherwise name the
    # combined outputs after themselves instead of their tasks.
    outputs.update({task: keras.layers.Activation("linear", name=task)(tensor)
                    for task, tensor in produced.items()})
  return keras.Model(inputs, outputs, name=name)


def combine_runs(trained: Sequence[tuple], name: str = "combined") -> tuple:
  """(model, schema) pairs of runs on the same features -> one combined model
  and the schema with all their tasks (see `combine_models`)."""
  base = trained[0][1]
  for _, schema in trained[1:]:
    if [f.to_dict() for f in schema.features] != [f.to_dict() for f in base.features]:
      raise schema_lib.SchemaError(
          f"schemas {base.name!r} and {schema.name!r} declare different features; only "
          "models trained on the same data layout can be combined.")
  tasks = [task for _, schema in trained for task in schema.tasks]
  schema = schema_lib.Schema(base.features, base.labels, tasks, base.request_id, base.name)
  return combine_models([model for model, _ in trained], schema, name), schema


def _set_method_names(saved_model_dir: str) -> None:
  """TF2's saver marks every signature "predict"; TF Serving's Classify and
  Regress APIs require their own method names, so set them in the proto."""
  path = os.path.join(saved_model_dir, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(path, "rb") as f:
    proto.ParseFromString(f.read())
  for meta_graph in proto.meta_graphs:
    for name, method in METHOD_NAMES.items():
      if name in meta_graph.signature_def:
        meta_graph.signature_def[name].method_name = method
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(proto.SerializeToString())


def write_warmup_requests(path: str, examples: Sequence[bytes], model_name: str) -> int:
  """PredictionLog records (one request of every example, one of a single one)
  that TF Serving replays against `serving_default` when it loads the model."""
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
  batches = [list(examples), list(examples[:1])] if len(examples) > 1 else [list(examples)]
  with tf.io.TFRecordWriter(path) as writer:
    for batch in batches:
      request = predict_pb2.PredictRequest()
      request.model_spec.name = model_name
      request.model_spec.signature_name = SERVING_DEFAULT
      request.inputs["examples"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
      log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return len(batches)


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
                       version: Optional[int] = None, serving_task: Optional[str] = None,
                       warmup_examples: Optional[Sequence[bytes]] = None,
                       keep: Optional[int] = None, fusion: Optional[dict] = None) -> str:
  """Writes `<export_dir>/<version>/` atomically and returns its path.

  Args:
    serving_task: the task behind the classify/regress signatures (default: the
      schema's first task).
    warmup_examples: serialized serving-layout tf.Examples for the warm-up file.
    keep: afterwards, delete all but the newest `keep` versions.
    fusion: {"mode": "sum" or "product", "terms": [...], "weights": [...]} adds the
      `rank` signature (see `mtl_zoo.layers.fusion.parse_fusion`).
  """
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
    module = ServingModule(model, schema, serving_task, fusion)
    tf.saved_model.save(module, tmp, signatures=module.signatures())
    _set_method_names(tmp)
    tf.io.gfile.makedirs(os.path.join(tmp, "assets.extra"))
    schema.save(os.path.join(tmp, SCHEMA_ASSET))
    if warmup_examples:
      write_warmup_requests(os.path.join(tmp, WARMUP_ASSET), warmup_examples,
                            os.path.basename(os.path.normpath(export_dir)))
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if keep:
    prune_versions(export_dir, keep)
  return final


def write_serving_configs(export_dir: str, serving_root: str = "/models",
                          num_versions: int = 1, max_batch_size: int = 256) -> list:
  """Writes `models.config` and `batching_parameters.txt` beside the model's base
  directory (`export_dir`), for `tensorflow_model_server --model_config_file=...
  --enable_batching --batching_parameters_file=...`.

  The config serves every model found beside `export_dir` (each directory with
  numbered versions), so exporting a second model does not drop the first.
  `serving_root` is that parent directory as the server sees it (the
  tensorflow/serving Docker image mounts models under /models).
  """
  parent = os.path.dirname(os.path.abspath(export_dir))
  names = sorted({os.path.basename(os.path.normpath(export_dir))} | {
      d for d in os.listdir(parent)
      if os.path.isdir(os.path.join(parent, d)) and existing_versions(os.path.join(parent, d))})
  entries = "".join(
      "  config {\n"
      f'    name: "{name}"\n'
      f'    base_path: "{serving_root.rstrip("/")}/{name}"\n'
      '    model_platform: "tensorflow"\n'
      f"    model_version_policy {{ latest {{ num_versions: {num_versions} }} }}\n"
      "  }\n" for name in names)
  models_config = "model_config_list {\n" + entries + "}\n"
  # CPU defaults: batches up to max_batch_size, waiting at most 2 ms to fill one,
  # one batching thread per core.
  batching = (f"max_batch_size {{ value: {max_batch_size} }}\n"
              "batch_timeout_micros { value: 2000 }\n"
              f"num_batch_threads {{ value: {os.cpu_count() or 2} }}\n"
              "max_enqueued_batches { value: 100 }\n"
              "pad_variable_length_inputs: true\n")
  written = []
  for filename, text in (("models.config", models_config),
                         ("batching_parameters.txt", batching)):
    path = os.path.join(parent, filename)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    written.append(path)
  return written


def prune_versions(export_dir: str, keep: int) -> list:
  """Deletes all but the newest `keep` versions; returns the deleted ones.

  Each is renamed to a hidden name first, so a server never loads a version
  that is half deleted.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}.")
  doomed = existing_versions(export_dir)[:-keep]
  for version in doomed:
    hidden = os.path.join(export_dir, f".deleting-{version}-{uuid.uuid4().hex[:8]}")
    os.rename(os.path.join(export_dir, str(version)), hidden)
    shutil.rmtree(hidden, ignore_errors=True)
  return doomed


def _main(argv):
  """`python -m mtl_zoo.export`: export a trained model directory again."""
  import sys
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  trained = []
  for model_dir in FLAGS.model_dir:
    try:
      trained.append((keras.models.load_model(os.path.join(model_dir, "model.keras")),
                      schema_lib.Schema.load(os.path.join(model_dir,
                                                          schema_lib.SCHEMA_FILENAME))))
    except (OSError, ValueError) as e:
      print(f"error: --model_dir={model_dir} does not hold a trained model (model.keras "
            f"and schema.json, as `python -m mtl_zoo.train` writes them): {e}",
            file=sys.stderr)
      sys.exit(1)
  if len(trained) == 1:
    model, schema = trained[0]
  else:
    try:
      model, schema = combine_runs(trained, FLAGS.model_name or "combined")
    except (ValueError, schema_lib.SchemaError) as e:
      print(f"error: --model_dir runs cannot be combined: {e}", file=sys.stderr)
      sys.exit(1)
  name = FLAGS.model_name or model.name
  export_dir = os.path.join(FLAGS.export_base, name)
  warmup = None
  if FLAGS.warmup_files:
    from pipelines import reader
    warmup = schema.serving_examples(reader.read_columns(FLAGS.warmup_files, schema,
                                                         limit=FLAGS.warmup_examples))
  fusion = layers.parse_fusion(FLAGS.fusion) if FLAGS.fusion else None
  path = export_saved_model(model, schema, export_dir, serving_task=FLAGS.serving_task,
                            warmup_examples=warmup, keep=FLAGS.keep, fusion=fusion)
  configs = write_serving_configs(export_dir, FLAGS.serving_root)
  print(f"SavedModel: {os.path.abspath(path)}")
  print("Serving configs: " + ", ".join(configs))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_list("model_dir", None, "A training run's --model_dir (model.keras, "
                    "schema.json); several, comma-separated, export as one combined model "
                    "(e.g. one single-objective run per task, fused with --fusion).",
                    required=True)
  flags.DEFINE_string("export_base", None, "Writes <export_base>/<model_name>/<version>/ "
                      "and, beside it, models.config and batching_parameters.txt.",
                      required=True)
  flags.DEFINE_string("model_name", None, "Serving name (default: the Keras model's name).")
  flags.DEFINE_string("serving_task", None, "Task behind classify/regress (default: first).")
  flags.DEFINE_string("warmup_files", None, "Training-layout TFRecords to take warm-up "
                      "examples from (e.g. the eval split).")
  flags.DEFINE_integer("warmup_examples", 32, "Examples in the warm-up request.")
  flags.DEFINE_integer("keep", None, "Keep only the newest N versions.", lower_bound=1)
  flags.DEFINE_string("fusion", None, "Adds the rank signature, e.g. "
                      "'product:ctr=1,cvr=0.5,price=1' or 'sum:ctr=1,cvr=2'.")
  flags.DEFINE_string("serving_root", "/models", "--export_base as the server sees it, "
                      "for models.config (the tensorflow/serving image's /models).")
  app.run(_main)
