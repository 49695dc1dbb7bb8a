"""The export's serving signatures, defined once in `SIGNATURES`.

Each row maps a signature name to the function that builds it and the TF
Serving method name that serves it; the same table gives the SavedModel its
signatures and writes their method names into saved_model.pb. A new signature
is one builder function plus one row:

  def score_only(module: ServingModule) -> Optional[SignatureFunction]:
    def serve(examples):  # the serving task's output alone, as `score`
      return {"score": module.serve_examples(examples)[module.task.name]}
    return tf.function(serve, input_signature=[EXAMPLES_SPEC], autograph=False)

  SIGNATURES["score_only"] = Signature(score_only, PREDICT_METHOD)

A builder returns None where its signature does not apply to an export (e.g.
`classify` for a regression serving task). A signature's input names are its
function's argument names, which must equal their TensorSpecs' names.
"""

from typing import Callable, Dict, NamedTuple, Optional

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from mtl_zoo import layers
from mtl_zoo._keras import keras
from pipelines import files
from pipelines import schema as schema_lib

SERVING_DEFAULT = "serving_default"
FEATURES_SIGNATURE = "features"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
RANK_SIGNATURE = "rank"
EXAMPLES_INPUT = "examples"
FUSION_WEIGHTS_FEATURE = "__fusion_weights__"

PREDICT_METHOD = tf.saved_model.PREDICT_METHOD_NAME
CLASSIFY_METHOD = tf.saved_model.CLASSIFY_METHOD_NAME
REGRESS_METHOD = tf.saved_model.REGRESS_METHOD_NAME

# Serialized serving-layout tf.Examples, as the Predict API sends them and as
# the Classify/Regress APIs do (under their fixed input name).
EXAMPLES_SPEC = tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)
INPUTS_SPEC = tf.TensorSpec([None], tf.string, name=tf.saved_model.CLASSIFY_INPUTS)


