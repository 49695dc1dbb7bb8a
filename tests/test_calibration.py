"""Calibration (issue 13): metrics, calibrators, their export, negative sampling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from conftest import REPO, run_cli_cases
from mtl_zoo import calibration, config, layers, metrics, models, runner
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import synthetic_ads

# --------------------------------------------------------------------- metrics


def test_pcoc_ece_and_ne_match_hand_computed_values():
  y = np.array([0, 0, 1, 1])
  p = np.array([0.1, 0.2, 0.6, 0.9])
  assert metrics.pcoc(y, p) == pytest.approx(1.8 / 2)
  # Two equal-frequency bins: {0.1, 0.2} (rate 0) and {0.6, 0.9} (rate 1).
  assert metrics.expected_calibration_error(y, p, bins=2) == pytest.approx(
      0.5 * 0.15 + 0.5 * 0.25)
  logloss = -(np.log(0.9) + np.log(0.8) + np.log(0.6) + np.log(0.9)) / 4
  assert metrics.normalized_entropy(y, p) == pytest.approx(logloss / np.log(2))
  # Equal predictions share a bin whatever the bin count.
  binned = metrics.calibration_bins([0, 1, 1, 0, 0], [0.3] * 5)
  assert binned["count"].tolist() == [5]
  assert binned["rate"].tolist() == [pytest.approx(0.4)]
  assert np.isnan(metrics.pcoc([0, 0], [0.1, 0.2]))


def test_the_base_rate_predictor_has_ne_1_and_is_calibrated():
  y = (np.random.default_rng(0).random(1000) < 0.23).astype(float)
  constant = np.full(y.size, y.mean())
  assert metrics.normalized_entropy(y, constant) == pytest.approx(1.0)
  assert metrics.pcoc(y, constant) == pytest.approx(1.0)
  assert metrics.expected_calibration_error(y, constant) == pytest.approx(0.0, abs=1e-12)
  assert metrics.normalized_entropy(y, np.where(y > 0, 0.9, 0.1)) < 1


# ----------------------------------------------------------------- calibrators


def _miscalibrated(n, seed=0, slope=0.5, intercept=-1.0):
  """Predictions sigmoid(z) whose truth is sigmoid(slope * z + intercept)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0, 2, n)
  y = (rng.random(n) < 1 / (1 + np.exp(-(slope * z + intercept)))).astype(float)
  return 1 / (1 + np.exp(-z)), y


def test_platt_recovers_known_slope_and_intercept():
  p, y = _miscalibrated(40_000)
  fitted = calibration.fit_platt(p, y)
  assert fitted["slope"] == pytest.approx(0.5, abs=0.05)
  assert fitted["intercept"] == pytest.approx(-1.0, abs=0.05)
  # A model that ranks backwards is not turned around: slope 0, the base rate.
  backwards = calibration.fit_platt(1 - p, y)
  assert backwards["slope"] == 0
  assert 1 / (1 + np.exp(-backwards["intercept"])) == pytest.approx(y.mean())


def test_isotonic_is_monotone_and_reduces_ece():
  p, y = _miscalibrated(20_000)
  fitted = calibration.fit_isotonic(p, y)
  x, values = np.array(fitted["x"]), np.array(fitted["y"])
  assert np.all(np.diff(x) > 0) and np.all(np.diff(values) >= 0)
  test_p, test_y = _miscalibrated(20_000, seed=1)
  served = np.interp(test_p, x, values)
  before = metrics.expected_calibration_error(test_y, test_p)
  after = metrics.expected_calibration_error(test_y, served)
  assert before > 0.1 and after < before / 4
  assert np.all(np.diff(served[np.argsort(test_p)]) >= 0)


def test_pool_adjacent_violators_on_a_small_sequence():
  block, means = calibration.pool_adjacent_violators([1, 3, 2, 2, 5], [1, 1, 1, 1, 1])
  assert block.tolist() == [0, 1, 1, 1, 2]
  np.testing.assert_allclose(means, [1, 7 / 3, 5])


