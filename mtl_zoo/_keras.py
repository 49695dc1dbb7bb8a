"""The only module that knows Keras 2 from Keras 3.

mtl_zoo runs on either, written once: Keras 2 (the `tf-keras` package, with
TensorFlow Recommenders' DCN cross) or Keras 3 with the TensorFlow backend
(with keras-rs' `FeatureCross`). Everything in mtl_zoo imports `keras` and the
few shims that differ from here.

Which Keras, decided once at the first `import mtl_zoo`:
  1. the Keras the process already uses: Keras 3 when tf.keras is already
     bound to Keras 3, when TF_USE_LEGACY_KERAS is set to a false value, or
     when the Keras 3 package (`import keras`) is already imported and tf.keras
     is not bound to Keras 2;
  2. otherwise MTL_ZOO_KERAS (`2` or `3`; the CLIs' way to choose);
  3. otherwise Keras 2, as before.
MTL_ZOO_KERAS contradicting the process's choice is refused with the fix.

TensorFlow binds tf.keras from TF_USE_LEGACY_KERAS the first time tf.keras is
touched, so for Keras 2 this module sets it to 1 before that happens.
"""

import os
import sys

ENV_VAR = "MTL_ZOO_KERAS"
_LEGACY_VALUES = ("1", "true", "True")


def _tf_keras_binding() -> str:
  """What an already imported TensorFlow bound tf.keras to: "keras_3",
  "keras_2" or "" (not yet chosen, or TensorFlow not imported).

  Until first use, tf.keras is a lazy loader that records its choice in its
  own __dict__ (reading attributes through it would trigger the choice); after
  use, TensorFlow may replace it with the chosen module itself.
  """
  tensorflow = sys.modules.get("tensorflow")
  bound = tensorflow.__dict__.get("keras") if tensorflow else None
  if bound is None:
    return ""
  if type(bound).__name__ == "KerasLazyLoader":
    return {"keras_3": "keras_3", "keras_2": "keras_2"}.get(
        bound.__dict__.get("_tfll_keras_version"), "")
  name = bound.__dict__.get("__name__", "")
  if name.startswith("tf_keras"):
    return "keras_2"
  return "keras_3" if name.startswith("keras") else ""


def _keras_3_imported() -> bool:
  """Whether the process has imported the Keras 3 package itself."""
  module = sys.modules.get("keras")
  return bool(module) and str(getattr(module, "__version__", "")).startswith("3")


def _choose() -> int:
  """The Keras major version this process uses (2 or 3); see the module doc."""
  requested = os.environ.get(ENV_VAR, "").strip()
  if requested not in ("", "2", "3"):
    raise ImportError(f"{ENV_VAR}={requested!r}: set it to 2 (Keras 2, tf-keras) or "
                      "3 (Keras 3 with the TensorFlow backend), or unset it.")
  legacy = os.environ.get("TF_USE_LEGACY_KERAS")
  binding = _tf_keras_binding()
  if binding == "keras_3" or (legacy is not None and legacy not in _LEGACY_VALUES):
    why = ("tf.keras is already bound to Keras 3" if binding == "keras_3" else
           f"TF_USE_LEGACY_KERAS={legacy!r} selects Keras 3")
    if requested == "2":
      raise ImportError(
          f"{ENV_VAR}=2 asks for Keras 2, but {why} in this process. Unset {ENV_VAR} "
          "(mtl_zoo then uses Keras 3), or set TF_USE_LEGACY_KERAS=1 before starting "
          "Python and import mtl_zoo before anything touches tf.keras.")
    return 3
  if binding == "keras_2" or legacy is not None:
    if requested == "3":
      raise ImportError(
          f"{ENV_VAR}=3 asks for Keras 3, but tf.keras is Keras 2 in this process "
          "(TF_USE_LEGACY_KERAS is set, or tf.keras was bound to tf-keras). Unset "
          f"TF_USE_LEGACY_KERAS, or unset {ENV_VAR}.")
    return 2
  if requested:
    return int(requested)
  return 3 if _keras_3_imported() else 2


VERSION = _choose()

if VERSION == 2:
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  import tf_keras as keras  # noqa: E402  (must follow the choice above)
else:
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras  # noqa: E402
  if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"mtl_zoo needs Keras 3's TensorFlow backend, and this process uses "
        f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before starting Python.")

KERAS_3 = VERSION == 3


class Layer(keras.layers.Layer):
  """The base of mtl_zoo's layers: a Keras layer whose `call` is TensorFlow ops
  without Python control flow on tensors, so AutoGraph has nothing to rewrite.
  Keras 2 rewrites every subclassed layer's `call` before tracing it (~0.9 s a
  process over the zoo's layers); Keras 3 never does. A subclass (also a
  user's) writes `tf.cond`/`tf.while_loop` where it branches on a tensor, as
  under Keras 3."""

  if not KERAS_3:
    def _should_use_autograph(self) -> bool:
      return False


def feature_cross(name: str):
  """A DCN-v2 cross layer, called as `layer(x0, x)`: x0 * (W x + b) + x.

  TensorFlow Recommenders' `Cross` under Keras 2, keras-rs' `FeatureCross`
  under Keras 3: the same full-rank formula and the same variables (kernel
  [d, d], then bias [d]), so weights move between the two.

  Args:
    name: the layer's name.

  Returns:
    An unbuilt cross layer.
  """
  if KERAS_3:
    import keras_rs  # only models with crosses pay its import
    return keras_rs.layers.FeatureCross(name=name)
  import tensorflow_recommenders as tfrs  # only models with crosses pay its import
  return tfrs.layers.dcn.Cross(name=name)


