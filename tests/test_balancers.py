import os
import re

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from mtl_zoo import balancers, config, models, runner, serving
from mtl_zoo.balancers import dwa, pcgrad
from mtl_zoo._keras import keras
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import SOURCES


def test_pcgrad_projects_away_conflicting_components():
  g1, g2 = tf.constant([1.0, 0.0]), tf.constant([-1.0, 1.0])
  order = tf.constant([[1, 0], [0, 1]])
  combined = pcgrad.project_conflicting([g1, g2], order)
  # g1 loses its component along g2 (and ends orthogonal to it), g2 its along g1.
  np.testing.assert_allclose(combined, [0.5 + 0.0, 0.5 + 1.0], atol=1e-6)
  agreeing = pcgrad.project_conflicting([g1, tf.constant([1.0, 1.0])], order)
  np.testing.assert_allclose(agreeing, [2.0, 1.0], atol=1e-6)  # no conflict: plain sum


def test_dwa_weights_favour_the_task_whose_loss_fell_least():
  w = dwa.dwa_weights(tf.constant([0.9, 0.5]), tf.constant([1.0, 1.0]), 2.0)
  expected = 2 * np.exp([0.45, 0.25]) / np.exp([0.45, 0.25]).sum()
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  assert w[0] > w[1] and float(tf.reduce_sum(w)) == pytest.approx(2.0)


def _two_regression_tasks(out_dir, second_label):
  """Tasks 'clean' (signal + small noise) and 'other' = second_label(signal, rng)."""
  rng = np.random.default_rng(0)
  n = 4000
  x = rng.normal(size=(n, 3))
  signal = x @ np.array([1.0, -2.0, 0.5])
  schema = schema_lib.Schema(
      [schema_lib.Feature(f"x{i}", "numeric") for i in range(3)], ["clean", "other"],
      [schema_lib.Task("clean", "clean", "regression"),
       schema_lib.Task("other", "other", "regression")], name="two_tasks")
  columns = {f"x{i}": x[:, i] for i in range(3)}
  columns.update(clean=signal + 0.1 * rng.normal(size=n), other=second_label(signal, rng))
  schema = writer_lib.with_numeric_statistics(schema, columns)
  with writer_lib.DatasetWriter(out_dir, schema) as w:
    w.write_split("train", columns)
  return schema, reader.make_dataset(os.path.join(out_dir, "train-*"), schema, 128, seed=0)


@pytest.fixture(scope="module")
def noisy_tasks(tmp_path_factory):
  """'other' is the same signal with label noise of std 3: it can't be fitted as well."""
  return _two_regression_tasks(str(tmp_path_factory.mktemp("noisy") / "d"),
                               lambda s, rng: s + 3.0 * rng.normal(size=s.shape))


@pytest.fixture(scope="module")
def scaled_tasks(tmp_path_factory):
  """'other' is a copy of the clean task times 10: same pace, 10x the gradients."""
  return _two_regression_tasks(str(tmp_path_factory.mktemp("scaled") / "d"),
                               lambda s, rng: 10.0 * (s + 0.1 * rng.normal(size=s.shape)))


def _train(schema, dataset, method, epochs=4, **options):
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_shared_bottom(schema, bottom_units=[16], tower_units=[])
  trainer = mtl_zoo.compile_model(model, schema, learning_rate=1e-2, weighting=method,
                                  weighting_options=options)
  history = trainer.fit(dataset, epochs=epochs, verbose=0)
  return model, trainer, history


def test_uncertainty_weighting_lowers_the_noisier_task(noisy_tasks):
  schema, ds = noisy_tasks
  _, trainer, history = _train(schema, ds, "uncertainty")
  weights = trainer.balancer.task_weights().numpy()
  assert weights[1] < 0.3 * weights[0]
  assert history.history["weight_other"][-1] == pytest.approx(weights[1])


def test_gradnorm_balances_gradient_norms(scaled_tasks):
  schema, ds = scaled_tasks
  _, trainer, _ = _train(schema, ds, "gradnorm")
  weights = trainer.balancer.task_weights().numpy()
  assert weights.sum() == pytest.approx(2.0, rel=1e-5)
  assert weights[1] < 0.5 * weights[0]  # the 10x-gradient task is turned down


def test_gradnorm_boosts_the_task_that_trains_slower(noisy_tasks):
  schema, ds = noisy_tasks
  _, trainer, _ = _train(schema, ds, "gradnorm")
  weights = trainer.balancer.task_weights().numpy()
  assert weights[1] > weights[0]  # its loss ratio L(t)/L(0) stays high