def test_calibration_layers_serve_what_was_fitted_and_serialize():
  p = tf.constant([[0.0], [0.05], [0.2], [0.5], [0.93], [1.0]])
  isotonic = layers.IsotonicCalibration([0.1, 0.3, 0.9], [0.02, 0.2, 0.6])
  np.testing.assert_allclose(isotonic(p).numpy()[:, 0],
                             np.interp(p.numpy()[:, 0], [0.1, 0.3, 0.9], [0.02, 0.2, 0.6]),
                             atol=1e-6)
  platt = layers.PlattCalibration(0.5, -1.0)
  z = np.log(0.2 / 0.8)
  assert platt(tf.constant([[0.2]])).numpy()[0, 0] == pytest.approx(
      1 / (1 + np.exp(-(0.5 * z - 1))), rel=1e-5)
  correction = layers.NegativeSamplingCorrection(0.1)
  assert correction(tf.constant([[0.5]])).numpy()[0, 0] == pytest.approx(0.5 / (0.5 + 5))
  for layer in (isotonic, platt, correction):
    restored = mtl_zoo.keras.layers.deserialize(mtl_zoo.keras.layers.serialize(layer))
    assert type(restored) is type(layer)
    np.testing.assert_allclose(restored(p), layer(p))
  with pytest.raises(ValueError, match="non-decreasing"):
    layers.IsotonicCalibration([0.1, 0.2], [0.5, 0.4])


# --------------------------------------------------------------- runs, export


@pytest.fixture(scope="module")
def calibration_dir(ads_schema, tmp_path_factory):
  """A calibration split of the ads_dir fixture's world (same users and items),
  drawn with a seed of its own."""
  world = synthetic_ads.AdsWorld(200, 100, 1)
  out = str(tmp_path_factory.mktemp("calibration") / "ads")
  with writer_lib.DatasetWriter(out, ads_schema) as w:
    w.write_split("calibration", world.sample_log(100, 10, 99, first_request_id=10**6)[0])
  return out


RELOAD = """
import json, os, sys
import numpy as np, tensorflow as tf
import mtl_zoo
from pipelines import schema as schema_lib
results = {}
for name, model_dir, export in json.loads(sys.argv[1]):
  serialized = tf.constant(np.load(sys.argv[2], allow_pickle=True).tolist())
  schema = schema_lib.Schema.load(model_dir)
  model = mtl_zoo.keras.models.load_model(os.path.join(model_dir, "model.keras"))
  features = schema.parse_serving_examples(serialized)
  signatures = tf.saved_model.load(export).signatures
  out = {"keras": model(features),
         "serving_default": signatures["serving_default"](examples=serialized),
         "features": signatures["features"](**features),
         "classify": {"ctr": signatures["classify"](inputs=serialized)["scores"][:, 1]},
         "regress": {"ctr": signatures["regress"](inputs=serialized)["outputs"]},
         "rank": signatures["rank"](examples=serialized)}
  results[name] = {kind: {k: np.reshape(v, [-1]).tolist() for k, v in values.items()}
                   for kind, values in out.items()}
  results[name]["layers"] = [type(l).__name__ for l in model.layers]
print(json.dumps(results))
"""


