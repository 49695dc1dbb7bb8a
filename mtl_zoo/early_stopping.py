"""Early stopping on a validation objective, and the best epoch's weights.

Sparse-id models overfit fast: eval AUC often peaks after one or two epochs and
log-loss then climbs past a constant predictor's. So a run with eval data
watches a *monitor* after every epoch (the exact metrics of
`metrics.EpochEvaluation`), stops after `patience` epochs without improvement
and ends with the weights of its best epoch, which are what is saved, reported
and exported.

Monitor specs (`--monitor`):
  auc                       the mean of the tasks' AUCs (the default; a run whose
                            tasks are all regressions, which have no AUC,
                            defaults to mse, their mean squared error)
  cvr:auc, ctr:logloss      one task's metric
  ctr:auc=1,cvr:auc=2       a weighted mean of several

Metrics where lower is better (logloss, mse, ne, ece) enter with their sign
flipped, so a combination is always maximised.

The monitor's values per epoch are kept in `<model_dir>/monitor.json` (written
atomically after every epoch, before the backup), so a run resumed after a crash
continues with the same best epoch and patience. Every epoch's weights are in
`<model_dir>/checkpoints/epoch-NNN` (the run's ModelCheckpoint); the best one
is loaded back when training ends.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import _keras
from mtl_zoo._keras import keras
from pipelines import files
from pipelines import schema as schema_lib

# Metric -> +1 where higher is better, -1 where lower is.
DIRECTIONS = {"auc": 1.0, "logloss": -1.0, "mse": -1.0, "ne": -1.0, "ece": -1.0}
DEFAULT_MONITOR = "auc"
# The default of a run without a task that reports AUC (only regressions).
REGRESSION_MONITOR = "mse"
DEFAULT_PATIENCE = 2
STATE_FILENAME = "monitor.json"


def default_monitor(task_types: Sequence[str]) -> str:
  """The monitor of a run that names none.

  Args:
    task_types: the type of each task the run trains (`pipelines.schema`
      TASK_TYPES).

  Returns:
    DEFAULT_MONITOR (mean AUC) when a task is binary or ranking, otherwise
    REGRESSION_MONITOR (mean MSE, minimised).
  """
  only_regressions = all(t == schema_lib.REGRESSION for t in task_types)
  return REGRESSION_MONITOR if task_types and only_regressions else DEFAULT_MONITOR


class MonitorError(ValueError):
  """The monitored metric cannot be computed on the eval data; the message says why."""


@dataclasses.dataclass(frozen=True)
class Term:
  """One metric of a monitor: `task` None means the mean over every task that has it."""

  task: Optional[str]
  metric: str
  weight: float = 1.0


class Monitor:
  """A validation objective over per-task eval metrics; higher is better.

  Args:
    spec: "auc", "<task>:<metric>" or "<task>:<metric>=<weight>,..." (see the
      module docstring).

  Raises:
    ValueError: a malformed spec; the message names the entry.
  """

  def __init__(self, spec: str = DEFAULT_MONITOR):
    self.spec = spec
    self.terms = _parse(spec)

  def for_tasks(self, tasks: Sequence[str]) -> "Monitor":
    """The monitor restricted to one model's tasks (a strategy may train one model
    per task): its own terms, or the mean AUC of its tasks when none is its own."""
    own = [t for t in self.terms if t.task is None or t.task in tasks]
    if len(own) == len(self.terms):
      return self
    if not own:
      return Monitor(DEFAULT_MONITOR)
    return Monitor(",".join(f"{t.task}:{t.metric}={t.weight:g}" for t in own))

  def check_tasks(self, tasks: Sequence[str]) -> None:
    """Raises ValueError when the spec names a task the run does not train."""
    unknown = sorted({t.task for t in self.terms if t.task and t.task not in tasks})
    if unknown:
      raise ValueError(f"names {unknown}, which the run does not train; its tasks are "
                       f"{list(tasks)}.")

  def value(self, results: Dict[str, Dict[str, float]]) -> float:
    """The monitored value of one epoch's eval metrics (task -> metric -> value).

    Raises:
      MonitorError: a term's metric is missing or not finite.
    """
    total, weights = 0.0, 0.0
    for term in self.terms:
      tasks = [term.task] if term.task else [t for t, m in results.items()
                                            if term.metric in m]
      if not tasks:
        raise MonitorError(f"--monitor={self.spec}: no task reports {term.metric}; the eval "
                         f"metrics are {results}.")
      for task in tasks:
        metric = results.get(task, {}).get(term.metric)
        if metric is None or not math.isfinite(metric):
          raise MonitorError(f"--monitor={self.spec}: {task} {term.metric} is {metric} on "
                           "the eval data (does it hold both classes of the task's "
                           "label?); monitor another metric.")
        share = term.weight / len(tasks)
        total += share * DIRECTIONS[term.metric] * metric
        weights += share
    return total / weights

  def shown(self, value: float) -> float:
    """A monitored value as the metric reads (unflipped when all terms minimise)."""
    return -value if all(DIRECTIONS[t.metric] < 0 for t in self.terms) else value


def _parse(spec: str) -> List[Term]:
  terms = []
  for entry in (e.strip() for e in (spec or "").split(",")):
    if not entry:
      continue
    name, _, weight_text = entry.partition("=")
    task, _, metric = name.rpartition(":")
    metric = metric.strip()
    if metric not in DIRECTIONS:
      raise ValueError(f"'{entry}': the metric must be one of {sorted(DIRECTIONS)}, as "
                       "in 'auc', 'cvr:auc' or 'ctr:auc=1,cvr:auc=2'.")
    try:
      weight = float(weight_text) if weight_text else 1.0
    except ValueError:
      raise ValueError(f"'{entry}': the weight after '=' must be a number.") from None
    if not weight > 0:
      raise ValueError(f"'{entry}': the weight must be positive.")
    terms.append(Term(task.strip() or None, metric, weight))
  if not terms:
    raise ValueError("is empty; give e.g. 'auc' or 'cvr:auc'.")
  return terms


@dataclasses.dataclass
class Progress:
  """The monitored value of every finished epoch, and what follows from it."""

  values: List[float] = dataclasses.field(default_factory=list)

  @property
  def best_epoch(self) -> Optional[int]:
    """1-based epoch of the best value (the earliest on ties); None before any."""
    if not self.values:
      return None
    return max(range(len(self.values)), key=lambda i: (self.values[i], -i)) + 1

  @property
  def epochs_without_improvement(self) -> int:
    return len(self.values) - (self.best_epoch or 0)

  def should_stop(self, patience: int) -> bool:
    """Whether `patience` epochs in a row have not improved (0: never stop)."""
    return patience > 0 and self.epochs_without_improvement >= patience


def load_progress(model_dir: str, monitor: Monitor, completed_epochs: int
                  ) -> Tuple[Progress, List[dict]]:
  """A resumed run's progress and eval curve, cut to the epochs its backup
  completed (a crash after the state was written but before the backup redoes
  that epoch). Empty for another monitor or no state.

  Args:
    model_dir: the run's directory.
    monitor: the resumed run's monitor.
    completed_epochs: epochs the backup holds as finished.

  Returns:
    (progress, curve): the monitored values and the evaluator's curve entries.
  """
  path = files.join(model_dir, STATE_FILENAME)
  if not tf.io.gfile.exists(path):
    return Progress(), []
  state = files.read_json(path)
  if state.get("monitor") != monitor.spec:
    return Progress(), []
  return (Progress(list(state["values"][:completed_epochs])),
          list(state.get("curve", [])[:completed_epochs]))


class EarlyStopping(keras.callbacks.Callback):
  """Watches `monitor` on `evaluator`'s metrics after every epoch; stops after
  `patience` epochs without improvement.

  Place it after the evaluator (it reads the evaluator's latest metrics). On the
  workers of a multi-worker cluster that do not evaluate, pass `evaluator=None`:
  every worker joins one all-reduce per epoch, so all stop at the chief's word.

  Args:
    monitor: what to watch.
    patience: epochs without improvement before stopping; 0 never stops early.
    evaluator: a `metrics.EpochEvaluation` placed before this callback, or None
      on a worker that does not evaluate.
    state_dir: where `monitor.json` is written (the chief's model_dir), or None.
    progress: the values of epochs finished before a resume.
    strategy: the run's distribution strategy (used to agree on stopping).
    report: print a line per epoch.
  """

  def __init__(self, monitor: Monitor, patience: int, evaluator=None,
               state_dir: Optional[str] = None, progress: Optional[Progress] = None,
               strategy: Optional[tf.distribute.Strategy] = None, report: bool = False):
    super().__init__()
    self.monitor, self.patience, self.evaluator = monitor, patience, evaluator
    self.state_dir, self.strategy, self.report = state_dir, strategy, report
    self.progress = progress or Progress()

  def on_epoch_end(self, epoch, logs=None):
    stop = False
    if self.evaluator is not None:
      self.progress.values = self.progress.values[:epoch]  # a redone epoch replaces its value
      self.progress.values.append(self.monitor.value(self.evaluator.latest))
      if self.state_dir:
        files.write_json(files.join(self.state_dir, STATE_FILENAME),
                         {"monitor": self.monitor.spec, "values": self.progress.values,
                          "curve": self.evaluator.curve})
      stop = self.progress.should_stop(self.patience)
      if self.report:
        best = self.progress.best_epoch
        print(f"  epoch {epoch + 1} monitor {self.monitor.spec}: "
              f"{self.monitor.shown(self.progress.values[-1]):.4f}; best epoch {best} "
              f"({self.monitor.shown(self.progress.values[best - 1]):.4f})"
              + (f"; stopping: no improvement in {self.patience} epochs" if stop else ""),
              flush=True)
    if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
      stop = _any_worker(self.strategy, stop)
    if stop:
      self.model.stop_training = True


def _any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """Whether `flag` is set on any worker: one all-reduce that every worker joins."""
  value = tf.constant(1.0 if flag else 0.0)
  per_replica = strategy.run(tf.identity, args=(value,))
  return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0)


def checkpoint_path(model_dir: str, epoch: int) -> str:
  """The weights the run's ModelCheckpoint saved after 1-based `epoch`."""
  return files.join(model_dir, "checkpoints", f"epoch-{epoch:03d}{_keras.WEIGHTS_SUFFIX}")