def test_dwa_sets_weights_from_the_last_two_epochs(noisy_tasks):
  schema, ds = noisy_tasks
  _, trainer, history = _train(schema, ds, "dwa", epochs=3, dwa_temperature=2.0)
  means = np.array([[history.history["clean_loss"][e], history.history["other_loss"][e]]
                    for e in (2, 1)], np.float32)
  np.testing.assert_allclose(trainer.balancer.task_weights(),
                             dwa.dwa_weights(means[0], means[1], 2.0), rtol=1e-4)


@pytest.mark.parametrize("method", ["uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_methods_train_with_masks_and_export_without_training_state(
    method, ads_dir, ads_schema, tmp_path):
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema)
  trainer = mtl_zoo.compile_model(model, ads_schema, learning_rate=5e-3, weighting=method)
  ds = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 256, seed=0)
  before = trainer.evaluate(ds, verbose=0, return_dict=True)
  trainer.fit(ds, epochs=2, verbose=0)
  after = trainer.evaluate(ds, verbose=0, return_dict=True)
  assert after["ctr_loss"] < before["ctr_loss"] and after["cvr_loss"] < before["cvr_loss"]
  # A masked example's label does not reach its task's loss.
  features, labels, weights = next(iter(ds))
  masked = weights["cvr"].numpy() == 0
  flipped = dict(labels, cvr=tf.where(masked[:, None], 1 - labels["cvr"], labels["cvr"]))
  outputs = model(features)
  np.testing.assert_allclose(trainer.task_losses(labels, outputs, weights),
                             trainer.task_losses(flipped, outputs, weights), rtol=1e-6)
  path = serving.export_saved_model(model, ads_schema, str(tmp_path / "e"))
  names = [n for n, _ in tf.train.list_variables(os.path.join(path, "variables", "variables"))]
  # Exactly the model's variables: no log-variances, task weights or loss history.
  assert len([n for n in names if n.endswith("VARIABLE_VALUE")]) == len(model.variables)
  assert not any("log_variances" in n or "task_weights" in n or "history" in n for n in names)
  inputs = tf.saved_model.load(path).signatures["features"].structured_input_signature[1]
  assert sorted(inputs) == sorted(f.name for f in ads_schema.serving_features)


def test_unknown_or_single_task_weighting_is_refused(ads_schema):
  model = mtl_zoo.build_mmoe(ads_schema)
  with pytest.raises(ValueError, match="got 'softmax'"):
    mtl_zoo.compile_model(model, ads_schema, weighting="softmax")
  single = ads_schema.with_tasks(["ctr"])
  with pytest.raises(ValueError, match="at least two tasks"):
    mtl_zoo.compile_model(mtl_zoo.build_mmoe(single), single, weighting="pcgrad")


def _variable_names(model, indices):
  return [model.trainable_variables[i].name.split(":")[0] for i in indices]


def test_balanced_parameters_are_shared_dense_layers_never_embeddings(ads_schema):
  tasks = ads_schema.task_names
  bottom = mtl_zoo.build_shared_bottom(ads_schema, bottom_units=[8, 4], tower_units=[4])
  assert _variable_names(bottom, balancers.balanced_indices(bottom, ads_schema, tasks)) == [
      "shared_bottom/dense_1/kernel", "shared_bottom/dense_1/bias"]
  assert _variable_names(bottom, balancers.balanced_indices(
      bottom, ads_schema, tasks, "all_dense")) == [
          f"shared_bottom/dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias")]
  # MMoE's gates are one fused Dense, but each task's gradient touches only its
  # own gate's slice: not shared. The expert bank is.
  mmoe = mtl_zoo.build_mmoe(ads_schema, num_experts=3, expert_units=[6, 5])
  assert _variable_names(mmoe, balancers.balanced_indices(mmoe, ads_schema, tasks)) == [
      "experts/kernel_1", "experts/bias_1"]
  assert _variable_names(mmoe, balancers.balanced_indices(
      mmoe, ads_schema, tasks, "all_dense")) == [
          "experts/kernel_0", "experts/bias_0", "experts/kernel_1", "experts/bias_1"]


