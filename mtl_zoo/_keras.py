"""The only module that knows Keras 2 from Keras 3.

mtl_zoo builds on Keras 2 (the `tf-keras` package) because TensorFlow
Recommenders 0.7.7 refuses Keras 3. TensorFlow picks the Keras behind `tf.keras`
from TF_USE_LEGACY_KERAS the first time `tf.keras` is touched, so this module
sets it before that happens and refuses to run if Keras 3 was already chosen.
Everything in mtl_zoo imports `keras` from here.
"""

import os
import sys

_LEGACY_VALUES = ("1", "true", "True")


def _tf_keras_is_keras_3() -> bool:
  """Whether an already imported TensorFlow has bound tf.keras to Keras 3.

  Until first use, tf.keras is a lazy loader that records its choice in its
  own __dict__ (reading attributes through it would trigger the choice); after
  use, TensorFlow may replace it with the chosen module itself.
  """
  tensorflow = sys.modules.get("tensorflow")
  bound = tensorflow.__dict__.get("keras") if tensorflow else None
  if bound is None:
    return False
  if type(bound).__name__ == "KerasLazyLoader":
    return bound.__dict__.get("_tfll_keras_version") == "keras_3"
  return bound.__dict__.get("__name__", "").startswith("keras.")


def _require_legacy_keras() -> None:
  value = os.environ.get("TF_USE_LEGACY_KERAS")
  if value is not None and value not in _LEGACY_VALUES:
    raise ImportError(
        f"TF_USE_LEGACY_KERAS={value!r} selects Keras 3, but mtl_zoo (and TensorFlow "
        "Recommenders) need Keras 2 from the tf-keras package. Unset it or set "
        "TF_USE_LEGACY_KERAS=1 before starting Python.")
  if _tf_keras_is_keras_3():
    raise ImportError(
        "tf.keras is already bound to Keras 3 in this process, and mtl_zoo needs Keras 2 "
        "(tf-keras). Import mtl_zoo before anything touches tf.keras, or set "
        "TF_USE_LEGACY_KERAS=1 in the environment before starting Python.")
  os.environ["TF_USE_LEGACY_KERAS"] = "1"


_require_legacy_keras()

import tf_keras as keras  # noqa: E402  (must follow the check above)

__all__ = ["keras"]
