"""Model builders and the registry that maps CLI `--model` names to them.

A new architecture is one module here with a `build_<name>(schema, ...)` function
and one line in MODELS (and one in TRAINING_SCHEMAS if it trains on derived tasks,
like ESMM). Train-only features (`Feature.train_only`) need nothing from a builder:
`build` wraps every architecture with the bias tower (`models/bias.py`).
"""

import inspect
from typing import Callable, Dict

from mtl_zoo.models.bias import biased_tasks, serving_model, with_bias_tower
from mtl_zoo.models.combine import combine_models, combine_runs
from mtl_zoo.models.common import task_towers
from mtl_zoo.models.esmm import build_esmm, entire_space_schema
from mtl_zoo.models.mmoe import build_mmoe
from mtl_zoo.models.omoe import build_omoe
from mtl_zoo.models.ple import build_cgc, build_ple
from mtl_zoo.models.shared_bottom import build_shared_bottom
from mtl_zoo.models.single_task import build_single_task
from mtl_zoo.models.soft_sharing import build_cross_stitch, build_l2_constrained

MODELS: Dict[str, Callable] = {
    "single_task": build_single_task,
    "shared_bottom": build_shared_bottom,
    "omoe": build_omoe,
    "mmoe": build_mmoe,
    "cgc": build_cgc,
    "ple": build_ple,
    "esmm": build_esmm,
    "cross_stitch": build_cross_stitch,
    "l2_constrained": build_l2_constrained,
}

# Architectures that train on different tasks than the data's schema declares.
TRAINING_SCHEMAS: Dict[str, Callable] = {"esmm": entire_space_schema}


def training_schema(name: str, schema):
  """The schema model `name` is trained, evaluated and exported with."""
  get_builder(name)
  return TRAINING_SCHEMAS.get(name, lambda s: s)(schema)


def get_builder(name: str) -> Callable:
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.") from None


def builder_arguments(name: str) -> Dict[str, object]:
  """The hyper-parameters model `name`'s builder takes, with their defaults
  (everything but the schema)."""
  parameters = list(inspect.signature(get_builder(name)).parameters.values())[1:]
  return {p.name: p.default for p in parameters}


def hyperparameters_of(name: str, hparams: dict, with_defaults: bool = False) -> dict:
  """The subset of `hparams` that model `name`'s builder takes.

  Args:
    name: a MODELS name.
    hparams: hyper-parameters, possibly for several architectures.
    with_defaults: also the builder's defaults for those not in `hparams`.

  Returns:
    A dict of the builder's keyword arguments.
  """
  accepted = builder_arguments(name)
  chosen = {k: v for k, v in hparams.items() if k in accepted}
  return {**{k: v for k, v in accepted.items() if k != "name"}, **chosen} if with_defaults \
      else chosen


def build(architecture: str, schema, /, **hparams):
  """Builds `architecture` (a MODELS name) with `hparams` (`name` among them: the
  Keras model's name); a hyper-parameter its builder does not take is an error
  naming the architectures that do (use `hyperparameters_of` to pick a subset
  of a shared dict). With train-only features that bias a task, the model to
  train: the architecture inside `with_bias_tower` (`serving_model` gives it
  back)."""
  accepted = builder_arguments(architecture)
  unknown = sorted(set(hparams) - set(accepted))
  if unknown:
    takers = sorted(m for m in MODELS if set(unknown) & set(builder_arguments(m)))
    raise ValueError(f"{architecture} does not take {unknown}"
                     + (f"; {', '.join(takers)} do." if takers else "."))
  return with_bias_tower(get_builder(architecture)(schema, **hparams), schema)


__all__ = ["MODELS", "combine_models", "combine_runs", "build", "get_builder", "hyperparameters_of", "build_single_task", "build_shared_bottom",
           "build_omoe", "build_mmoe", "build_cgc", "build_ple", "build_esmm",
           "build_cross_stitch", "build_l2_constrained", "task_towers", "training_schema", "TRAINING_SCHEMAS",
           "serving_model", "with_bias_tower", "biased_tasks"]
