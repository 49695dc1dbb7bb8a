"""Shared fixtures: small generated TFRecord datasets, on the CPU."""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mtl_zoo  # noqa: E402,F401  (chooses the Keras before TensorFlow is used)
from mtl_zoo import _keras  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines import writer as writer_lib  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402


# Property tests (hypothesis): "ci", the default, runs 100 examples per property,
# reproducibly (derandomized, no example database), with a deadline per example
# that catches a hang; HYPOTHESIS_PROFILE=thorough runs 1,000 fresh random ones.
settings.register_profile(
    "ci", max_examples=100, deadline=datetime.timedelta(seconds=20), derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", settings.get_profile("ci"), max_examples=1000,
                          derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Runs many invocations of one CLI module in one fresh interpreter, in process
# there: absl flags are global, and parsing them for one case must not leak into
# the next test module (nor pay an interpreter and TensorFlow start-up each).
_CLI_DRIVER = """
import contextlib, importlib, io, json, sys
from absl import app, flags
module = importlib.import_module(sys.argv[1])
results = {}
for name, argv in json.loads(sys.argv[2]).items():
  out, err, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      app.run(module.main, argv=[sys.argv[1], *argv])
    except SystemExit as e:
      code = e.code or 0
    finally:
      flags.FLAGS.unparse_flags()
  results[name] = [code, out.getvalue(), err.getvalue()]
json.dump(results, open(sys.argv[3], "w"))
"""


def run_cli_cases(module: str, cases: dict, results_path) -> dict:
  """Case name -> [exit code, stdout, stderr] of `python -m <module> <argv>` for
  each case's argv, all run in one subprocess."""
  run = subprocess.run([sys.executable, "-c", _CLI_DRIVER, module, json.dumps(cases),
                        str(results_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  return json.load(open(results_path))


def pytest_configure(config):
  # Selected like any test (CI runs them); `-m "not slow"` leaves them out locally.
  config.addinivalue_line("markers", "slow: starts several training processes "
                          "(distributed or killed-and-resumed runs)")
  config.addinivalue_line("markers", "keras3: also run under Keras 3, in CI's second "
                          "pass (MTL_ZOO_KERAS=3 pytest -m keras3)")


# Module-scoped fixtures that train or hold servers: every test using one runs on the worker
# that set it up (`--dist loadgroup`), or each worker would train it again.
SHARED_RUNS = ("cli", "single_worker_run", "ps_cluster")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  grouped = set()
  for item in items:
    for fixture in set(SHARED_RUNS) & set(item.fixturenames):
      item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{fixture}"))
      grouped.add(item)
  # Modules with slow tests and the groups first, each module's tests kept
  # together and in order: under `-n 2` the multi-minute ones then start early
  # instead of leaving one worker alone at the end.
  has_slow = {item.module for item in items if "slow" in item.keywords}
  items.sort(key=lambda item: item.module not in has_slow and item not in grouped)
  # Under Keras 3, a test not marked keras3 uses Keras 2 only (tf-keras internals,
  # crash backups, tf.distribute through tf-keras): skipped, saying why.
  if not _keras.KERAS_3:
    return
  skip = pytest.mark.skip(reason="Keras 2 only (not marked keras3): run it without "
                          f"{_keras.ENV_VAR}=3")
  for item in items:
    if "keras3" not in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def ads_dir(tmp_path_factory):
  """A small synthetic ads log: 3,000 train and 1,000 eval impressions."""
  out = str(tmp_path_factory.mktemp("data") / "ads")
  SOURCES["synthetic"].write(out, num_shards=3, seed=1, synthetic_requests=300,
                             synthetic_eval_requests=100, synthetic_users=200,
                             synthetic_items=100)
  return out


@pytest.fixture(scope="session")
def ads_schema(ads_dir):
  return schema_lib.Schema.load(ads_dir)


def mixed_schema(with_stats: bool = True) -> schema_lib.Schema:
  """Every feature kind, including a hashed id and a masked task."""
  F = schema_lib.Feature
  features = [
      F("user", "categorical", vocab_size=5, embedding_dim=3),
      F("raw_id", "categorical", vocab_size=7, embedding_dim=3, hashed=True),
      F("slot", "categorical", vocab_size=4, embedding_dim=2),
      F("tags", "categorical_list", vocab_size=6, embedding_dim=2, max_len=3),
      F("price", "numeric", transform="log1p",
        mean=1.0 if with_stats else None, std=2.0 if with_stats else None),
      F("age", "numeric", mean=30.0 if with_stats else None, std=10.0 if with_stats else None),
  ]
  tasks = [schema_lib.Task("ctr", "click"),
           schema_lib.Task("cvr", "conversion", mask="click", loss_weight=2.0)]
  return schema_lib.Schema(features, ["click", "conversion"], tasks, name="mixed")


def mixed_columns(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  click = (rng.random(n) < 0.4).astype(np.float32)
  return {
      "user": rng.integers(0, 5, n), "raw_id": rng.integers(-1000, 10**9, n),
      "slot": rng.integers(0, 4, n),
      "tags": [list(rng.integers(0, 6, rng.integers(0, 5))) for _ in range(n)],
      "price": rng.gamma(2.0, 3.0, n), "age": rng.normal(30, 10, n),
      "click": click, "conversion": click * (rng.random(n) < 0.5),
  }


@pytest.fixture
def mixed_dir(tmp_path):
  out = str(tmp_path / "mixed")
  with writer_lib.DatasetWriter(out, mixed_schema()) as w:
    w.write_split("train", mixed_columns(600), num_shards=2)
  return out
