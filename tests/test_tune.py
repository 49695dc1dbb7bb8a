"""The hyper-parameter search (`mtl_zoo.tune`, `mtl_zoo.tuning`) on the tiny ads log.

The subprocess tests run the real CLI: a search killed mid-trial and resumed
(its best flagfile then retrained by the train CLI), and two processes sharing
one SQLite study. Pruning and the space file's errors run in process.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from mtl_zoo import config as config_lib
from mtl_zoo import runner
from mtl_zoo.tuning import results
from mtl_zoo.tuning import space as space_lib
from mtl_zoo.tuning import study as study_lib
from pipelines import schema as schema_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# Tiny trials: one epoch of a 1-2-expert MMoE; the learning rate, the number of
# experts and cvr's loss weight searched.
SPACE = {"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
         "num_experts": {"type": "int", "low": 1, "high": 2}, "batch_size": 1024,
         "loss_weighting": "fixed",
         "task_weights": {"type": "float", "low": 0.5, "high": 2.0}, "expert_units": "4",
         "tower_units": "4", "dropout": None, "embeddings_l2": None}

# The tune CLI, killed (SIGKILL, as a lost machine) after trial 1's first epoch.
KILL_DRIVER = """
import os, signal, sys
from absl import app
from mtl_zoo import tune
from mtl_zoo.tuning import study
run = study.runner.run
def run_and_die(config, on_epoch_end=None):
  def hook(epoch, value):
    on_epoch_end(epoch, value)
    if config.model_dir.endswith("trial-0001"):
      os.kill(os.getpid(), signal.SIGKILL)
  return run(config, on_epoch_end=hook)
