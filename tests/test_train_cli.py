import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, mixed_columns, mixed_schema, run_cli_cases
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


ERRORS = {  # case: (flags, message the error names)
    "unknown model": (lambda d, t: ["--model=mmeo"], "--model"),
    "no files": (lambda d, t: [f"--train_files={t}/missing-*"], "no files match"),
    "corrupt shard": (lambda d, t: [_corrupt_copy(d, t)],
                      "record 0 (byte 0): the record's data fails its checksum"),
    "other schema": (lambda d, t: list(_other_schema(d, t)),
                     "do not match the schema's training layout"),
    "missing schema": (lambda d, t: [f"--train_files={d}/train-*", f"--schema={t}/none.json"],
                       "none.json does not exist"),
    "unknown task": (lambda d, t: [f"--train_files={d}/train-*", "--tasks=ctr,clicks"],
                     "task 'clicks' is not in schema"),
    "bad label": (lambda d, t: [_bad_label(t)],
                  "label column conversion of binary task cvr must be 0 or 1"),
    "bad units": (lambda d, t: ["--tower_units=8,big"],
                  "--tower_units takes comma-separated integers"),
    "bad fusion": (lambda d, t: ["--fusion=ctr"], "--fusion: fusion spec 'ctr' should look like"),
    "grades without ltr": (lambda d, t: ["--grades=conversion=2"],
                           "--grades belongs to --strategy=learning_to_rank"),
    "fusion of one task": (lambda d, t: ["--strategy=learning_to_rank",
                                         "--fusion=sum:relevance=1"],
                           "--fusion fuses several task outputs"),
    "fusion with a balancer": (lambda d, t: ["--strategy=fusion", "--loss_weighting=pcgrad"],
                               "--strategy=fusion trains one task per model"),
    "bad grades": (lambda d, t: ["--strategy=learning_to_rank", "--grades=conversion=two"],
                   "--grades entries look like click=0.2"),
}

STRATEGIES = {  # strategy: (tasks, signatures it exports at least)
    "multi_task": (["ctr", "cvr"], {"serving_default", "classify"}),
    "fusion": (["ctr", "cvr"], {"serving_default", "rank"}),
    "sample_weighting": (["engagement"], {"serving_default", "classify"}),
    "learning_to_rank": (["relevance"], {"serving_default", "regress"}),
}

SAMPLE_WEIGHTS = ["conversion=1,click=0.2", "auto:conversion,click"]


