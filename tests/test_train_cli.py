import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, mixed_columns, mixed_schema
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib


def _train(*flags, timeout=300):
  return subprocess.run([sys.executable, "-m", "mtl_zoo.train", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.keras3
def test_cli_trains_reports_metrics_and_exports(ads_dir, tmp_path):
  model_dir, export_dir = tmp_path / "run", tmp_path / "export"
  flagfile = tmp_path / "run.flags"
  flagfile.write_text(f"--train_files={ads_dir}/train-*\n--eval_files={ads_dir}/eval-*\n"
                      "--model=shared_bottom\n--bottom_units=16,8\n"
                      "--loss_weighting=uncertainty\n")
  # The tiny log's position is train-only (not in eval): what is left to learn
  # needs a faster rate than the default in 2 epochs of 12 steps.
  result = _train(f"--flagfile={flagfile}", "--epochs=2", "--batch_size=256",
                  "--learning_rate=0.01", f"--model_dir={model_dir}",
                  f"--export_dir={export_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| ctr |" in result.stdout and "| cvr |" in result.stdout
  assert "epoch 2 eval: ctr auc" in result.stdout
  metrics = json.load(open(model_dir / "metrics.json"))
  assert metrics["model"] == "shared_bottom"
  assert metrics["hyperparameters"]["bottom_units"] == [16, 8]
  assert metrics["loss_weighting"] == "uncertainty"
  assert sorted(metrics["task_weights"]) == ["ctr", "cvr"]
  assert 0.5 < metrics["eval"]["ctr"]["auc"] <= 1.0
  assert metrics["eval"]["cvr"]["examples"] < metrics["eval"]["ctr"]["examples"]
  assert metrics["gates"] == {}  # shared_bottom has no gates
  versions = os.listdir(export_dir)
  assert len(versions) == 1 and versions[0].isdigit()
  assert os.path.exists(export_dir / versions[0] / "saved_model.pb")
  assert str(export_dir / versions[0]) in result.stdout
  assert glob.glob(str(model_dir / "checkpoints" / "epoch-002*"))
  assert glob.glob(str(model_dir / "logs" / "train" / "events.out.tfevents.*"))
  assert os.path.exists(model_dir / "model.keras")


def test_helpfull_documents_every_flag():
  text = _train("--helpfull").stdout
  for flag in ("model", "train_files", "eval_files", "schema", "model_dir", "export_dir",
               "epochs", "batch_size", "learning_rate", "num_experts", "expert_units",
               "tower_units", "bottom_units", "dropout", "seed", "flagfile"):
    assert f"--{flag}" in text, flag


def _corrupt_copy(ads_dir, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(ads_dir, bad)
  shard = sorted(glob.glob(str(bad / "train-*")))[0]
  data = bytearray(open(shard, "rb").read())
  data[100] ^= 0xFF
  open(shard, "wb").write(bytes(data))
  return f"--train_files={bad}/train-*"


def _other_schema(ads_dir, tmp_path):
  path = tmp_path / "schema.json"
  mixed = mixed_schema()
  schema_lib.Schema(mixed.features, ["click", "conversion"], mixed.tasks).save(str(path))
  return f"--train_files={ads_dir}/train-*", f"--schema={path}"


def _bad_label(tmp_path):
  columns = mixed_columns(100)
  columns["conversion"][5] = 2.0
  with writer_lib.DatasetWriter(str(tmp_path / "labels"), mixed_schema()) as w:
    w.write_split("train", columns)
  return f"--train_files={tmp_path}/labels/train-*"


@pytest.mark.parametrize("make_flags, message", [
    (lambda d, t: ["--model=mmeo"], "--model"),
    (lambda d, t: [f"--train_files={t}/missing-*"], "no files match"),
    (lambda d, t: [_corrupt_copy(d, t)], "record 0 (byte 0): the record's data fails its "
                                         "checksum"),
    (lambda d, t: list(_other_schema(d, t)), "do not match the schema's training layout"),
    (lambda d, t: [f"--train_files={d}/train-*", f"--schema={t}/none.json"],
     "none.json does not exist"),
    (lambda d, t: [f"--train_files={d}/train-*", "--tasks=ctr,clicks"],
     "task 'clicks' is not in schema"),
    (lambda d, t: [_bad_label(t)],
     "label column conversion of binary task cvr must be 0 or 1"),
    (lambda d, t: ["--tower_units=8,big"], "--tower_units takes comma-separated integers"),
    (lambda d, t: ["--fusion=ctr"], "--fusion: fusion spec 'ctr' should look like"),
    (lambda d, t: ["--grades=conversion=2"], "--grades belongs to --strategy=learning_to_rank"),
    (lambda d, t: ["--strategy=learning_to_rank", "--fusion=sum:relevance=1"],
     "--fusion fuses several task outputs"),
    (lambda d, t: ["--strategy=fusion", "--loss_weighting=pcgrad"],
     "--strategy=fusion trains one task per model"),
    (lambda d, t: ["--strategy=learning_to_rank", "--grades=conversion=two"],
     "--grades entries look like click=0.2"),
])
def test_cli_errors_name_the_problem(make_flags, message, ads_dir, tmp_path):
  result = _train(*make_flags(ads_dir, tmp_path), "--epochs=1", "--batch_size=256",
                  f"--model_dir={tmp_path}/run", "--export_dir=")
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


def test_export_cli_reexports_a_run_with_serving_configs(ads_dir, tmp_path):
  model_dir = tmp_path / "run"
  result = _train(f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
                  "--epochs=1", "--batch_size=256", f"--model_dir={model_dir}",
                  f"--export_dir={tmp_path}/first/mmoe", "--keep=1",
                  "--fusion=sum:ctr=1,cvr=2")
  assert result.returncode == 0, result.stderr[-3000:]
  import tensorflow as tf
  (first,) = os.listdir(tmp_path / "first" / "mmoe")
  assert "rank" in tf.saved_model.load(str(tmp_path / "first" / "mmoe" / first)).signatures
  assert os.path.exists(tmp_path / "first" / "models.config")
  versions = os.listdir(tmp_path / "first" / "mmoe")
  assert os.path.exists(tmp_path / "first" / "mmoe" / versions[0] / "assets.extra" /
                        "tf_serving_warmup_requests")
  export = subprocess.run(
      [sys.executable, "-m", "mtl_zoo.export", f"--model_dir={model_dir}",
       f"--export_base={tmp_path}/serving", "--model_name=ranker",
       f"--warmup_files={ads_dir}/eval-*", "--keep=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert export.returncode == 0, export.stderr[-3000:]
  config = (tmp_path / "serving" / "models.config").read_text()
  assert 'name: "ranker"' in config and 'base_path: "/models/ranker"' in config
  first_config = (tmp_path / "first" / "models.config").read_text()
  assert 'name: "mmoe"' in first_config
  assert "max_batch_size" in (tmp_path / "serving" / "batching_parameters.txt").read_text()
  (version,) = os.listdir(tmp_path / "serving" / "ranker")
  assert os.path.exists(tmp_path / "serving" / "ranker" / version / "saved_model.pb")
  missing = subprocess.run([sys.executable, "-m", "mtl_zoo.export",
                            f"--model_dir={tmp_path}/nothing", f"--export_base={tmp_path}/x"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "does not hold a trained model" in missing.stderr


@pytest.mark.parametrize("weights", ["conversion=1,click=0.2", "auto:conversion,click"])
def test_cli_sample_weighting_trains_one_engagement_task(weights, ads_dir, tmp_path):
  result = _train(f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
                  "--strategy=sample_weighting", f"--event_weights={weights}", "--duplicate",
                  "--model=shared_bottom",
                  "--epochs=1", "--batch_size=256", f"--model_dir={tmp_path}/run",
                  "--export_dir=")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.load(open(tmp_path / "run" / "metrics.json"))
  assert metrics["tasks"] == ["engagement"]
  events = metrics["event_weights"]["engagement"]
  assert events["conversion"] == 1.0 and 0 < events["click"] < 1
  assert "| engagement |" in result.stdout


@pytest.mark.parametrize("strategy, tasks, signatures", [
    ("multi_task", ["ctr", "cvr"], {"serving_default", "classify"}),
    ("fusion", ["ctr", "cvr"], {"serving_default", "rank"}),
    ("sample_weighting", ["engagement"], {"serving_default", "classify"}),
    ("learning_to_rank", ["relevance"], {"serving_default", "regress"}),
])
def test_cli_strategies_train_report_and_export(strategy, tasks, signatures, ads_dir,
                                                tmp_path):
  export_dir = tmp_path / "export"
  result = _train(f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
                  f"--strategy={strategy}", "--epochs=3", "--batch_size=200",
                  # MMoE (multi_task's default) has no bottom: the flag is refused there.
                  *(["--bottom_units=16"] if strategy != "multi_task" else []),
                  "--learning_rate=5e-3",
                  f"--model_dir={tmp_path}/run", f"--export_dir={export_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.load(open(tmp_path / "run" / "metrics.json"))
  assert metrics["strategy"] == strategy and metrics["tasks"] == tasks
  # The log's requests hold 10 impressions, the default --list_size.
  assert metrics["examples_past_list_size"] == (0 if strategy == "learning_to_rank" else None)
  ranking = metrics["ranking"]
  assert set(ranking) == {"ctr_auc", "cvr_auc", "cvr_entire_auc", "gauc", "ndcg@10",
                          "coverage@10", "diversity@10", "novelty@10"}
  # Every strategy's score learns something about clicks or conversions.
  assert max(ranking["ctr_auc"], ranking["cvr_entire_auc"]) > 0.55, ranking
  assert "Ranking score" in result.stdout
  import tensorflow as tf
  (version,) = os.listdir(export_dir)
  loaded = tf.saved_model.load(str(export_dir / version))
  assert signatures <= set(loaded.signatures)
  if strategy == "fusion":
    assert {"ctr", "cvr"} <= set(os.listdir(tmp_path / "run"))
    search = subprocess.run(
        [sys.executable, "-m", "mtl_zoo.fusion_search",
         f"--saved_model={export_dir / version}", f"--eval_files={ads_dir}/eval-*",
         "--fusion=product:ctr,cvr,price", "--grid=0,1", f"--output={tmp_path}/s.csv"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert search.returncode == 0, search.stderr[-3000:]
    assert "Pareto front over ctr_auc, cvr_auc" in search.stdout
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("w_ctr,w_cvr,w_price,ctr_auc") and len(rows) == 1 + 4