class ServingModule(tf.Module):
  """A Keras model with the schema's parse and per-task outputs: what every
  signature builder works from.

  Args:
    model: the trained functional model, one output per task of `schema`.
    schema: the schema the model was built from.
    serving_task: the task behind classify/regress (default: the first).
    fusion: {"mode", "terms", "weights"} (`mtl_zoo.layers.parse_fusion`), for the
      `rank` signature; terms are tasks or numeric features.
  """

  def __init__(self, model: keras.Model, schema: schema_lib.Schema,
               serving_task: Optional[str] = None, fusion: Optional[dict] = None):
    super().__init__(name="mtl_zoo_serving")
    self._hold_untracked(model, layers.score_fusion(fusion, schema) if fusion else None)
    # What the signatures read, saved with them: a built functional model's
    # weights (the fusion has none). A layer holding another resource, such as
    # a lookup table, would need it tracked here too (saving names it if not).
    self.model_variables = list(model.variables)
    self.schema = schema
    self.task = schema.task(serving_task or schema.task_names[0])

  @tf.__internal__.tracking.no_automatic_dependency_tracking
  def _hold_untracked(self, model: keras.Model, fusion: Optional[keras.layers.Layer]) -> None:
    # The SavedModel holds the signatures and the variables they read, not the
    # Keras objects: saving those traces every layer's call once more (about
    # half of an export's time) for functions no server runs.
    self.model = model
    self.fusion = fusion

  def predict(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Feature tensors -> one float32 [batch] output per task."""
    outputs = self.model(features, training=False)
    return {task: tf.reshape(outputs[task], [-1]) for task in self.schema.task_names}

  def serve_examples(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Serialized serving-layout tf.Examples [batch] -> `predict`'s outputs."""
    return self.predict(self.schema.parse_serving_examples(examples))


SignatureFunction = tf.types.experimental.GenericFunction


# Signatures are TensorFlow ops without Python control flow on tensors, so they
# are traced with AutoGraph off: it would only spend time rewriting them.


def serving_default(module: ServingModule) -> SignatureFunction:
  """examples: string [batch] -> one float32 [batch] per task, named by task."""
  def serve(examples):
    return module.serve_examples(examples)
  return tf.function(serve, input_signature=[EXAMPLES_SPEC], autograph=False)


def features(module: ServingModule) -> SignatureFunction:
  """The schema's raw feature tensors (`Schema.feature_signature`) -> the same
  outputs as serving_default."""
  return tf.function(module.predict, input_signature=[module.schema.feature_signature()],
                     autograph=False)


def classify(module: ServingModule) -> Optional[SignatureFunction]:
  """Classify API, binary serving task only: inputs -> scores float32 [batch, 2]
  (P(0), P(1)) and classes string [batch, 2] ("0", "1")."""
  if module.task.type != schema_lib.BINARY:
    return None

  def serve(inputs):
    p = module.serve_examples(inputs)[module.task.name]
    scores = tf.stack([1.0 - p, p], axis=1)
    classes = tf.tile(tf.constant([["0", "1"]]), [tf.shape(p)[0], 1])
    return {tf.saved_model.CLASSIFY_OUTPUT_SCORES: scores,
            tf.saved_model.CLASSIFY_OUTPUT_CLASSES: classes}
  return tf.function(serve, input_signature=[INPUTS_SPEC], autograph=False)


def regress(module: ServingModule) -> SignatureFunction:
  """Regress API: inputs -> outputs float32 [batch], the serving task's value
  (its probability, if binary)."""
  def serve(inputs):
    return {tf.saved_model.REGRESS_OUTPUTS: module.serve_examples(inputs)[module.task.name]}
  return tf.function(serve, input_signature=[INPUTS_SPEC], autograph=False)


def rank(module: ServingModule) -> Optional[SignatureFunction]:
  """With a fusion only: examples -> every task output and `score`, the fused
  ranking score. The optional float feature `__fusion_weights__` (one weight per
  term, in order) overrides the configured weights per example."""
  fusion = module.fusion
  if fusion is None:
    return None

  def serve(examples):
    weights_spec = {FUSION_WEIGHTS_FEATURE: tf.io.FixedLenFeature(
        [len(fusion.terms)], tf.float32, default_value=fusion.weights_config)}
    parsed = module.schema.parse_serving_examples(examples, weights_spec)
    weights = parsed.pop(FUSION_WEIGHTS_FEATURE)
    outputs = module.predict(parsed)
    # Numeric terms use the raw value the caller sent (e.g. the price); the
    # fusion reads a non-finite one as missing, as `strategies.ranking_score` does.
    numeric = {f.name: parsed[f.name] for f in module.schema.numeric
               if not f.train_only}
    return {**outputs, "score": fusion({**numeric, **outputs}, weights)}
  return tf.function(serve, input_signature=[EXAMPLES_SPEC], autograph=False)


class Signature(NamedTuple):
  """One row of `SIGNATURES`.

  Attributes:
    build: ServingModule -> the signature's `tf.function` (with its input
      signature), or None where the signature does not apply to the export.
    method: the TF Serving method name (PREDICT_METHOD, CLASSIFY_METHOD or
      REGRESS_METHOD) written into saved_model.pb.
  """
  build: Callable[[ServingModule], Optional[SignatureFunction]]
  method: str


SIGNATURES: Dict[str, Signature] = {
    SERVING_DEFAULT: Signature(serving_default, PREDICT_METHOD),
    FEATURES_SIGNATURE: Signature(features, PREDICT_METHOD),
    CLASSIFY_SIGNATURE: Signature(classify, CLASSIFY_METHOD),
    REGRESS_SIGNATURE: Signature(regress, REGRESS_METHOD),
    RANK_SIGNATURE: Signature(rank, PREDICT_METHOD),
}


def build_signatures(
    module: ServingModule) -> Dict[str, tf.types.experimental.ConcreteFunction]:
  """The concrete function of every `SIGNATURES` row that applies to `module`.

  Args:
    module: the model, schema, serving task and fusion to serve.

  Returns:
    {signature name: concrete function}, for `tf.saved_model.save(signatures=...)`.
  """
  built = {name: row.build(module) for name, row in SIGNATURES.items()}
  return {name: function.get_concrete_function()
          for name, function in built.items() if function is not None}


def set_method_names(saved_model_dir: str) -> None:
  """Writes each signature's `SIGNATURES` method name into saved_model.pb: TF2's
  saver marks every signature "predict", and TF Serving's Classify and Regress
  APIs refuse a signature that is not marked as theirs.

  Args:
    saved_model_dir: a SavedModel directory written with `build_signatures`.
  """
  path = files.join(saved_model_dir, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(path, "rb") as f:
    proto.ParseFromString(f.read())
  for meta_graph in proto.meta_graphs:
    for name, row in SIGNATURES.items():
      if name in meta_graph.signature_def:
        meta_graph.signature_def[name].method_name = row.method
  # A new file renamed over the old: ram:// appends to a file opened again for writing.
  with files.atomic_open(path, "wb") as f:
    f.write(proto.SerializeToString())
