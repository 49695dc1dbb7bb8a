"""The search space: which training settings a search varies, and over what.

Every parameter is named as its `python -m mtl_zoo.train` flag, so a trial's
values are flags (its flagfile) and a space file reads like the CLI:

  {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true},
   "num_experts": {"type": "int", "low": 2, "high": 32},
   "expert_units": {"type": "categorical", "choices": ["16", "64,32"]},
   "loss_weighting": "fixed",          a plain value: fixed, not searched
   "dropout": null}                    null: not searched (the base flags' value)

A space file's entries replace the default entries of the same name (narrow or
widen them) and may add parameters the defaults leave out: a balancer's options
(`dwa_temperature`, searched only in trials that choose that balancer), any
architecture flag and `learning_rate_decay_steps`. `task_weights` is one range
for the loss weight of every task but the first, which is held at 1 (scaling
every weight alike changes little under Adam; fixing one removes those
duplicates); it is searched in trials with --loss_weighting=fixed (the other
balancers set the weights themselves).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import tensorflow as tf

from mtl_zoo import balancers
from mtl_zoo import models
from mtl_zoo.config import RunConfig
from pipelines import files

# The builders' hyper-parameters that are train flags (train.ARCHITECTURE_FLAGS;
# tests/test_tune.py checks they agree): only these can be searched, since a
# trial's flagfile must reproduce it.
ARCHITECTURE_PARAMETERS = ("num_experts", "num_task_experts", "num_shared_experts",
                           "num_levels", "expert_units", "bottom_units", "tower_units",
                           "dropout", "embeddings_l2", "cross_layers", "l2_distance_weight",
                           "cross_stitch_self_weight")
# Architecture flags with list values (comma-separated units; "" is no layer).
UNIT_PARAMETERS = ("expert_units", "bottom_units", "tower_units")
# Run-level parameters (RunConfig fields) a space may vary, for every architecture;
# all but `learning_rate_decay_steps` are in DEFAULT_SPACE (the default search keeps
# the decay as given; a space file may name it).
RUN_PARAMETERS = ("learning_rate", "learning_rate_decay_steps", "batch_size", "loss_weighting",
                  "task_weights")
# Run parameters whose flags take integers only.
INTEGER_RUN_PARAMETERS = ("learning_rate_decay_steps", "batch_size")
# Balancers that need dense parameters shared by the tasks (refused otherwise).
TASK_GRADIENT_BALANCERS = tuple(n for n, c in balancers.BALANCERS.items()
                                if c.uses_task_gradients)

DEFAULT_SPACE: Dict[str, Any] = {
    "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [256, 512, 1024, 2048, 4096]},
    "loss_weighting": {"type": "categorical", "choices": list(balancers.BALANCERS)},
    "task_weights": {"type": "float", "low": 0.2, "high": 5.0, "log": True},
    "num_experts": {"type": "int", "low": 2, "high": 16},
    "num_task_experts": {"type": "int", "low": 1, "high": 4},
    "num_shared_experts": {"type": "int", "low": 1, "high": 4},
    "num_levels": {"type": "int", "low": 1, "high": 3},
    "expert_units": {"type": "categorical", "choices": ["16", "32", "64", "64,32"]},
    "bottom_units": {"type": "categorical", "choices": ["64", "128", "256", "128,64"]},
    "tower_units": {"type": "categorical", "choices": ["", "8", "16", "32"]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "embeddings_l2": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "l2_distance_weight": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "cross_stitch_self_weight": {"type": "float", "low": 0.5, "high": 1.0},
}
TYPES = ("int", "float", "categorical")


class SpaceError(ValueError):
  """A search space that cannot be used; the message names the entry and the fix."""


@dataclasses.dataclass(frozen=True)
class Parameter:
  """One searched (or fixed) parameter.

  Args:
    name: its train flag.
    kind: "int", "float", "categorical" or "fixed".
    low, high, log, step: the range of int and float parameters.
    choices: the values of a categorical one.
    value: the value of a fixed one.
  """

  name: str
  kind: str
  low: Optional[float] = None
  high: Optional[float] = None
  log: bool = False
  step: Optional[float] = None
  choices: Optional[tuple] = None
  value: Any = None

  def suggest(self, trial, name: Optional[str] = None):
    """The trial's value (Optuna `trial.suggest_*`), under `name` (default: its own)."""
    name = name or self.name
    if self.kind == "fixed":
      return self.value
    if self.kind == "int":
      return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1),
                               log=self.log)
    if self.kind == "float":
      return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
    return trial.suggest_categorical(name, list(self.choices))


