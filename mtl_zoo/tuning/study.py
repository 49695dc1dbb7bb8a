"""The search: an Optuna study whose trials are training runs.

Each trial is one `runner.run` of the base settings with the trial's values,
with early stopping on the validation monitor (the eval data) and, for a single
objective, pruning after every epoch. The study lives in a database (SQLite
under the output directory unless `storage` names another), so:

- a killed search continues when the same command runs again: the trials it
  left RUNNING are marked FAIL ("interrupted") and their parameters queued to
  run again, at once for dead processes of this host, after the heartbeat's
  grace period for other hosts;
- several processes (machines) can share one study: `trials` is the total of
  finished trials over all of them. Trial numbers are handed out by the
  database one at a time, and a trial starts only if fewer than `trials` trials
  before it are finished, running or queued; otherwise it is withdrawn (FAIL,
  "withdrawn") and its process waits for the others to finish, so two processes
  asking at once never run more than the budget, and none is lost.

A finished trial is COMPLETE, PRUNED, or FAIL with an "error" (its settings were
refused, e.g. a combination the runner does not allow, or its run diverged):
each uses up budget.
"""

import dataclasses
import os
import random
import socket
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import optuna
import sqlalchemy
import tensorflow as tf
from optuna.trial import TrialState

from mtl_zoo import early_stopping
from mtl_zoo import runner
from mtl_zoo._keras import keras
from mtl_zoo.config import OUTPUT_FIELDS, ConfigError, RunConfig
from mtl_zoo.tuning import space as space_lib
from pipelines import files
from pipelines import schema as schema_lib

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
TUNE_ATTRS = "settings"  # study user attribute: what the study was started with
_OPEN_ATTEMPTS = 5  # tries to open a database that another process is creating


class TuneError(ValueError):
  """Search settings that cannot be used; the message names them and the fix."""


class _TrialError(Exception):
  """A trial whose settings the runner refused (recorded, counted as finished)."""


class _Withdrawn(Exception):
  """A trial started past the budget (recorded, not counted)."""


@dataclasses.dataclass(frozen=True)
class Objective:
  """One value a trial is scored by.

  Args:
    name: as given ('ctr:auc', or the monitor spec for a single objective).
    direction: "maximize" or "minimize".
    monitor: computes the value from a run's eval metrics.
  """

  name: str
  direction: str
  monitor: early_stopping.Monitor

  def value(self, eval_metrics: Dict[str, Dict[str, float]]) -> float:
    return self.monitor.shown(self.monitor.value(eval_metrics))


def parse_objectives(spec: Optional[str], monitor_spec: str) -> List[Objective]:
  """--objectives ('ctr:auc,cvr:auc') or, without it, the one objective --monitor.

  Args:
    spec: the --objectives value, or None.
    monitor_spec: the --monitor value (its default when unset).

  Returns:
    The objectives, each with its direction (auc maximised, losses minimised).

  Raises:
    TuneError: naming the entry.
  """
  entries = [e.strip() for e in spec.split(",") if e.strip()] if spec else [monitor_spec]
  objectives = []
  for entry in entries:
    try:
      monitor = early_stopping.Monitor(entry)
    except ValueError as e:
      raise TuneError(f"--objectives entry {e}") from None
    if spec and (len(monitor.terms) != 1 or not monitor.terms[0].task or "=" in entry):
      raise TuneError(f"--objectives entry '{entry}' must be one task's metric, e.g. "
                      "'ctr:auc' or 'cvr:logloss'.")
    minimise = all(early_stopping.DIRECTIONS[t.metric] < 0 for t in monitor.terms)
    objectives.append(Objective(entry, "minimize" if minimise else "maximize", monitor))
  if len({o.name for o in objectives}) < len(objectives):
    raise TuneError(f"--objectives={spec} names an objective twice.")
  return objectives


