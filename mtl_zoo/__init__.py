"""mtl_zoo: multi-objective ranking models for TensorFlow / Keras.

Importing mtl_zoo follows the Keras the process uses (Keras 3 if it already
does, else MTL_ZOO_KERAS, else Keras 2 from tf-keras); `mtl_zoo._keras` says how.
"""

from mtl_zoo._keras import keras  # noqa: F401  (first: chooses the Keras)
from mtl_zoo.models import (MODELS, build, build_cgc, build_cross_stitch, build_esmm,
                            build_l2_constrained, build_mmoe, build_omoe, build_ple,
                            build_shared_bottom, build_single_task, training_schema)
from mtl_zoo.compile import compile_model
from pipelines.schema import Schema

__version__ = "0.1.0"

__all__ = ["keras", "MODELS", "build", "build_single_task", "build_shared_bottom",
           "build_omoe", "build_mmoe", "build_cgc", "build_ple", "build_esmm",
           "build_cross_stitch", "build_l2_constrained", "compile_model",
           "training_schema", "Schema", "__version__"]