@dataclasses.dataclass
class Space:
  """The parameters one search varies, for one architecture and task list.

  Args:
    parameters: name -> Parameter, every one applicable to the architecture.
    tasks: the data's tasks (the first one's loss weight is held at 1).
    loss_weighting: the balancer of trials that do not search it.
  """

  parameters: Dict[str, Parameter]
  tasks: List[str]
  loss_weighting: str = "fixed"

  def suggest(self, trial) -> Dict[str, Any]:
    """One trial's settings: flag name -> value (flag syntax: units as '64,32',
    task_weights as 'ctr=1,cvr=0.7')."""
    values = {}
    for name, parameter in self.parameters.items():
      balancer = values.get("loss_weighting", self.loss_weighting)
      owner = balancers.option_owners().get(name)
      if owner and balancer != owner:
        continue  # an option of a balancer this trial does not use
      if name == "task_weights":
        if balancer != "fixed" or len(self.tasks) < 2:
          continue
        weights = [1.0] + [parameter.suggest(trial, f"task_weights:{t}")
                           for t in self.tasks[1:]]
        values[name] = ",".join(f"{t}={w!r}" for t, w in zip(self.tasks, weights))
      else:
        values[name] = parameter.suggest(trial)
    return values

  def describe(self) -> List[str]:
    """One line per parameter, for the search's header."""
    lines = []
    for p in self.parameters.values():
      if p.kind == "fixed":
        lines.append(f"  {p.name} = {p.value!r}")
      elif p.kind == "categorical":
        lines.append(f"  {p.name} in {list(p.choices)}")
      else:
        lines.append(f"  {p.name} in [{p.low:g}, {p.high:g}]" + (" (log)" if p.log else ""))
    return lines


def make_space(architecture: str, tasks: Sequence[str], entries: Optional[dict] = None,
               fixed_flags: Sequence[str] = (), where: str = "the space",
               loss_weighting: str = "fixed", shares_parameters: bool = True) -> Space:
  """The search space of `architecture`: the defaults it applies to, changed by
  `entries` (a space file's), less the parameters fixed by the command line.

  Args:
    architecture: a MODELS name.
    tasks: the data's tasks, in schema order.
    entries: name -> entry, as in a space file (see the module docstring).
    fixed_flags: train flags given explicitly, which the search leaves alone.
    where: the space's origin for messages (a file name).
    loss_weighting: the balancer when the space does not search it.
    shares_parameters: whether the architecture's tasks share dense parameters
      on the data (`shares_parameters`); if not, the balancers that need them
      (GradNorm, PCGrad) are left out of the default space.

  Returns:
    The Space.

  Raises:
    SpaceError: naming the entry, what is wrong and the fix.
  """
  takes = models.builder_arguments(architecture)
  default = {name: entry for name, entry in DEFAULT_SPACE.items()
             if name in RUN_PARAMETERS or name in takes}
  if not shares_parameters:
    default["loss_weighting"] = {"type": "categorical", "choices": [
        n for n in balancers.BALANCERS if n not in TASK_GRADIENT_BALANCERS]}
  merged = dict(default)
  for name, entry in (entries or {}).items():
    _check_applies(name, architecture, takes, where)
    merged[name] = entry
  parameters = {}
  for name, entry in merged.items():
    if entry is None or name in fixed_flags:
      continue
    parameters[name] = _parameter(name, entry, where)
  return Space(parameters, list(tasks), loss_weighting)


def shares_parameters(architecture: str, schema) -> bool:
  """Whether `architecture`'s trained tasks share dense parameters on `schema`
  (what GradNorm and PCGrad need; `balancers.sharing_architectures` asks it of
  every architecture, which costs seconds).

  Args:
    architecture: a MODELS name.
    schema: the data's schema.
  """
  train_schema = models.training_schema(architecture, schema)
  try:
    balancers.balanced_indices(models.build(architecture, train_schema), train_schema,
                               [t.name for t in train_schema.tasks if t.loss_weight > 0])
  except ValueError:  # NothingSharedError, or fewer than two trained tasks
    return False
  return True


def load_space_file(path: str) -> dict:
  """A space file's entries (a JSON object).

  Args:
    path: the --space file, on any filesystem tf.io.gfile reads.

  Returns:
    Flag name -> entry, as written (checked later by the space itself).

  Raises:
    SpaceError: the file is missing or not a JSON object.
  """
  if not tf.io.gfile.exists(path):
    raise SpaceError(f"--space={path} does not exist; give a JSON file of search entries "
                     "(see mtl_zoo/tuning/space.py).")
  try:
    entries = files.read_json(path)
  except ValueError as e:
    raise SpaceError(f"--space={path} is not valid JSON: {e}.") from None
  if not isinstance(entries, dict):
    raise SpaceError(f"--space={path} must hold a JSON object of name -> entry, e.g. "
                     '{"num_experts": {"type": "int", "low": 2, "high": 16}}.')
  return entries


def _check_applies(name: str, architecture: str, takes: dict, where: str) -> None:
  if name in RUN_PARAMETERS or name in balancers.option_owners():
    return
  if name in takes and name in ARCHITECTURE_PARAMETERS:
    return
  takers = [m for m in sorted(models.MODELS) if name in models.builder_arguments(m)
            and name in ARCHITECTURE_PARAMETERS]
  if takers:
    raise SpaceError(f"{where}: entry '{name}' does not apply to --model={architecture}; it "
                     f"is taken by {', '.join(takers)}. Remove the entry or choose one of "
                     "those architectures.")
  known = sorted(set(RUN_PARAMETERS) | set(balancers.option_owners())
                 | (set(takes) & set(ARCHITECTURE_PARAMETERS)))
  raise SpaceError(f"{where}: entry '{name}' is not a parameter the search can vary; for "
                   f"--model={architecture} they are {known}.")


