"""A training run's settings: one object, built once from the CLI's flags or in
Python, validated before anything is read or written.

  config = RunConfig(train_files="data/train-*", eval_files="data/eval-*",
                     model="ple", hyperparameters={"num_levels": 2}, max_epochs=3)
  result = runner.run(config)

Field names equal the `python -m mtl_zoo.train` flags, so every error names the
setting both ways (`--num_experts`). Strategy options left as None take the
strategy's default; setting one for another strategy is refused, as are
architecture hyper-parameters and balancer options that the chosen
architecture or balancer does not take.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

from mtl_zoo import _keras
from mtl_zoo import balancers
from mtl_zoo import early_stopping
from mtl_zoo import losses
from mtl_zoo import models
from mtl_zoo import strategies
from mtl_zoo.distribute import DISTRIBUTIONS
from pipelines import caching
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
CALIBRATION_METHODS = ("platt", "isotonic")


# Resume identity: every RunConfig field is in exactly one of these two sets
# (tests/test_early_stopping.py checks it). A backup is resumed only by a run
# whose RESULT_FIELDS are equal: any of them changes the trained weights, the
# order or number of steps, or the checkpoint's layout. The rest choose where
# outputs go, what is printed, or what happens after training.
RESULT_FIELDS = ("strategy", "model", "train_files", "schema", "tasks", "event_weights",
                 "duplicate", "grades", "ranking_loss", "list_size", "loss_weighting",
                 "balancer_options", "balance_on", "masked_loss", "max_epochs", "monitor",
                 "patience", "batch_size",
                 "steps_per_epoch", "distribution", "ps_shards", "ps_min_shard_bytes",
                 "cpu_replicas",
                 "backup_every_steps", "learning_rate", "learning_rate_decay_steps",
                 "hyperparameters", "seed", "cache",
                 "cache_memory_mb",
                 "shuffle_block", "bad_records", "source", "source_options", "eval_files",
                 "negative_sampling", "task_weights")
OUTPUT_FIELDS = ("output_dir", "model_dir", "export_dir", "fusion", "keep", "serving_task",
                 "serving_threads", "quiet", "calibrate", "calibration_files", "beyond_k")


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
  max_epochs: int = 10
  monitor: Optional[str] = None
  patience: Optional[int] = None
  batch_size: int = 2048
  steps_per_epoch: Optional[int] = None
  distribution: str = "none"
  ps_shards: int = 0
  ps_min_shard_bytes: int = 256 << 10
  cpu_replicas: int = 0
  backup_every_steps: int = 1000
  learning_rate: float = 2e-2
  learning_rate_decay_steps: int = 500
  hyperparameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  cache: str = "auto"
  cache_memory_mb: Optional[int] = None
  shuffle_block: int = 8192
  bad_records: str = validation.FAIL
  source: str = "synthetic"
  source_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  quiet: bool = False
  # Calibration (issue 13; mtl_zoo/calibration.py).
  calibrate: Optional[str] = None
  calibration_files: Optional[str] = None
  negative_sampling: Optional[float] = None
  # Task loss weights over the schema's, e.g. "ctr=1,cvr=0.5" (issue 15: tuned).
  task_weights: Optional[str] = None
  # List length of the ranking report's coverage, diversity and novelty (None:
  # strategies.default_beyond_k).
  beyond_k: Optional[int] = None

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
    _choice("cache", self.cache, caching.MODES)
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
    _refuse_under_keras_3(self)
    if self.distribution != "none" and self.loss_weighting != "fixed":
      raise ConfigError(
          f"--loss_weighting={self.loss_weighting} trains with its own train step, which "
          "computes task losses and gradients per replica; it is only available with "
          "--distribution=none. Use --loss_weighting=fixed to distribute.")
    if self.distribution in ("multi_worker", "parameter_server") and not self.train_files:
      raise ConfigError(f"--distribution={self.distribution} needs --train_files: "
                        "workers read shares of the same files.")
    if self.cpu_replicas and self.distribution != "mirrored":
      raise ConfigError(f"--cpu_replicas splits the CPU for --distribution=mirrored; this "
                        f"run has --distribution={self.distribution}.")
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
    self._check_early_stopping()
    self._check_calibration()
    if self.beyond_k is not None and self.beyond_k < 1:
      raise ConfigError(f"--beyond_k must be at least 1, got {self.beyond_k}.")
    for name in ("max_epochs", "batch_size", "shuffle_block"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
    if not self.learning_rate > 0 or self.learning_rate_decay_steps < 0:
      raise ConfigError(f"--learning_rate must be > 0 and --learning_rate_decay_steps >= 0 "
                        f"(0: constant), got {self.learning_rate} and "
                        f"{self.learning_rate_decay_steps}.")

  def _check_early_stopping(self) -> None:
    if self.train_files and not self.eval_files:
      for name in ("monitor", "patience"):
        if getattr(self, name) is not None:
          raise ConfigError(f"--{name} watches the eval data after every epoch; give "
                            f"--eval_files, or drop --{name} to train --max_epochs epochs.")
    try:
      if self.monitor:
        early_stopping.Monitor(self.monitor)
    except ValueError as e:
      raise ConfigError(f"--monitor={self.monitor}: {e}") from None
    if self.patience is not None and self.patience < 0:
      raise ConfigError(f"--patience must be 0 (never stop early) or more, got "
                        f"{self.patience}.")

  def monitor_spec(self, task_types: Sequence[str]) -> str:
    """--monitor, or its default for these tasks (`early_stopping.default_monitor`:
    the mean of their AUCs, or of their MSEs when all are regressions).

    Args:
      task_types: the type of each task the run trains.

    Returns:
      The monitor spec, e.g. "auc" or "ctr:auc,cvr:auc".
    """
    return self.monitor or early_stopping.default_monitor(task_types)

  @property
  def patience_epochs(self) -> int:
    """--patience, or its default."""
    return early_stopping.DEFAULT_PATIENCE if self.patience is None else self.patience

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

  def _check_calibration(self) -> None:
    """--calibrate, --calibration_files, --negative_sampling; the checks that
    need the data's tasks are in `mtl_zoo.calibration.prepare`."""
    if self.calibrate is not None:
      _choice("calibrate", self.calibrate, CALIBRATION_METHODS)
    if self.calibration_files and not self.calibrate:
      raise ConfigError("--calibration_files is the data --calibrate fits calibrators on; "
                        "add --calibrate=platt or --calibrate=isotonic, or drop it.")
    rate = self.negative_sampling
    if rate is not None and not 0 < rate <= 1:
      raise ConfigError(f"--negative_sampling is the fraction of negatives training keeps, "
                        f"in (0, 1]; got {rate}.")
    if self.strategy == "learning_to_rank":
      for name in ("calibrate", "negative_sampling"):
        if getattr(self, name) is not None:
          raise ConfigError(f"--{name} applies to binary tasks' probabilities; "
                            "--strategy=learning_to_rank scores requests' lists with a "
                            f"ranking task. Drop --{name} or choose another --strategy.")


def _refuse_under_keras_3(config: "RunConfig") -> None:
  """What needs Keras 2: tf.distribute through tf-keras and the crash backup."""
  if not _keras.KERAS_3:
    return
  if config.distribution != "none":
    raise ConfigError(
        f"--distribution={config.distribution} needs Keras 2 (tf-keras); this process "
        f"uses Keras 3. Run with {_keras.ENV_VAR}=2 or --distribution=none.")
  if config.backup_every_steps != RunConfig.backup_every_steps:
    raise ConfigError(
        "--backup_every_steps: crash backups (resuming an interrupted run) need Keras 2 "
        f"(tf-keras); under Keras 3 runs are not backed up. Run with {_keras.ENV_VAR}=2, "
        "or leave --backup_every_steps out.")


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"--{name}={value} is not one of {list(choices)}.")