@dataclasses.dataclass
class Settings:
  """How a search runs (the tune CLI's flags).

  Args:
    output_dir: the study's directory: study.db (by default), trials/, flags/,
      trials.json, plots.
    trials: finished trials to reach, over every process sharing the study.
    objectives: --objectives, or None for the base run's --monitor.
    storage: a database URL (any SQLAlchemy URL); default SQLite in output_dir.
    study_name: the study's name in the database.
    sampler: "tpe" (multi-objective too) or "random".
    pruner: "median" (single objective) or "none".
    prune_after_trials: trials finished before any is pruned.
    prune_warmup_epochs: epochs a trial trains before it can be pruned.
    seed: the sampler's seed (mixed with the host and process, so that
      processes sharing a study, or a resumed one, do not propose alike).
    heartbeat_seconds, grace_seconds: a running trial records a heartbeat
      every heartbeat_seconds; one silent for grace_seconds is interrupted.
    poll_seconds: how often a process whose budget is in others' hands checks.
  """

  output_dir: str
  trials: int
  objectives: Optional[str] = None
  storage: Optional[str] = None
  study_name: str = "mtl_zoo"
  sampler: str = "tpe"
  pruner: str = "median"
  prune_after_trials: int = 5
  prune_warmup_epochs: int = 1
  seed: int = 0
  heartbeat_seconds: int = 20
  grace_seconds: int = 120
  poll_seconds: float = 5.0

  @property
  def storage_url(self) -> str:
    return self.storage or "sqlite:///" + os.path.abspath(
        files.join(self.output_dir, "study.db"))

  def validate(self) -> None:
    if self.trials < 1:
      raise TuneError(f"--trials must be at least 1, got {self.trials}.")
    if self.sampler not in SAMPLERS:
      raise TuneError(f"--sampler={self.sampler} is not one of {list(SAMPLERS)}.")
    if self.pruner not in PRUNERS:
      raise TuneError(f"--pruner={self.pruner} is not one of {list(PRUNERS)}.")
    if self.heartbeat_seconds < 1 or self.grace_seconds <= self.heartbeat_seconds:
      raise TuneError("--grace_seconds must exceed --heartbeat_seconds (>= 1): a trial is "
                      "interrupted only after missing several heartbeats.")


def open_study(settings: Settings, objectives: Sequence[Objective],
               identity: dict) -> Tuple[optuna.Study, optuna.storages.RDBStorage]:
  """The study in the settings' storage, created on first use, and the storage.

  Args:
    settings: the search settings.
    objectives: their directions are the study's.
    identity: what the study searches (`identity`); a study started with
      another is refused rather than mixed. Entries a stored identity lacks
      (a study started before they existed) are not compared.

  Raises:
    TuneError: the storage cannot be opened, or holds another search.
  """
  url = settings.storage_url
  if url.startswith("sqlite:///"):
    tf.io.gfile.makedirs(os.path.dirname(url[len("sqlite:///"):]))
  for attempt in range(_OPEN_ATTEMPTS):
    try:
      study, storage = _open(settings, objectives, url)
      break
    except ValueError as e:  # e.g. another study's directions under this name
      raise TuneError(f"--storage={url}, study {settings.study_name!r}: {e}. Use another "
                      "--study_name or --output_dir.") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
      # Processes starting together race to create the tables: the loser retries.
      if attempt == _OPEN_ATTEMPTS - 1:
        raise TuneError(f"--storage={url} cannot be opened ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}).") from None
      time.sleep(1 + random.random())
  stored = study.user_attrs.get(TUNE_ATTRS)
  if stored is None:
    study.set_user_attr(TUNE_ATTRS, identity)
  # A study stored before an entry existed is not judged on it.
  elif any(stored[k] != identity.get(k) for k in stored):
    changed = sorted(k for k in stored if stored[k] != identity.get(k))
    raise TuneError(f"the study {settings.study_name!r} in {url} was started with other "
                    f"settings ({', '.join(changed)} differ: {[stored.get(k) for k in changed]}"
                    f" then, {[identity.get(k) for k in changed]} now). Resume it with the "
                    "same command, or start another with --study_name or --output_dir.")
  return study, storage


def _open(settings: Settings, objectives: Sequence[Objective], url: str
          ) -> Tuple[optuna.Study, optuna.storages.RDBStorage]:
  with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        url, heartbeat_interval=settings.heartbeat_seconds,
        grace_period=settings.grace_seconds,
        heartbeat_stale_trial_callback=_requeue,
        # SQLite: wait for another process's write instead of failing at once.
        engine_kwargs=({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                       else None))
  study = optuna.create_study(
      storage=storage, study_name=settings.study_name, load_if_exists=True,
      directions=[o.direction for o in objectives],
      sampler=_sampler(settings, len(objectives)), pruner=_pruner(settings, objectives))
  return study, storage


def _sampler(settings: Settings, num_objectives: int) -> optuna.samplers.BaseSampler:
  seed = random.Random(f"{settings.seed}-{socket.gethostname()}-{os.getpid()}").randrange(
      2**31)
  if settings.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  # constant_liar: a parallel process does not propose next to a running trial.
  return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                    n_startup_trials=min(10, max(2, settings.trials // 3)),
                                    multivariate=num_objectives == 1)


def _pruner(settings: Settings, objectives: Sequence[Objective]) -> optuna.pruners.BasePruner:
  if settings.pruner == "none" or len(objectives) > 1:  # Optuna prunes single objectives
    return optuna.pruners.NopPruner()
  return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_after_trials,
                                     n_warmup_steps=settings.prune_warmup_epochs)


