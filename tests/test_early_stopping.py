"""Early stopping on the validation monitor, the best epoch kept, resume, and a
failed export that loses nothing."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from mtl_zoo import distribute
from mtl_zoo import early_stopping
from mtl_zoo import metrics as metrics_lib
from mtl_zoo import runner
from mtl_zoo import serving
from mtl_zoo._keras import keras
from mtl_zoo.config import ConfigError, RunConfig
from pipelines import files
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines.sources import SOURCES

RESULTS = {"ctr": {"auc": 0.70, "logloss": 0.40}, "cvr": {"auc": 0.60, "logloss": 0.50}}


@pytest.mark.parametrize("spec, expected", [
    ("auc", 0.65),
    ("cvr:auc", 0.60),
    ("ctr:logloss", -0.40),  # lower is better: maximised with its sign flipped
    ("ctr:auc=1,cvr:auc=3", (0.70 + 3 * 0.60) / 4),
    ("ctr:auc=1,ctr:logloss=1", (0.70 - 0.40) / 2),
])
def test_monitor_values(spec, expected):
  assert early_stopping.Monitor(spec).value(RESULTS) == pytest.approx(expected)


@pytest.mark.parametrize("spec, message", [
    ("ctr:precision", "the metric must be one of"),
    ("ctr:auc=x", "must be a number"),
    ("ctr:auc=0", "must be positive"),
    (" , ", "is empty"),
])
def test_malformed_monitor_is_refused_with_the_entry(spec, message):
  with pytest.raises(ValueError, match=message):
    early_stopping.Monitor(spec)


def test_a_run_of_regressions_monitors_their_mse_by_default(tmp_path):
  binary, regression = schema_lib.BINARY, schema_lib.REGRESSION
  assert early_stopping.default_monitor([binary, regression]) == "auc"
  assert early_stopping.default_monitor([schema_lib.RANKING]) == "auc"
  assert early_stopping.default_monitor([regression, regression]) == "mse"
  data = str(tmp_path / "paper")
  SOURCES["mmoe_synthetic"].write(data, seed=0, mmoe_train_examples=1000,
                                  mmoe_test_examples=500, mmoe_dims=8)
  result = runner.run(RunConfig(train_files=f"{data}/train-*", eval_files=f"{data}/test-*",
                                model="shared_bottom", max_epochs=2, batch_size=128,
                                output_dir=str(tmp_path / "out"), export_dir="", quiet=True))
  monitor = result.summary["monitor"]
  assert monitor["spec"] == "mse"
  mses = [-np.mean([m["mse"] for m in epoch["metrics"].values()]) for epoch in result.curve]
  np.testing.assert_allclose(monitor["values"], mses, rtol=1e-6)
  assert monitor["best_epoch"] == 1 + int(np.argmax(monitor["values"]))


def test_monitor_of_a_missing_or_undefined_metric_says_so():
  with pytest.raises(early_stopping.MonitorError, match="cvr auc is nan"):
    early_stopping.Monitor("cvr:auc").value({"cvr": {"auc": float("nan")}})
  with pytest.raises(ValueError, match=r"names \['click'\], which the run does not train"):
    early_stopping.Monitor("click:auc").check_tasks(["ctr", "cvr"])
  # A model that trains one of several tasks watches its own terms, else its AUC.
  assert early_stopping.Monitor("ctr:auc=1,cvr:auc=2").for_tasks(["cvr"]).spec == "cvr:auc=2"
  assert early_stopping.Monitor("cvr:logloss").for_tasks(["ctr"]).spec == "auc"


def test_progress_best_epoch_and_patience():
  progress = early_stopping.Progress([0.60, 0.65, 0.64, 0.65])
  assert progress.best_epoch == 2  # the earliest of equal values
  assert progress.epochs_without_improvement == 2
  assert progress.should_stop(2) and not progress.should_stop(3)
  assert not progress.should_stop(0)  # 0: never stop early


def test_monitor_and_patience_need_eval_data(ads_dir):
  for field in ({"monitor": "auc"}, {"patience": 1}):
    with pytest.raises(ConfigError, match=f"--{next(iter(field))} watches the eval data"):
      RunConfig(train_files=f"{ads_dir}/train-*", **field).validate()
  with pytest.raises(ConfigError, match="--monitor=ctr:f1: 'ctr:f1': the metric"):
    RunConfig(monitor="ctr:f1").validate()
  with pytest.raises(ConfigError, match="--patience must be 0"):
    RunConfig(patience=-1).validate()


def overfitting_config(ads_dir, tmp_path, **overrides) -> RunConfig:
  """A quickly overfitting run: high learning rate, tiny data, watched on
  log-loss, which climbs once the model memorises the training ids."""
  settings = dict(train_files=f"{ads_dir}/train-*", eval_files=f"{ads_dir}/eval-*",
                  model="shared_bottom", hyperparameters={"bottom_units": [64]},
                  batch_size=64, learning_rate=0.05, max_epochs=8, patience=2,
                  monitor="ctr:logloss", model_dir=str(tmp_path / "run"),
                  export_dir=str(tmp_path / "export"), output_dir=str(tmp_path), quiet=True,
                  backup_every_steps=0)
  settings.update(overrides)
  return RunConfig(**settings)


def exported_eval(export_base, schema, eval_pattern) -> dict:
  """Eval metrics of the newest SavedModel version, scored by its serving signature."""
  columns = reader.read_columns(eval_pattern, schema)
  served = serving_outputs(export_base, schema, columns)
  mask = columns["click"] > 0
  return {"ctr": metrics_lib.auc(columns["click"], served["ctr"]),
          "cvr": metrics_lib.auc(columns["conversion"][mask], served["cvr"][mask])}


def serving_outputs(export_base, schema, columns) -> dict:
  version = max(os.listdir(export_base), key=lambda v: int(v) if v.isdigit() else -1)
  signature = tf.saved_model.load(os.path.join(export_base, version)).signatures[
      "serving_default"]
  outputs = signature(examples=tf.constant(schema.serving_examples(columns)))
  return {task: value.numpy().ravel() for task, value in outputs.items()}


def test_training_stops_early_and_keeps_the_best_epoch(ads_dir, tmp_path):
  config = overfitting_config(ads_dir, tmp_path)
  result = runner.run(config)
  monitor = result.summary["monitor"]
  values = monitor["values"]
  best = int(np.argmax(values)) + 1
  assert monitor["best_epoch"] == best
  # It stopped `patience` epochs after the best one, before max_epochs.
  assert monitor["stopped_early"] and len(values) == best + 2 < config.max_epochs
  assert [entry["metrics"] for entry in result.curve][best - 1] == result.summary["eval"]
  # The saved, reported and exported model is the best epoch's, not the last's.
  best_metrics = result.curve[best - 1]["metrics"]
  last_metrics = result.curve[-1]["metrics"]
  assert best_metrics["ctr"]["logloss"] < last_metrics["ctr"]["logloss"]
  served = exported_eval(config.export_dir, result.schema, config.eval_files)
  for task in ("ctr", "cvr"):
    assert served[task] == pytest.approx(best_metrics[task]["auc"], abs=1e-6)
  saved = keras.models.load_model(os.path.join(config.model_dir, "model.keras"))
  for a, b in zip(saved.get_weights(), result.model.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)
  assert files.read_json(os.path.join(config.model_dir, "metrics.json"))["monitor"][
      "best_epoch"] == best


class Killed(Exception):
  """Stands for the process dying."""


def kill_after_epoch(monkeypatch, epoch: int) -> None:
  """Makes training die right after 1-based `epoch`'s backup is written."""
  backup_epoch_end = distribute.Backup.on_epoch_end

  def die(self, index, logs=None):
    backup_epoch_end(self, index, logs)
    if index + 1 == epoch:
      raise Killed()

  monkeypatch.setattr(distribute.Backup, "on_epoch_end", die)