def default_adam(learning_rate: float, decay_steps: int = 0):
  """Adam as compile_model uses it by default.

  Keras 2's legacy Adam applies each variable's update in one fused kernel,
  where its new one issues ~10 ops per variable, which dominates small models
  on a CPU; Keras 3 has only the new one.

  Args:
    learning_rate: Adam's learning rate (at the first step, with `decay_steps`).
    decay_steps: N > 0: the rate at step t is learning_rate / (1 + t / N)
      (inverse time decay); 0: constant.

  Returns:
    A Keras optimizer.
  """
  if decay_steps:
    learning_rate = keras.optimizers.schedules.InverseTimeDecay(learning_rate, decay_steps,
                                                                decay_rate=1.0)
  if KERAS_3:
    return keras.optimizers.Adam(learning_rate)
  return keras.optimizers.legacy.Adam(learning_rate)


def create_training_state(trainable) -> None:
  """Creates, before the first train step, the variables Keras would create
  inside it: the optimizer's slots and the per-task loss means.

  A tf.function whose first call creates variables is traced twice (once to
  create them, once more without), so this halves the train step's tracing,
  the largest part of a first epoch's extra time on small data. What it cannot
  make ahead (an optimizer without a way to, a model not built yet, a
  subclassed model's loss means) is made in the first step, as before.

  Args:
    trainable: a compiled model (or `balancers.MultiTaskTrainer`).
  """
  variables = trainable.trainable_variables
  optimizer = trainable.optimizer
  # Keras 2 marks functional models (and their subclasses); Keras 3 has the class.
  functional = bool(getattr(trainable, "_is_graph_network", False)
                    or type(trainable).__name__ == "Functional")
  with trainable.distribute_strategy.scope():  # where compile and fit make them
    # Slots for every trainable variable, also one a balancer's step leaves
    # without a gradient (a task with loss weight 0): unused, zero, saved. None
    # for a model not built yet: Keras 3 would tie the optimizer to no variables.
    if variables and hasattr(optimizer, "_create_all_weights"):  # Keras 2's legacy ones
      optimizer._create_all_weights(variables)
    elif variables and hasattr(optimizer, "build"):  # Keras 3's, tf-keras' new ones
      optimizer.build(variables)
    if not functional:
      return
    if KERAS_3:
      loss = getattr(trainable, "_compile_loss", None)
      if loss is not None and not loss.built:
        loss.build(trainable.output, trainable.output)  # labels mirror the outputs
    elif trainable.loss and not trainable.compiled_loss.built:
      trainable.compiled_loss.build(trainable.output)


# The ending of weights-only checkpoints: Keras 2 writes TensorFlow checkpoints
# (a prefix, no ending); Keras 3's ModelCheckpoint accepts only `.weights.h5`.
WEIGHTS_SUFFIX = ".weights.h5" if KERAS_3 else ""


def load_weights(model, path: str) -> None:
  """Loads a weights-only checkpoint that `model`'s ModelCheckpoint wrote
  (Keras 2: without the optimizer slots it also holds).

  Args:
    model: the model (or trainer) that was fitted.
    path: the checkpoint (its prefix under Keras 2), with `WEIGHTS_SUFFIX`.
  """
  if KERAS_3:
    model.load_weights(path)
  else:
    model.load_weights(path).expect_partial()


def input_names(model) -> list:
  """Names of a functional model's inputs (Keras 3 has no `input_names`).

  Args:
    model: a functional Keras model.

  Returns:
    The input names, in the model's order.
  """
  if not KERAS_3:
    return model.input_names
  return list(model.input) if isinstance(model.input, dict) else [t.name for t in model.inputs]


def outputs_by_name(model) -> dict:
  """A functional model's symbolic outputs by output name.

  Keras 3's `output_names` are the producing layers' names and its `outputs`
  are flattened in sorted key order; the output dict's own keys are what the
  model returns, so they are the names under Keras 3.

  Args:
    model: a functional Keras model.

  Returns:
    dict output name -> symbolic tensor, in the model's order.
  """
  if KERAS_3 and isinstance(model.output, dict):
    return dict(model.output)
  return dict(zip(model.output_names, model.outputs))


def dict_output(layer, keys) -> dict:
  """The symbolic dict a layer returned when called in a functional model
  (Keras 3 keeps only the flattened values, in sorted key order).

  Args:
    layer: a layer called once, whose call returns a dict.
    keys: that dict's keys.

  Returns:
    dict key -> symbolic tensor.
  """
  if not KERAS_3:
    return layer.output
  (node,) = layer._inbound_nodes
  return dict(zip(sorted(keys), node.outputs))


def output_names(model) -> list:
  """Names of a functional model's outputs (see `outputs_by_name`).

  Args:
    model: a functional Keras model.

  Returns:
    The output names, in the model's order.
  """
  return list(outputs_by_name(model))


__all__ = ["keras", "VERSION", "KERAS_3", "ENV_VAR", "feature_cross", "default_adam",
           "create_training_state",
           "WEIGHTS_SUFFIX", "load_weights", "input_names", "output_names",
           "outputs_by_name", "dict_output"]