def test_pcgrad_projects_on_the_balanced_layer_and_keeps_embedding_gradients_sparse(
    ads_dir, ads_schema):
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_shared_bottom(ads_schema, bottom_units=[8, 4], tower_units=[4])
  trainer = mtl_zoo.compile_model(model, ads_schema, weighting="pcgrad")
  features, labels, weights = next(iter(reader.make_dataset(
      os.path.join(ads_dir, "eval-*"), ads_schema, 64, shuffle=False)))
  variables = model.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    losses = trainer.task_losses(labels, model(features, training=True), weights)
    total = tf.add_n(losses)
  grads = trainer.balancer.combine_gradients(tape, losses, tf.constant(0.0), total, variables)
  plain = tape.gradient(total, variables)
  per_task = [tape.gradient(loss, variables) for loss in losses]
  balanced = set(trainer.balancer.balanced)
  for i, v in enumerate(variables):
    if "embedding" in v.name:
      assert isinstance(grads[i], tf.IndexedSlices)  # never densified
    if i not in balanced:
      np.testing.assert_allclose(tf.convert_to_tensor(grads[i]), tf.convert_to_tensor(plain[i]),
                                 rtol=1e-5, atol=1e-7)
  # On the balanced layer: the projection of the two flat task gradients.
  flat = [tf.concat([tf.reshape(g[i], [-1]) for i in sorted(balanced)], 0) for g in per_task]
  dot = float(tf.reduce_sum(flat[0] * flat[1]))
  got = tf.concat([tf.reshape(grads[i], [-1]) for i in sorted(balanced)], 0)
  if dot < 0:  # each loses its component along the other
    expected = sum(flat[k] - dot / float(tf.reduce_sum(flat[1 - k] ** 2)) * flat[1 - k]
                   for k in (0, 1))
  else:
    expected = flat[0] + flat[1]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_gradient_balancers_refuse_a_model_that_shares_no_dense_parameter(ads_schema):
  for build in (mtl_zoo.build_single_task, mtl_zoo.build_l2_constrained):
    with pytest.raises(balancers.NothingSharedError, match="no shared dense parameters"):
      mtl_zoo.compile_model(build(ads_schema), ads_schema, weighting="gradnorm")


@pytest.fixture(scope="module")
def tiny_ads(tmp_path_factory):
  """300 train impressions of the synthetic ads log, shared by the matrix below."""
  out = str(tmp_path_factory.mktemp("tiny") / "ads")
  SOURCES["synthetic"].write(out, num_shards=1, seed=2, synthetic_requests=30,
                             synthetic_eval_requests=10, synthetic_users=20,
                             synthetic_items=15)
  return out


# Small enough that a run is mostly tracing: every pair below costs ~1 s.
TINY = {"num_experts": 2, "num_task_experts": 1, "num_shared_experts": 1, "num_levels": 2,
        "expert_units": [4], "bottom_units": [4], "tower_units": [4]}


@pytest.fixture
def eager():
  """Train steps run eagerly: tracing would take most of each tiny run (graph mode
  is trained by the tests above)."""
  tf.config.run_functions_eagerly(True)
  yield
  tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize("weighting", sorted(balancers.BALANCERS))
@pytest.mark.parametrize("architecture", sorted(models.MODELS))
def test_every_architecture_trains_with_every_balancer_or_is_refused_at_start(
    architecture, weighting, tiny_ads, tmp_path, eager):
  cfg = config.RunConfig(train_files=os.path.join(tiny_ads, "train-*"), model=architecture,
                         loss_weighting=weighting, max_epochs=1, batch_size=64,
                         steps_per_epoch=2, export_dir="", output_dir=str(tmp_path),
                         model_dir=str(tmp_path / "run"), backup_every_steps=0,
                         hyperparameters=models.hyperparameters_of(architecture, TINY),
                         quiet=True)
  gradients = balancers.get_balancer(weighting).uses_task_gradients
  if gradients and architecture in ("single_task", "l2_constrained"):
    with pytest.raises(config.ConfigError) as refused:
      runner.run(cfg)
    assert (f"--loss_weighting={weighting} balances per-task gradients on the parameters "
            f"the tasks share, but --model={architecture} shares none") in str(refused.value)
    sharing = re.search(r"Choose an architecture that shares: (.*?);", str(refused.value))
    assert set(sharing.group(1).split(", ")) == set(models.MODELS) - {"single_task",
                                                                       "l2_constrained"}
    assert str(refused.value).endswith("or another --loss_weighting (fixed, uncertainty, dwa).")
    assert not os.path.exists(cfg.model_dir)  # refused before the run wrote anything
    return
  result = runner.run(cfg)
  losses = result.summary["train_loss"]
  assert losses and all(np.isfinite(v) for v in losses.values()), losses
  trained = [t.name for t in balancers.trained_tasks(result.schema)]
  if weighting != "fixed":  # the balancer's trainer logged each trained task
    assert sorted(result.summary["task_weights"]) == sorted(trained)
    assert all(f"{t}_loss" in losses for t in trained)
