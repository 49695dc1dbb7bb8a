"""A training run's settings: one object, built once from the CLI's flags or in
Python, validated before anything is read or written.

  config = RunConfig(train_files="data/train-*", eval_files="data/eval-*",
                     model="ple", hyperparameters={"num_levels": 2}, epochs=3)
  result = runner.run(config)

Field names equal the `python -m mtl_zoo.train` flags, so every error names the
setting both ways (`--num_experts`). Strategy options left as None take the
strategy's default; setting one for another strategy is refused, as are
architecture hyper-parameters and balancer options that the chosen
architecture or balancer does not take.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Union

from mtl_zoo import balancers
from mtl_zoo import losses
from mtl_zoo import models
from mtl_zoo import strategies
from mtl_zoo.distribute import DISTRIBUTIONS
from pipelines import schema as schema_lib
from pipelines import validation


class ConfigError(ValueError):
  """Settings that cannot be combined; the message names them and the fix."""


# Strategy option -> the one strategy that reads it, and its default there.
STRATEGY_OPTIONS = {"event_weights": ("sample_weighting", None),
                    "duplicate": ("sample_weighting", False),
                    "grades": ("learning_to_rank", None),
                    "ranking_loss": ("learning_to_rank", "listwise"),
                    "list_size": ("learning_to_rank", 10)}
RANKING_LOSSES = ("listwise", "pairwise")


@dataclasses.dataclass
class RunConfig:
  """Everything one training run depends on. See `python -m mtl_zoo.train
  --helpfull` for each field's meaning (same names).

  `hyperparameters` are the architecture builder's keyword arguments (e.g.
  `num_experts`, `expert_units`); those not given take the builder's defaults.
  `balancer_options` are the chosen balancer's OPTIONS. `schema` may be a path
  or a loaded `Schema`. Without `train_files`, the data source `source` (a
  `pipelines.sources.SOURCES` name) writes the built-in data under
  `output_dir/data` with `source_options`. `quiet` silences the progress
  output (for repeated runs, e.g. experiments).
  """

  strategy: str = "multi_task"
  model: Optional[str] = None
  train_files: Optional[str] = None
  eval_files: Optional[str] = None
  schema: Union[str, schema_lib.Schema, None] = None
  tasks: Optional[List[str]] = None
  event_weights: Optional[str] = None
  duplicate: Optional[bool] = None
  grades: Optional[str] = None
  ranking_loss: Optional[str] = None
  list_size: Optional[int] = None
  output_dir: str = "mtl_zoo_output"
  model_dir: Optional[str] = None
  export_dir: Optional[str] = None
  loss_weighting: str = "fixed"
  balancer_options: Dict[str, float] = dataclasses.field(default_factory=dict)
  balance_on: str = balancers.LAST_SHARED
  masked_loss: str = losses.DEFAULT_MASKED_LOSS
  fusion: Optional[str] = None
  keep: Optional[int] = None
  serving_task: Optional[str] = None
  serving_threads: Optional[int] = None
  epochs: int = 5
  batch_size: int = 2048
  steps_per_epoch: Optional[int] = None
  distribution: str = "none"
  ps_shards: int = 0
  ps_min_shard_bytes: int = 256 << 10
  backup_every_steps: int = 1000
  learning_rate: float = 2e-3
  hyperparameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  cache: bool = True
  shuffle_block: int = 8192
  bad_records: str = validation.FAIL
  source: str = "synthetic"
  source_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  quiet: bool = False

  @property
  def architecture(self) -> str:
    """--model, or its default: mmoe for multi_task, single_task otherwise."""
    return self.model or ("mmoe" if self.strategy == "multi_task" else "single_task")

  @property
  def run_label(self) -> str:
    """The run's name in default directories: the architecture, or the strategy."""
    return self.architecture if self.strategy == "multi_task" else self.strategy

  def option(self, name: str):
    """A strategy option's value, or its default when unset."""
    value = getattr(self, name)
    return STRATEGY_OPTIONS[name][1] if value is None else value

  def validate(self) -> None:
    """Raises ConfigError for settings that do not apply or cannot be combined."""
    _choice("strategy", self.strategy, strategies.STRATEGIES)
    _choice("model", self.architecture, sorted(models.MODELS))
    _choice("loss_weighting", self.loss_weighting, sorted(balancers.BALANCERS))
    _choice("distribution", self.distribution, DISTRIBUTIONS)
    _choice("bad_records", self.bad_records, validation.BAD_RECORD_POLICIES)
    _choice("balance_on", self.balance_on, balancers.BALANCE_ON)
    _choice("masked_loss", self.masked_loss, losses.MASKED_LOSSES)
    if (self.balance_on != balancers.LAST_SHARED
        and not balancers.get_balancer(self.loss_weighting).uses_task_gradients):
      raise ConfigError(f"--balance_on={self.balance_on} applies to the balancers that take "
                        "per-task gradients (" + ", ".join(
                            f"--loss_weighting={n}" for n, c in balancers.BALANCERS.items()
                            if c.uses_task_gradients)
                        + f"), not --loss_weighting={self.loss_weighting}.")
    if self.ranking_loss is not None:
      _choice("ranking_loss", self.ranking_loss, RANKING_LOSSES)
    for name, (strategy, _) in STRATEGY_OPTIONS.items():
      if getattr(self, name) is not None and self.strategy != strategy:
        raise ConfigError(f"--{name} belongs to --strategy={strategy}; this run has "
                          f"--strategy={self.strategy}.")
    if self.loss_weighting != "fixed" and self.strategy != "multi_task":
      raise ConfigError(f"--loss_weighting={self.loss_weighting} balances several tasks "
                        f"in one model; --strategy={self.strategy} trains one task per "
                        "model. Use --strategy=multi_task.")
    if self.distribution != "none" and self.loss_weighting != "fixed":
      raise ConfigError(
          f"--loss_weighting={self.loss_weighting} trains with its own train step, which "
          "computes task losses and gradients per replica; it is only available with "
          "--distribution=none. Use --loss_weighting=fixed to distribute.")
    if self.distribution in ("multi_worker", "parameter_server") and not self.train_files:
      raise ConfigError(f"--distribution={self.distribution} needs --train_files: "
                        "workers read shares of the same files.")
    if self.eval_files and not self.train_files:
      raise ConfigError("--eval_files needs --train_files (without both, the built-in "
                        "synthetic data is used).")
    if self.export_dir == "":
      for name in ("keep", "serving_task", "serving_threads"):
        if getattr(self, name) is not None:
          raise ConfigError(f"--{name} configures the export, but --export_dir='' skips "
                            f"it; drop --{name} or set --export_dir.")
    self._check_hyperparameters()
    self._check_balancer_options()
    for name in ("epochs", "batch_size", "shuffle_block"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")

  def _check_hyperparameters(self) -> None:
    accepted = models.builder_arguments(self.architecture)
    for name in self.hyperparameters:
      if name not in accepted or name == "name":
        takers = [m for m in sorted(models.MODELS) if name in models.builder_arguments(m)]
        raise ConfigError(
            f"--{name} does not apply to --model={self.architecture}"
            + (f"; it is taken by {', '.join(takers)}. Drop --{name} or choose one of "
               "those architectures." if takers else
               f"; no architecture takes it. Drop --{name}."))

  def _check_balancer_options(self) -> None:
    declared = balancers.get_balancer(self.loss_weighting).OPTIONS
    owners = balancers.option_owners()
    for name in self.balancer_options:
      if name not in declared:
        owner = owners.get(name)
        raise ConfigError(f"--{name} does not apply to --loss_weighting="
                          f"{self.loss_weighting}"
                          + (f"; it belongs to --loss_weighting={owner}." if owner else "."))


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"--{name}={value} is not one of {list(choices)}.")