study.runner.run = run_and_die
app.run(tune.main, argv=["tune", *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("space") / "space.json")
  with open(path, "w") as f:
    json.dump(SPACE, f)
  return path


def _tune_args(ads_dir, space_file, output_dir, trials):
  return [f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
          "--max_epochs=1", f"--trials={trials}", f"--space={space_file}",
          f"--output_dir={output_dir}", "--pruner=none"]


def _load(output_dir):
  return optuna.load_study(study_name="mtl_zoo",
                           storage=f"sqlite:///{os.path.abspath(output_dir)}/study.db")


@pytest.mark.slow
def test_killed_search_resumes_and_flagfile_reproduces(ads_dir, space_file, tmp_path):
  out = str(tmp_path / "tune")
  args = _tune_args(ads_dir, space_file, out, trials=3)
  killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  trials = _load(out).get_trials()
  assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
  assert list(trials[1].intermediate_values) == [1]  # killed after its first epoch
  first_metrics = os.path.join(out, "trials", "trial-0000", "metrics.json")
  first_written = os.stat(first_metrics).st_mtime_ns

  resumed = subprocess.run([sys.executable, "-m", "mtl_zoo.tune", *args], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Trial 1 was interrupted" in resumed.stdout
  trials = _load(out).get_trials()
  states = [t.state for t in trials]
  # The interrupted trial is FAIL and its parameters ran again as trial 2; trial 0
  # was not repeated; the budget is 3 finished trials.
  assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                    TrialState.COMPLETE], states
  assert trials[1].user_attrs["interrupted"] and trials[2].user_attrs["retry_of"] == 1
  assert trials[2].params == trials[1].params
  assert os.stat(first_metrics).st_mtime_ns == first_written
  summary = json.load(open(os.path.join(out, "trials.json")))
  assert [t["state"] for t in summary["trials"]] == [s.name for s in states]
  assert summary["trials"][1]["failed_because"] == "interrupted"
  assert os.path.exists(os.path.join(out, "history.png"))

  # The best flagfile retrains the best trial to the same validation AUC.
  study = _load(out)
  flagfile = os.path.join(out, "best.flags")
  repro = subprocess.run([sys.executable, "-m", "mtl_zoo.train", f"--flagfile={flagfile}",
                          "--export_dir="], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
  assert repro.returncode == 0, repro.stderr[-3000:]
  model_dir = os.path.join(out, "retrained", f"trial-{study.best_trial.number:04d}")
  evaluated = json.load(open(os.path.join(model_dir, "metrics.json")))["eval"]
  mean_auc = sum(m["auc"] for m in evaluated.values()) / len(evaluated)
  assert mean_auc == pytest.approx(study.best_value, abs=1e-6)


@pytest.mark.slow
def test_two_processes_share_one_budget(ads_dir, space_file, tmp_path):
  out = str(tmp_path / "tune")
  command = [sys.executable, "-m", "mtl_zoo.tune", *_tune_args(ads_dir, space_file, out, 3),
             "--heartbeat_seconds=1", "--grace_seconds=30"]
  processes = [subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  trials = _load(out).get_trials()
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  assert len(complete) == 3
  # Any other trial was started past the budget and withdrawn before training.
  assert all(t.user_attrs.get("withdrawn") for t in trials if t.state != TrialState.COMPLETE)
  # Each complete trial trained once, in its own directory.
  trained = sorted(os.listdir(os.path.join(out, "trials")))
  assert trained == [f"trial-{t.number:04d}" for t in complete]
  assert len({(t.params["learning_rate"], t.params["num_experts"]) for t in complete}) == 3
  # Both worked on it (started together, they also raced to create the database).
  assert len({t.user_attrs["pid"] for t in complete}) == 2


def test_task_weights_replace_the_schema_loss_weights(ads_dir):
  schema = schema_lib.Schema.load(os.path.join(ads_dir, "schema.json"))
  weighted = runner.with_task_weights(schema, "cvr=0.25")
  assert {t.name: t.loss_weight for t in weighted.tasks} == {"ctr": 1.0, "cvr": 0.25}
  with pytest.raises(config_lib.ConfigError, match=r"--task_weights names \['ctx'\]"):
    runner.with_task_weights(schema, "ctx=2")
  with pytest.raises(config_lib.ConfigError, match="--task_weights entries look like"):
    runner.with_task_weights(schema, "cvr")
  with pytest.raises(config_lib.ConfigError, match=r"weights of \['cvr'\] must be finite"):
    runner.with_task_weights(schema, "cvr=-1")


def test_losing_trial_is_pruned(ads_dir, tmp_path):
  out = str(tmp_path / "tune")
  base = config_lib.RunConfig(model="mmoe", train_files=f"{ads_dir}/train-*",
                              eval_files=f"{ads_dir}/eval-*", max_epochs=2, patience=0,
                              monitor="ctr:logloss", batch_size=1024,
                              hyperparameters={"num_experts": 2, "expert_units": [4],
                                               "tower_units": [4]})
  space = space_lib.make_space("mmoe", ["ctr", "cvr"], {
      "learning_rate": {"type": "float", "low": 1e-7, "high": 0.05, "log": True},
      **{name: None for name in ("batch_size", "loss_weighting", "task_weights",
                                 "num_experts", "expert_units", "tower_units", "dropout",
                                 "embeddings_l2")}})
  settings = study_lib.Settings(output_dir=out, trials=2, prune_after_trials=1,
                                prune_warmup_epochs=0)
  ads_schema = schema_lib.Schema.load(os.path.join(ads_dir, "schema.json"))
  base, flags, objectives = study_lib.prepare(base, [], None, ads_schema)
  assert [(o.name, o.direction) for o in objectives] == [("ctr:logloss", "minimize")]
  study, _ = study_lib.open_study(settings, objectives,
                                  study_lib.identity(base, space, objectives))
  # A learning rate that learns, then one that cannot move the log-loss.
  study.enqueue_trial({"learning_rate": 0.02})
  study.enqueue_trial({"learning_rate": 1e-7})
  lines = []
  study = study_lib.run_search(base, flags, space, settings, objectives, say=lines.append)
  first, second = study.get_trials()
  assert first.state == TrialState.COMPLETE and second.state == TrialState.PRUNED
  assert list(second.intermediate_values) == [1]
  assert second.intermediate_values[1] > first.intermediate_values[1]
  # Pruned after epoch 1: epoch 2 never trained.
  monitored = json.load(open(os.path.join(out, "trials", "trial-0001", "monitor.json")))
  assert len(monitored["values"]) == 1
  assert any("pruned after epoch 1" in line for line in lines)
  rows = results.summarise(study, objectives, out)
  assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"]
  assert all(r["finished"] for r in rows)


@pytest.mark.parametrize("entries,message", [
    ({"num_experts": {"type": "int", "low": 8, "high": 2}},
     "entry 'num_experts' has low 8 above high 2"),
    ({"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}},
     "entry 'learning_rate' has log true with low 0"),
    ({"expert_units": {"type": "categorical", "choices": ["64,x"]}},
     "entry 'expert_units' has value '64,x'"),
    ({"num_levels": {"type": "int", "low": 1, "high": 3}},
     "entry 'num_levels' does not apply to --model=mmoe; it is taken by ple"),
    ({"experts": 4}, "entry 'experts' is not a parameter the search can vary"),
    ({"activation": "tanh"}, "entry 'activation' is not a parameter the search can vary"),
    ({"dropout": {"type": "uniform", "low": 0, "high": 1}},
     "entry 'dropout' has type 'uniform'"),
    ({"loss_weighting": {"type": "categorical", "choices": ["fixed", "magic"]}},
     "entry 'loss_weighting' has value 'magic'"),
    ({"learning_rate_decay_steps": {"type": "float", "low": 0, "high": 900}},
     "entry 'learning_rate_decay_steps' has type float; its flag takes integers"),
    ({"learning_rate_decay_steps": {"type": "int", "low": -5, "high": 900}},
     "entry 'learning_rate_decay_steps' has value -5; it must be 0"),
    ({"learning_rate_decay_steps": 500.0},
     "entry 'learning_rate_decay_steps' has value 500.0; it must be an integer"),
])
def test_bad_space_entry_is_named(entries, message):
  with pytest.raises(space_lib.SpaceError, match="^--space=s.json: " + message):
    space_lib.make_space("mmoe", ["ctr", "cvr"], entries, where="--space=s.json")


def test_searchable_architecture_parameters_are_train_flags():
  from mtl_zoo import train  # noqa: defines the train flags
  assert set(space_lib.ARCHITECTURE_PARAMETERS) == set(train.ARCHITECTURE_FLAGS)


def test_shares_parameters(ads_dir):
  schema = schema_lib.Schema.load(os.path.join(ads_dir, "schema.json"))
  assert space_lib.shares_parameters("mmoe", schema)
  assert not space_lib.shares_parameters("single_task", schema)


def test_the_default_objective_follows_the_tasks(ads_dir):
  """Without --objectives or --monitor a search maximises the mean AUC, or
  minimises the mean MSE when every task is a regression (no AUC to read)."""
  ads = schema_lib.Schema.load(os.path.join(ads_dir, "schema.json"))
  regressions = schema_lib.Schema.from_dict({**ads.to_dict(), "tasks": [
      {**t.to_dict(), "type": schema_lib.REGRESSION, "mask": None} for t in ads.tasks]})
  base = config_lib.RunConfig(model="mmoe", train_files="t-*", eval_files="e-*")
  for schema, expected in ((ads, ("auc", "maximize")), (regressions, ("mse", "minimize"))):
    _, _, objectives = study_lib.prepare(base, [], None, schema)
    assert [(o.name, o.direction) for o in objectives] == [expected]
  # A --monitor given is the objective whatever the tasks.
  _, _, objectives = study_lib.prepare(dataclasses.replace(base, monitor="ctr:logloss"), [],
                                       None, regressions)
  assert [(o.name, o.direction) for o in objectives] == [("ctr:logloss", "minimize")]


def test_a_study_refuses_to_resume_with_other_fixed_flags(tmp_path):
  base = config_lib.RunConfig(model="mmoe", train_files="t-*", eval_files="e-*")
  space = space_lib.make_space("mmoe", ["ctr", "cvr"], None, shares_parameters=True)
  settings = study_lib.Settings(output_dir=str(tmp_path), trials=1)
  objectives = study_lib.parse_objectives(None, base.monitor_spec([schema_lib.BINARY] * 2))
  given = ["--output_dir=a", "--max_epochs=2"]
  study_lib.open_study(settings, objectives, study_lib.identity(base, space, objectives, given))
  # The same command from another output directory, or quiet, resumes; another
  # --max_epochs does not.
  study_lib.open_study(settings, objectives, study_lib.identity(
      base, space, objectives, ["--max_epochs=2", "--output_dir=b", "--noquiet"]))
  with pytest.raises(study_lib.TuneError, match=r"base_flags differ.*--max_epochs=3"):
    study_lib.open_study(settings, objectives, study_lib.identity(
        base, space, objectives, ["--output_dir=a", "--max_epochs=3"]))
  # A study stored before the fixed flags were part of its identity resumes.
  old_settings = study_lib.Settings(output_dir=str(tmp_path / "old"), trials=1)
  identity = study_lib.identity(base, space, objectives, given)
  del identity["base_flags"]
  study_lib.open_study(old_settings, objectives, identity)
  study_lib.open_study(old_settings, objectives,
                       study_lib.identity(base, space, objectives, ["--max_epochs=9"]))
  with pytest.raises(study_lib.TuneError, match="model differ"):
    study_lib.open_study(old_settings, objectives, study_lib.identity(
        dataclasses.replace(base, model="ple"), space, objectives, given))


def test_space_file_narrows_and_fixes(tmp_path):
  path = str(tmp_path / "space.json")
  with open(path, "w") as f:
    f.write("[1, 2]")
  with pytest.raises(space_lib.SpaceError, match="must hold a JSON object"):
    space_lib.load_space_file(path)
  assert "learning_rate_decay_steps" not in space_lib.make_space(
      "single_task", ["ctr", "cvr"], None, shares_parameters=False).parameters
  space = space_lib.make_space("single_task", ["ctr", "cvr"],
                               {"bottom_units": "32", "dropout": None,
                                "learning_rate_decay_steps": {"type": "int", "low": 0,
                                                              "high": 2000}},
                               fixed_flags=["learning_rate"], shares_parameters=False)
  assert "learning_rate" not in space.parameters and "dropout" not in space.parameters
  assert space.parameters["bottom_units"].kind == "fixed"
  # Nothing shared: the per-task gradient balancers are left out.
  assert set(space.parameters["loss_weighting"].choices) == {"fixed", "uncertainty", "dwa"}
  trial = optuna.create_study().ask({})
  values = space.suggest(trial)
  base = space_lib.apply(config_lib.RunConfig(model="single_task"), values)
  assert base.hyperparameters["bottom_units"] == [32]
  assert base.learning_rate_decay_steps == values["learning_rate_decay_steps"]
  assert 0 <= base.learning_rate_decay_steps <= 2000
  assert "learning_rate_decay_steps" not in base.hyperparameters
  if values["loss_weighting"] == "fixed":
    assert values["task_weights"].startswith("ctr=1.0,cvr=")
  assert "--bottom_units=32" in space_lib.as_flags(values)
