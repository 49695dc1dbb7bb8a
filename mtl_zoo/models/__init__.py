"""Model builders and the registry that maps CLI `--model` names to them.

A new architecture is one module here with a `build_<name>(schema, ...)` function
and one line in MODELS.
"""

import inspect
from typing import Callable, Dict

from mtl_zoo.models.common import compile_model, task_towers
from mtl_zoo.models.mmoe import build_mmoe
from mtl_zoo.models.shared_bottom import build_shared_bottom

MODELS: Dict[str, Callable] = {
    "shared_bottom": build_shared_bottom,
    "mmoe": build_mmoe,
}


def get_builder(name: str) -> Callable:
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.") from None


def build(name: str, schema, **hparams):
  """Builds model `name`, passing only the hyper-parameters its builder takes."""
  builder = get_builder(name)
  accepted = inspect.signature(builder).parameters
  return builder(schema, **{k: v for k, v in hparams.items() if k in accepted})


__all__ = ["MODELS", "build", "get_builder", "build_mmoe", "build_shared_bottom",
           "compile_model", "task_towers"]