def test_calibrated_runs_export_what_model_keras_computes_in_a_fresh_process(
    ads_dir, ads_schema, calibration_dir, tmp_path):
  runs = {}
  # isotonic after the negative-sampling correction; platt on every ESMM output.
  for method, architecture, hparams, rate in (
      ("isotonic", "mmoe", {"num_experts": 2}, 0.5),
      ("platt", "esmm", {"bottom_units": [8]}, None)):
    result = runner.run(config.RunConfig(
        model=architecture, hyperparameters=hparams, negative_sampling=rate,
        train_files=f"{ads_dir}/train-*",
        eval_files=f"{ads_dir}/eval-*", calibrate=method,
        calibration_files=f"{calibration_dir}/calibration-*", fusion="product:ctr=1,cvr=1",
        max_epochs=1, batch_size=256, model_dir=str(tmp_path / method),
        export_dir=str(tmp_path / "export" / method), quiet=True))
    summary = result.summary
    tasks = result.schema.task_names
    assert sorted(summary["calibration"]["calibrators"]) == sorted(tasks)
    assert summary["calibration"]["negative_sampling"] == (
        {"task": "ctr", "rate": rate} if rate else None)
    fitted = summary["calibration"]["calibrators"]["cvr"]
    assert fitted["method"] == method and fitted["examples"] < 1000  # clicked rows only
    assert summary["eval"] != summary["eval_uncalibrated"]
    for task in tasks:
      assert {"pcoc", "ece", "ne"} <= set(summary["eval"][task])
      if method == "platt" and summary["calibration"]["calibrators"][task]["slope"] > 0:
        assert summary["eval"][task]["auc"] == pytest.approx(  # an increasing map
            summary["eval_uncalibrated"][task]["auc"], abs=1e-3)
    saved = json.load(open(tmp_path / method / "metrics.json"))
    assert saved["calibration"]["calibrators"]["ctr"] == summary["calibration"][
        "calibrators"]["ctr"]
    # The tasks the position's bias tower shaped, as trained at the logged
    # positions, negative sampling corrected (not calibrated): by hand here.
    at_logged = saved["eval_at_logged_positions"]
    assert sorted(at_logged) == (["ctr", "ctr_cvr"] if architecture == "esmm" else ["ctr"])
    trained = models.build(architecture, result.schema, **summary["hyperparameters"])
    mtl_zoo._keras.load_weights(trained, str(tmp_path / method / "checkpoints" / (
        "epoch-001" + mtl_zoo._keras.WEIGHTS_SUFFIX)))
    columns = reader.read_columns(f"{ads_dir}/eval-*", ads_schema)
    outputs = trained({name: tf.constant(columns[name]) for name in trained.input_names})
    for task, values in at_logged.items():  # unmasked tasks: every eval row counts
      p = outputs[task].numpy().ravel()
      if rate and task == "ctr":
        p = p / (p + (1 - p) / rate)
      labels = columns[result.schema.task(task).label]
      assert values["pcoc"] == pytest.approx(p.sum() / labels.sum(), rel=1e-4), task
    assert open(tmp_path / method / "reliability.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    runs[method] = (str(tmp_path / method), summary["export"], tasks)

  records = ads_schema.serving_examples(
      reader.read_columns(f"{ads_dir}/eval-*", ads_schema, limit=64))
  np.save(tmp_path / "examples.npy", np.array(records, dtype=object))
  reload = subprocess.run(
      [sys.executable, "-c", RELOAD, json.dumps([(m, d, e) for m, (d, e, _) in runs.items()]),
       str(tmp_path / "examples.npy")], cwd=REPO, capture_output=True, text=True,
      timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert reload.returncode == 0, reload.stderr[-3000:]
  served = json.loads(reload.stdout.strip().splitlines()[-1])
  for method, (_, _, tasks) in runs.items():
    out = served[method]
    layer_class = {"isotonic": "IsotonicCalibration", "platt": "PlattCalibration"}[method]
    assert out["layers"].count(layer_class) == len(tasks)
    assert out["layers"].count("NegativeSamplingCorrection") == (method == "isotonic")
    keras_out = out["keras"]
    for kind in ("serving_default", "features", "classify", "regress", "rank"):
      for task, values in out[kind].items():
        if task != "score":
          np.testing.assert_allclose(values, keras_out[task], atol=1e-5, err_msg=kind)
    np.testing.assert_allclose(out["rank"]["score"],
                               np.multiply(keras_out["ctr"], keras_out["cvr"]), rtol=0, atol=1e-5)


# ------------------------------------------------------------ negative sampling


def _known_truth_schema():
  F = schema_lib.Feature
  return schema_lib.Schema(
      [F("x", "numeric", mean=0.0, std=1.0), F("slot", "categorical", vocab_size=4,
                                                embedding_dim=2)],
      ["click", "conversion"],
      [schema_lib.Task("ctr", "click"), schema_lib.Task("cvr", "conversion", mask="click")],
      name="known")


def _known_truth_columns(n, seed):
  """click ~ Bernoulli(sigmoid(2x - 2)) (~21% clicks), conversion half the clicks."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=n)
  click = (rng.random(n) < 1 / (1 + np.exp(-(2 * x - 2)))).astype(np.float32)
  return {"x": x, "slot": rng.integers(0, 4, n), "click": click,
          "conversion": click * (rng.random(n) < 0.5)}


@pytest.fixture(scope="module")
def known_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("known") / "data")
  with writer_lib.DatasetWriter(out, _known_truth_schema()) as w:
    w.write_split("train", _known_truth_columns(20_000, 0), num_shards=2)
    w.write_split("eval", _known_truth_columns(5_000, 1))
  return out


def _clicks(ds):
  labels = np.concatenate([labels["ctr"].numpy()[:, 0] for _, labels, _ in ds])
  return int((labels > 0).sum()), int((labels == 0).sum())


def test_negative_sampling_keeps_every_positive_and_a_seeded_tenth_of_negatives(known_dir):
  schema = _known_truth_schema()
  pattern = f"{known_dir}/train-*"
  positives, negatives = _clicks(reader.make_dataset(pattern, schema, 1024, shuffle=False))

  def sampled(seed, shuffle=False):
    return reader.make_dataset(pattern, schema, 1024, shuffle=shuffle, seed=seed,
                               negative_sampling=(("click",), 0.1))

  kept_positives, kept_negatives = _clicks(sampled(0))
  assert kept_positives == positives
  assert kept_negatives == pytest.approx(0.1 * negatives, rel=0.1)
  # The same rows whatever the read order; another seed draws others.
  x = lambda ds: np.sort(np.concatenate([f["x"].numpy() for f, _, _ in ds]))  # noqa: E731
  np.testing.assert_array_equal(x(sampled(0)), x(sampled(0, shuffle=True)))
  assert not np.array_equal(x(sampled(0)), x(sampled(1)))


def test_negative_sampling_correction_restores_pcoc_on_unsampled_eval(known_dir, tmp_path):
  result = runner.run(config.RunConfig(
      model="shared_bottom", hyperparameters={"bottom_units": [8]},
      train_files=f"{known_dir}/train-*", eval_files=f"{known_dir}/eval-*",
      negative_sampling=0.1, max_epochs=3, batch_size=128, learning_rate=1e-2,
      model_dir=str(tmp_path / "run"), export_dir="", quiet=True))
  summary = result.summary
  # Training read the sampled rows, ~4,200 clicks and ~1,600 of ~15,800 negatives,
  # in steps of 128 (157 steps without sampling).
  assert 40 <= summary["steps_per_epoch"] <= 52
  assert summary["calibration"]["negative_sampling"] == {"task": "ctr", "rate": 0.1}
  assert summary["eval_uncalibrated"]["ctr"]["pcoc"] > 2  # trained on ~70% clicks
  assert 0.8 < summary["eval"]["ctr"]["pcoc"] < 1.25
  # cvr is masked by click: every clicked row was kept, nothing to correct.
  assert summary["eval"]["cvr"] == summary["eval_uncalibrated"]["cvr"]
  assert 0.8 < summary["eval"]["cvr"]["pcoc"] < 1.25


# ---------------------------------------------------------------------- errors


def test_settings_that_make_no_sense_are_refused_before_training(ads_dir, calibration_dir,
                                                                 tmp_path):
  data = {"train_files": f"{ads_dir}/train-*", "eval_files": f"{ads_dir}/eval-*",
          "model_dir": str(tmp_path / "run"), "quiet": True}
  cases = [
      ({"calibrate": "isotonic"}, "--calibration_files=<glob"),
      ({"calibrate": "isotonic", "calibration_files": f"{ads_dir}/eval-*"},
       "shares .* with --eval_files"),
      ({"calibration_files": f"{calibration_dir}/calibration-*"}, "add --calibrate"),
      ({"calibrate": "beta"}, r"--calibrate=beta is not one of \['platt', 'isotonic'\]"),
      ({"negative_sampling": 0.0}, r"in \(0, 1\]"),
      ({"negative_sampling": 0.5, "strategy": "learning_to_rank"},
       "--negative_sampling applies to binary tasks"),
      ({"negative_sampling": 0.5, "model": "esmm"}, r"tasks \['ctr_cvr'\] are trained on"),
      ({"negative_sampling": 0.5, "tasks": ["cvr"]}, "masked by click"),
  ]
  for settings, message in cases:
    with pytest.raises(config.ConfigError, match=message):
      runner.run(config.RunConfig(**data, **settings))
  assert not os.path.exists(tmp_path / "run")  # nothing trained or written


def test_cli_names_the_missing_calibration_data(ads_dir, tmp_path):
  results = run_cli_cases("mtl_zoo.train", {"missing": [
      f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
      "--calibrate=platt", "--negative_sampling=0.5", f"--output_dir={tmp_path}"]},
      tmp_path / "results.json")
  code, _, err = results["missing"]
  assert code != 0
  assert "--calibrate=platt fits its calibrators on a calibration split" in err
  assert "pass --calibration_files=" in err
