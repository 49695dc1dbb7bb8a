"""The training runner as a library: a RunConfig in, a trained, reported and
exported model out; and the registries extended from outside the package."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mtl_zoo import balancers, runner
from mtl_zoo.config import ConfigError, RunConfig


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
                     epochs=2, batch_size=256, model_dir=str(tmp_path / "run"),
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
      epochs=1, batch_size=512, output_dir=str(tmp_path), export_dir="", quiet=True))
  assert result.summary["hyperparameters"]["num_experts"] == 2
  assert list(result.summary["hyperparameters"]["expert_units"]) == [16]
  assert np.isfinite(list(result.summary["train_loss"].values())).all()