def _requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
  """Queues an interrupted trial's parameters to run again, once: only the
  process whose state update failed the trial calls this, and (as SQLite does not
  lock the row it read) not if a retry is already queued."""
  if any(t.user_attrs.get("retry_of") == trial.number
         for t in study.get_trials(deepcopy=False)):
    return
  study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def fail_dead_local_trials(study: optuna.Study, storage: optuna.storages.BaseStorage
                           ) -> List[int]:
  """Marks FAIL ("interrupted") the RUNNING trials of processes of this host
  that no longer exist, and queues their parameters again.

  Args:
    study: the study.
    storage: the storage it was opened on.

  Returns:
    The numbers of the trials marked.
  """
  host, study_id = socket.gethostname(), storage.get_study_id_from_name(study.study_name)
  marked = []
  for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    pid = trial.user_attrs.get("pid")
    if trial.user_attrs.get("host") != host or pid is None or pid == os.getpid() \
        or _alive(pid):
      continue
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    try:
      storage.set_trial_user_attr(trial_id, "interrupted", True)
      won = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
      won = False  # another process marked it first (and requeued it)
    if won:
      _requeue(study, trial)
      marked.append(trial.number)
  return marked


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def counts_as_finished(trial: optuna.trial.FrozenTrial) -> bool:
  """COMPLETE, PRUNED, or FAIL for its settings: the trials the budget counts."""
  return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
      trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def _claims(trial: optuna.trial.FrozenTrial) -> bool:
  """Finished, running or queued: a trial holding a share of the budget."""
  return counts_as_finished(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def data_schema(base: RunConfig) -> schema_lib.Schema:
  """The schema of the base run's data (written first if it is the built-in data).

  Raises:
    runner.DataError, ConfigError: as the run would.
  """
  return runner.resolve_data(base)[2]


def prepare(base: RunConfig, base_flags: Sequence[str], objectives_spec: Optional[str],
            schema: schema_lib.Schema) -> Tuple[RunConfig, List[str], List[Objective]]:
  """The trials' base settings and flags, and the objectives.

  With several objectives and no --monitor, early stopping keeps the epoch best
  for the objectives together (their mean). Without either, the one objective
  is the run's default monitor for the data's tasks (mean AUC, or mean MSE
  when all are regressions). Trials never export.

  Args:
    base: the settings every trial shares.
    base_flags: the train flags given for them.
    objectives_spec: --objectives, or None.
    schema: the data's schema (`data_schema`).

  Returns:
    (base settings, base flags, objectives).

  Raises:
    TuneError, ConfigError: settings that cannot be used.
  """
  if not base.eval_files and base.train_files:
    raise TuneError("the search scores trials on the validation data: give --eval_files "
                    "(never the test data).")
  objectives = parse_objectives(objectives_spec,
                                base.monitor_spec([t.type for t in schema.tasks]))
  base_flags = list(base_flags)
  if objectives_spec and base.monitor is None:
    base = dataclasses.replace(base, monitor=",".join(o.name for o in objectives))
    base_flags.append(f"--monitor={base.monitor}")
  base = dataclasses.replace(base, export_dir="", quiet=True)
  base.validate()
  return base, base_flags, objectives


def identity(base: RunConfig, space: space_lib.Space, objectives: Sequence[Objective],
             base_flags: Sequence[str] = ()) -> dict:
  """What a study searches, stored with it: resuming with other settings is refused.

  Args:
    base: the trials' base settings.
    space: what the trials vary.
    objectives: what they are scored on.
    base_flags: the train flags every trial shares (`prepare`'s); those that
      change results (not `config.OUTPUT_FIELDS`' flags, such as the output
      directory) are part of the identity as given, so that trials trained,
      say, for other --max_epochs are never mixed into one study.

  Returns:
    A JSON-serialisable dict.
  """
  return {"model": base.architecture, "objectives": [o.name for o in objectives],
          "space": space.describe(), "train_files": base.train_files,
          "eval_files": base.eval_files,
          "base_flags": sorted(f for f in base_flags if _flag_name(f) not in OUTPUT_FIELDS)}


def _flag_name(flag: str) -> str:
  """'quiet' of '--quiet', '--noquiet' and '--quiet=true'; 'max_epochs' of '--max_epochs=3'."""
  name = flag.lstrip("-").split("=", 1)[0]
  return name[2:] if name.startswith("no") and name[2:] in OUTPUT_FIELDS else name


def run_search(base: RunConfig, base_flags: Sequence[str], space: space_lib.Space,
               settings: Settings, objectives: Sequence[Objective],
               say: Callable[[str], None] = print,
               after_trial: Optional[Callable[[optuna.Study], None]] = None
               ) -> optuna.Study:
  """Runs trials until the study holds `settings.trials` finished ones.

  Args:
    base, base_flags, objectives: from `prepare` (the base's train/eval data
      are all the search sees).
    space: what the trials vary.
    settings: the search's settings.
    say: where progress lines go.
    after_trial: called with the study after each trial of this process.

  Returns:
    The study.

  Raises:
    TuneError: settings that cannot be used.
    runner.DataError: data that cannot be used (the search stops at once).
  """
  settings.validate()
  study, storage = open_study(settings, objectives,
                              identity(base, space, objectives, base_flags))
  say(f"Study {settings.study_name!r} in {settings.storage_url}: {len(objectives)} "
      f"objective(s) {[f'{o.name} ({o.direction})' for o in objectives]}, "
      f"budget {settings.trials} trials; searching:\n" + "\n".join(space.describe()))
  objective = _objective_fn(study, base, space, settings, objectives, say)
  waiting_said = False
  while True:
    for number in fail_dead_local_trials(study, storage):
      say(f"Trial {number} was interrupted (its process is gone): marked FAIL, its "
          "parameters queued to run again.")
    with warnings.catch_warnings():  # Optuna calls the function experimental
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(study)  # other hosts' silent trials
    trials = study.get_trials(deepcopy=False)
    finished = sum(map(counts_as_finished, trials))
    if finished >= settings.trials:
      break
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if finished + running >= settings.trials and not waiting:
      if not waiting_said:
        say(f"{finished} trials finished, {running} running in other processes: waiting "
            "for them to finish the budget.")
        waiting_said = True
      time.sleep(settings.poll_seconds)
      continue
    waiting_said = False
    study.optimize(objective, n_trials=1, catch=(_TrialError, _Withdrawn),
                   gc_after_trial=True)
    if after_trial:
      after_trial(study)
  return study


def _objective_fn(study: optuna.Study, base: RunConfig,
                  space: space_lib.Space, settings: Settings,
                  objectives: Sequence[Objective], say: Callable[[str], None]):
  """The function Optuna calls per trial: one training run, its objective values."""

  def objective(trial: optuna.Trial):
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
    if sum(map(_claims, before)) >= settings.trials:
      trial.set_user_attr("withdrawn", True)
      raise _Withdrawn(f"trial {trial.number}: the budget is held by earlier trials")
    values = space.suggest(trial)
    model_dir = files.join(settings.output_dir, "trials", f"trial-{trial.number:04d}")
    trial.set_user_attr("flags", space_lib.as_flags(values))
    trial.set_user_attr("model_dir", model_dir)
    say(f"Trial {trial.number}: " + " ".join(space_lib.as_flags(values)))
    config = dataclasses.replace(space_lib.apply(base, values), model_dir=model_dir)

    def report(epoch: int, value: float) -> None:
      if len(objectives) == 1:
        trial.report(value, epoch)
        if trial.should_prune():
          say(f"Trial {trial.number}: pruned after epoch {epoch} ({objectives[0].name} "
              f"{value:.4f})")
          raise optuna.TrialPruned(f"epoch {epoch}: {value}")

    try:
      result = runner.run(config, on_epoch_end=report)
      scores = [o.value(result.summary["eval"]) for o in objectives]
    except (ConfigError, runner.DataError, early_stopping.MonitorError) as e:
      # The data are at fault only if no trial has completed on them (then the
      # search stops); otherwise these settings are (e.g. a diverged run's NaN AUC).
      if isinstance(e, runner.DataError) and not study.get_trials(
          deepcopy=False, states=(TrialState.COMPLETE,)):
        raise
      trial.set_user_attr("error", str(e))
      say(f"Trial {trial.number}: failed: {e}")
      raise _TrialError(str(e)) from None
    except KeyboardInterrupt:  # Optuna records FAIL; the next run retries the parameters
      trial.set_user_attr("interrupted", True)
      study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
      raise
    finally:
      keras.backend.clear_session()  # one process trains many models
    summary = result.summary
    trial.set_user_attr("eval", {t: {m: summary["eval"][t][m] for m in ("auc", "logloss")
                                     if m in summary["eval"][t]} for t in summary["eval"]})
    monitor = summary["monitor"] or {}
    trial.set_user_attr("best_epoch", monitor.get("best_epoch"))
    trial.set_user_attr("epochs_trained", monitor.get("epochs_trained"))
    trial.set_user_attr("train_seconds", summary["train_seconds"])
    say(f"Trial {trial.number}: " + ", ".join(
        f"{o.name} {s:.4f}" for o, s in zip(objectives, scores))
        + f" (best epoch {monitor.get('best_epoch')} of {monitor.get('epochs_trained')}, "
        f"{summary['train_seconds']:.0f}s)")
    return scores[0] if len(scores) == 1 else scores

  return objective