@pytest.fixture(scope="module")
def cli(ads_dir, tmp_path_factory):
  """case -> (exit code, stdout, stderr, the case's directory) of each run of
  `python -m mtl_zoo.train` below, all in one process (each of its own would
  pay an interpreter and TensorFlow start-up)."""
  base = tmp_path_factory.mktemp("cli")
  data = [f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*"]
  cases, dirs = {"help": ["--helpfull"]}, {}
  for name, (make_flags, _) in ERRORS.items():
    dirs[name] = base / f"error-{len(dirs)}"
    dirs[name].mkdir()
    cases[name] = [*make_flags(ads_dir, dirs[name]), "--epochs=1", "--batch_size=256",
                   f"--model_dir={dirs[name]}/run", "--export_dir="]
  for weights in SAMPLE_WEIGHTS:
    dirs[weights] = base / f"weights-{len(dirs)}"
    cases[weights] = [*data, "--strategy=sample_weighting", f"--event_weights={weights}",
                      "--duplicate", "--model=shared_bottom", "--epochs=1", "--batch_size=256",
                      f"--model_dir={dirs[weights]}/run", "--export_dir="]
  for strategy in STRATEGIES:
    dirs[strategy] = base / strategy
    cases[strategy] = [*data, f"--strategy={strategy}", "--epochs=3", "--batch_size=200",
                       # MMoE (multi_task's default) has no bottom: the flag is refused there.
                       *(["--bottom_units=16"] if strategy != "multi_task" else []),
                       "--learning_rate=5e-3", f"--model_dir={dirs[strategy]}/run",
                       f"--export_dir={dirs[strategy]}/export"]
  dirs["reexport"] = base / "reexport"
  cases["reexport"] = [*data, "--epochs=1", "--batch_size=256",
                       f"--model_dir={dirs['reexport']}/run",
                       f"--export_dir={dirs['reexport']}/first/mmoe", "--keep=1",
                       "--fusion=sum:ctr=1,cvr=2"]
  return {name: (*result, dirs.get(name)) for name, result in
          run_cli_cases("mtl_zoo.train", cases, base / "results.json").items()}


def test_helpfull_documents_every_flag(cli):
  text = cli["help"][1]
  for flag in ("model", "train_files", "eval_files", "schema", "model_dir", "export_dir",
               "epochs", "batch_size", "learning_rate", "num_experts", "expert_units",
               "tower_units", "bottom_units", "dropout", "seed", "flagfile"):
    assert f"--{flag}" in text, flag


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_errors_name_the_problem(case, cli):
  code, _, err, _ = cli[case]
  assert code != 0
  assert ERRORS[case][1] in err, err[-3000:]
  assert "Traceback" not in err


def test_export_cli_reexports_a_run_with_serving_configs(cli, ads_dir):
  code, _, err, base = cli["reexport"]
  assert code == 0, err[-3000:]
  model_dir = base / "run"
  import tensorflow as tf
  (first,) = os.listdir(base / "first" / "mmoe")
  assert "rank" in tf.saved_model.load(str(base / "first" / "mmoe" / first)).signatures
  assert os.path.exists(base / "first" / "models.config")
  assert os.path.exists(base / "first" / "mmoe" / first / "assets.extra" /
                        "tf_serving_warmup_requests")
  export = subprocess.run(
      [sys.executable, "-m", "mtl_zoo.export", f"--model_dir={model_dir}",
       f"--export_base={base}/serving", "--model_name=ranker",
       f"--warmup_files={ads_dir}/eval-*", "--keep=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert export.returncode == 0, export.stderr[-3000:]
  config = (base / "serving" / "models.config").read_text()
  assert 'name: "ranker"' in config and 'base_path: "/models/ranker"' in config
  first_config = (base / "first" / "models.config").read_text()
  assert 'name: "mmoe"' in first_config
  assert "max_batch_size" in (base / "serving" / "batching_parameters.txt").read_text()
  (version,) = os.listdir(base / "serving" / "ranker")
  assert os.path.exists(base / "serving" / "ranker" / version / "saved_model.pb")
  missing = subprocess.run([sys.executable, "-m", "mtl_zoo.export",
                            f"--model_dir={base}/nothing", f"--export_base={base}/x"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "does not hold a trained model" in missing.stderr


@pytest.mark.parametrize("weights", SAMPLE_WEIGHTS)
def test_cli_sample_weighting_trains_one_engagement_task(weights, cli):
  code, out, err, base = cli[weights]
  assert code == 0, err[-3000:]
  metrics = json.load(open(base / "run" / "metrics.json"))
  assert metrics["tasks"] == ["engagement"]
  events = metrics["event_weights"]["engagement"]
  assert events["conversion"] == 1.0 and 0 < events["click"] < 1
  assert "| engagement |" in out


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_cli_strategies_train_report_and_export(strategy, cli, ads_dir, tmp_path):
  code, out, err, base = cli[strategy]
  tasks, signatures = STRATEGIES[strategy]
  assert code == 0, err[-3000:]
  metrics = json.load(open(base / "run" / "metrics.json"))
  assert metrics["strategy"] == strategy and metrics["tasks"] == tasks
  # The log's requests hold 10 impressions, the default --list_size; beyond
  # accuracy rates each request's top 3 (strategies.default_beyond_k).
  assert metrics["examples_past_list_size"] == (0 if strategy == "learning_to_rank" else None)
  ranking = metrics["ranking"]
  assert set(ranking) == {"ctr_auc", "cvr_auc", "cvr_entire_auc", "gauc", "ndcg@10",
                          "coverage@3", "diversity@3", "novelty@3"}
  # Every strategy's score learns something about clicks or conversions.
  assert max(ranking["ctr_auc"], ranking["cvr_entire_auc"]) > 0.55, ranking
  assert "Ranking score" in out
  import tensorflow as tf
  (version,) = os.listdir(base / "export")
  loaded = tf.saved_model.load(str(base / "export" / version))
  assert signatures <= set(loaded.signatures)
  if strategy == "fusion":
    assert {"ctr", "cvr"} <= set(os.listdir(base / "run"))
    search = subprocess.run(
        [sys.executable, "-m", "mtl_zoo.fusion_search",
         f"--saved_model={base / 'export' / version}", f"--eval_files={ads_dir}/eval-*",
         "--fusion=product:ctr,cvr,price", "--grid=0,1", f"--output={tmp_path}/s.csv"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert search.returncode == 0, search.stderr[-3000:]
    assert "Pareto front over ctr_auc, cvr_auc" in search.stdout
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("w_ctr,w_cvr,w_price,ctr_auc") and len(rows) == 1 + 4
