"""The training runner as a library: a RunConfig in, a trained, reported and
exported model out; and the registries extended from outside the package."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mtl_zoo import balancers, runner
from mtl_zoo.config import ConfigError, RunConfig
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import SOURCES, Option, Source


class FavourFirstTask(balancers.LossBalancer):
  """A toy balancer from outside the package: the first task's loss counts
  `favour_first` times, the others once; it records the epochs it saw end."""

  OPTIONS = {"favour_first": (2.0, "Weight of the first task.")}
  ended = []

  def task_weights(self) -> tf.Tensor:
    return tf.constant([self.favour_first] + [1.0] * (self.num_tasks - 1), tf.float32)

  def end_epoch(self) -> None:
    FavourFirstTask.ended.append(len(FavourFirstTask.ended))


def test_a_balancer_registered_from_outside_trains_through_the_runner(
    ads_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(balancers.BALANCERS, "favour_first", FavourFirstTask)
  FavourFirstTask.ended.clear()
  config = RunConfig(train_files=f"{ads_dir}/train-*", eval_files=f"{ads_dir}/eval-*",
                     model="shared_bottom", hyperparameters={"bottom_units": [8]},
                     loss_weighting="favour_first", balancer_options={"favour_first": 3.0},
                     max_epochs=2, batch_size=256, model_dir=str(tmp_path / "run"),
                     export_dir=str(tmp_path / "export"), quiet=True)
  result = runner.run(config)
  assert result.summary["task_weights"] == {"ctr": 3.0, "cvr": 1.0}
  assert FavourFirstTask.ended == [0, 1]  # its epoch hook ran after each epoch
  assert set(result.summary["eval"]) == {"ctr", "cvr"}
  saved = json.load(open(tmp_path / "run" / "metrics.json"))
  assert saved["loss_weighting"] == "favour_first"
  assert saved["balancer_options"] == {"favour_first": 3.0}
  (version,) = os.listdir(tmp_path / "export")
  served = tf.saved_model.load(str(tmp_path / "export" / version))
  assert set(served.signatures) >= {"serving_default", "features"}


class TwoTaskToySource(Source):
  """A toy source from outside the package: `toy_rows` rows of one numeric
  feature x, task "up" (x > 0) and task "far" (|x| > 1)."""

  name = "toy"
  description = "x -> (x > 0, |x| > 1)"
  options = (Option("toy_rows", 400, int, "toy: training rows.", lower_bound=1),)

  def convert(self, out_dir, *, num_shards, compression, overwrite, seed, toy_rows):
    schema = schema_lib.Schema(
        [schema_lib.Feature("x", schema_lib.NUMERIC)], ["up", "far"],
        [schema_lib.Task("up", "up", schema_lib.BINARY),
         schema_lib.Task("far", "far", schema_lib.BINARY)], name="toy")
    rng = np.random.default_rng(seed)

    def columns(n):
      x = rng.normal(size=n)
      return {"x": x, "up": (x > 0).astype(np.float32),
              "far": (np.abs(x) > 1).astype(np.float32)}

    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split="train") as w:
      w.write_split("train", columns(toy_rows), num_shards)
      w.write_split("eval", columns(200))
    return w.schema


def test_a_source_registered_from_outside_is_the_runs_built_in_data(tmp_path, monkeypatch):
  monkeypatch.setitem(SOURCES, "toy", TwoTaskToySource())
  config = RunConfig(source="toy", source_options={"toy_rows": 2000}, model="shared_bottom",
                     hyperparameters={"bottom_units": [8], "tower_units": []}, max_epochs=4,
                     batch_size=100, learning_rate=3e-2, output_dir=str(tmp_path), quiet=True)
  result = runner.run(config)
  assert result.schema.task_names == ["up", "far"]
  (data_dir,) = os.listdir(tmp_path / "data")
  assert data_dir == "toy-toy_rows=2000-seed0"
  assert result.summary["steps_per_epoch"] == 20  # 2,000 rows in batches of 100
  assert result.summary["eval"]["up"]["auc"] > 0.95  # x > 0 is learnt from x
  (version,) = os.listdir(tmp_path / "export" / "shared_bottom")
  assert (tmp_path / "export" / "shared_bottom" / version / "saved_model.pb").exists()
  with pytest.raises(ConfigError, match="source 'toy': option toy_rows must be at least 1"):
    runner.run(RunConfig(source="toy", source_options={"toy_rows": 0},
                         output_dir=str(tmp_path / "again"), quiet=True))


def test_a_config_that_does_not_apply_is_refused_before_any_work(tmp_path):
  cases = {
      "--num_experts does not apply to --model=shared_bottom; it is taken by mmoe, omoe":
          RunConfig(model="shared_bottom", hyperparameters={"num_experts": 4}),
      "--gradnorm_alpha does not apply to --loss_weighting=dwa; it belongs to "
      "--loss_weighting=gradnorm":
          RunConfig(loss_weighting="dwa", balancer_options={"gradnorm_alpha": 1.0}),
      "--list_size belongs to --strategy=learning_to_rank":
          RunConfig(list_size=5),
      "--loss_weighting=unknown is not one of":
          RunConfig(loss_weighting="unknown"),
  }
  for message, config in cases.items():
    config.output_dir = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
      runner.run(config)
  assert not os.path.exists(tmp_path / "out")  # nothing was written


def test_builder_defaults_fill_what_the_config_leaves_out(ads_dir, tmp_path):
  result = runner.run(RunConfig(
      train_files=f"{ads_dir}/train-*", model="mmoe", hyperparameters={"num_experts": 2},
      max_epochs=1, batch_size=512, output_dir=str(tmp_path), export_dir="", quiet=True))
  assert result.summary["hyperparameters"]["num_experts"] == 2
  assert list(result.summary["hyperparameters"]["expert_units"]) == [16]
  assert np.isfinite(list(result.summary["train_loss"].values())).all()


def test_a_seeded_run_is_reproducible_without_a_model_dir(ads_dir, tmp_path):
  """The same seed gives the same weights, bit for bit, also where no backup
  asks for a deterministic read; another seed gives others."""
  def weights_after(seed, name):
    result = runner.run(RunConfig(
        train_files=f"{ads_dir}/train-*", model="mmoe",
        hyperparameters={"num_experts": 2, "expert_units": [8], "tower_units": [4]},
        max_epochs=2, batch_size=128, shuffle_block=256, seed=seed,
        output_dir=str(tmp_path / name), export_dir="", quiet=True))
    return result.model.get_weights()

  first, again, other = weights_after(0, "a"), weights_after(0, "b"), weights_after(1, "c")
  assert all(np.array_equal(x, y) for x, y in zip(first, again))
  assert not all(np.array_equal(x, y) for x, y in zip(first, other))