def _parameter(name: str, entry, where: str) -> Parameter:
  """A Parameter from one space entry (a plain value is fixed)."""
  def fail(problem):
    raise SpaceError(f"{where}: entry '{name}' {problem}. An entry looks like "
                     '{"type": "int", "low": 2, "high": 16}, {"type": "float", "low": 1e-4, '
                     '"high": 1e-2, "log": true}, {"type": "categorical", "choices": [...]}, '
                     "a plain value (fixed) or null (not searched).")

  if not isinstance(entry, dict):
    _check_value(name, entry, fail)
    return Parameter(name, "fixed", value=entry)
  kind = entry.get("type")
  if kind not in TYPES:
    fail(f"has type {kind!r}; it must be one of {list(TYPES)}")
  allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log",
                                                               "step"}
  extra = sorted(set(entry) - allowed)
  if extra:
    fail(f"has unknown keys {extra} for type {kind}")
  if kind == "categorical":
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
      fail("needs 'choices', a non-empty list")
    for choice in choices:
      _check_value(name, choice, fail)
    return Parameter(name, kind, choices=tuple(choices))
  if name in INTEGER_RUN_PARAMETERS and kind == "float":
    fail("has type float; its flag takes integers: use type int")
  low, high, log = entry.get("low"), entry.get("high"), entry.get("log", False)
  numbers = (int,) if kind == "int" else (int, float)
  for key, value in (("low", low), ("high", high)):
    if isinstance(value, bool) or not isinstance(value, numbers) or not math.isfinite(value):
      fail(f"needs '{key}', a{'n integer' if kind == 'int' else ' number'}; got {value!r}")
  if low > high:
    fail(f"has low {low} above high {high}")
  if not isinstance(log, bool):
    fail(f"has log {log!r}; it must be true or false")
  if log and low <= 0:
    fail(f"has log true with low {low}; a log range needs low > 0")
  step = entry.get("step")
  if step is not None and (isinstance(step, bool) or not isinstance(step, numbers)
                           or step <= 0 or log):
    fail(f"has step {step!r}; it must be a positive number, and not with log")
  for value in (low, high):
    _check_value(name, value, fail)
  return Parameter(name, kind, low=low, high=high, log=log, step=step)


def _check_value(name: str, value, fail) -> None:
  """Refuses a value the parameter's flag cannot take."""
  if name in UNIT_PARAMETERS:
    try:
      ok = isinstance(value, str) and all(int(u) > 0 for u in value.split(",") if u.strip())
    except ValueError:
      ok = False
    if not ok:
      fail(f"has value {value!r}; units are a string of comma-separated positive integers, "
           "e.g. \"64,32\" (\"\" for no layer)")
  elif name == "loss_weighting":
    if value not in balancers.BALANCERS:
      fail(f"has value {value!r}; it must be one of {list(balancers.BALANCERS)}")
  elif name == "task_weights":
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      fail(f"has value {value!r}; a task weight is a positive number")
  elif isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(f"has value {value!r}; it must be a number")
  elif name in INTEGER_RUN_PARAMETERS and not isinstance(value, int):
    fail(f"has value {value!r}; it must be an integer")
  elif name in ("learning_rate", "batch_size") and not value > 0:
    fail(f"has value {value!r}; it must be positive")
  elif name == "learning_rate_decay_steps" and value < 0:
    fail(f"has value {value!r}; it must be 0 (a constant rate) or more")


def apply(base: RunConfig, values: Dict[str, Any]) -> RunConfig:
  """`base` with one trial's values applied.

  Args:
    base: the settings every trial starts from (the command's train flags).
    values: flag name -> flag-syntax value: run settings, balancer options and
      the architecture's hyper-parameters.

  Returns:
    A new RunConfig; `base` is unchanged.
  """
  hyperparameters = dict(base.hyperparameters)
  options = dict(base.balancer_options)
  changes = {}
  for name, value in values.items():
    if name in RUN_PARAMETERS:
      changes[name] = value
    elif name in balancers.option_owners():
      options[name] = float(value)
    elif name in UNIT_PARAMETERS:
      hyperparameters[name] = [int(u) for u in value.split(",") if u.strip()]
    else:
      hyperparameters[name] = value
  if changes.get("loss_weighting", base.loss_weighting) != base.loss_weighting:
    # Options of the base's balancer do not apply to the trial's.
    owners = balancers.option_owners()
    options = {k: v for k, v in options.items()
               if owners[k] == changes["loss_weighting"]}
  return dataclasses.replace(base, hyperparameters=hyperparameters, balancer_options=options,
                             **changes)


def as_flags(values: Dict[str, Any]) -> List[str]:
  """One trial's values as train flags.

  Args:
    values: flag name -> value.

  Returns:
    Flags such as '--learning_rate=0.0031' (floats at full precision).
  """
  return [f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}"
          for name, value in values.items()]