def test_a_resumed_run_keeps_its_monitor_history(ads_dir, tmp_path, monkeypatch):
  """Killed after epoch 2's backup, then resumed: the same monitor values, best
  epoch and weights as the uninterrupted run."""
  reference = runner.run(overfitting_config(ads_dir, tmp_path / "reference", patience=0,
                                            max_epochs=4, export_dir=""))

  config = overfitting_config(ads_dir, tmp_path / "killed", patience=0, max_epochs=4,
                              export_dir="")
  kill_after_epoch(monkeypatch, 2)
  with pytest.raises(Killed):
    runner.run(config)
  monkeypatch.undo()
  assert len(files.read_json(os.path.join(config.model_dir, "monitor.json"))["values"]) == 2
  resumed = runner.run(config)
  assert resumed.summary["resumed_from"] == {"epoch": 3, "step": 0}
  assert resumed.summary["monitor"]["values"] == pytest.approx(
      reference.summary["monitor"]["values"], abs=1e-5)
  assert resumed.summary["monitor"]["best_epoch"] == reference.summary["monitor"]["best_epoch"]
  assert len(resumed.curve) == 4
  for a, b in zip(resumed.model.get_weights(), reference.model.get_weights(), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_failed_export_keeps_the_run_and_the_export_cli_finishes_it(ads_dir, tmp_path,
                                                                     monkeypatch):
  config = overfitting_config(ads_dir, tmp_path, max_epochs=2)

  def broken_export(*args, **kwargs):
    raise OSError("the export filesystem is full")

  monkeypatch.setattr(serving, "export_saved_model", broken_export)
  with pytest.raises(runner.ExportError) as raised:
    runner.run(config)
  message = str(raised.value)
  assert "the export filesystem is full" in message
  assert f"python -m mtl_zoo.export --model_dir={config.model_dir}" in message
  for kept in ("model.keras", "metrics.json", "backup"):
    assert os.path.exists(os.path.join(config.model_dir, kept)), kept
  assert not os.path.exists(config.export_dir) or not os.listdir(config.export_dir)

  done = subprocess.run([sys.executable, "-m", "mtl_zoo.export",
                         f"--model_dir={config.model_dir}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = files.read_json(os.path.join(config.model_dir, "metrics.json"))
  assert summary["export"].startswith(config.export_dir) and os.path.isdir(summary["export"])
  assert not os.path.exists(os.path.join(config.model_dir, "backup"))
  # Warm-up from the run's eval data, as the training run would have written it.
  assert os.path.exists(os.path.join(summary["export"], "assets.extra",
                                     "tf_serving_warmup_requests"))
  served = exported_eval(config.export_dir, schema_lib.Schema.load(
      os.path.join(config.model_dir, "schema.json")), config.eval_files)
  assert served["ctr"] == pytest.approx(summary["eval"]["ctr"]["auc"], abs=1e-6)


def test_every_setting_is_classified_for_resume_identity():
  from mtl_zoo import config as config_lib
  fields = [f.name for f in dataclasses.fields(RunConfig)]
  classified = config_lib.RESULT_FIELDS + config_lib.OUTPUT_FIELDS
  assert sorted(classified) == sorted(fields), (
      "classify each RunConfig field in config.RESULT_FIELDS or OUTPUT_FIELDS: "
      f"{sorted(set(fields) ^ set(classified))}")


@pytest.mark.parametrize("change", [{"backup_every_steps": 5}, {"bad_records": "skip"},
                                    {"cache": "none"}, {"patience": 1}])
def test_resuming_with_a_setting_that_changes_the_result_is_refused(ads_dir, tmp_path,
                                                                    monkeypatch, change):
  config = overfitting_config(ads_dir, tmp_path, patience=0, max_epochs=2, export_dir="")

  kill_after_epoch(monkeypatch, 1)
  with pytest.raises(Killed):
    runner.run(config)
  monkeypatch.undo()
  with pytest.raises(ConfigError, match=f"other settings \\({next(iter(change))}\\)"):
    runner.run(dataclasses.replace(config, **change))


def test_an_unreadable_backup_is_an_error_not_a_fresh_start(tmp_path):
  backup = tmp_path / "backup" / "chief"
  backup.mkdir(parents=True)
  (backup / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
  (backup / "ckpt-1.index").write_bytes(b"not a checkpoint index")
  with pytest.raises(distribute.BackupOwnerError, match="cannot be read as a training backup"):
    distribute.backup_resume_point(str(tmp_path / "backup"), 10, True)
