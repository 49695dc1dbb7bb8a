import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from mtl_zoo import layers, models
from mtl_zoo._keras import keras
from pipelines import reader
from pipelines.schema import Schema


def _layers_of(model, cls):
  return [l for l in model.layers if isinstance(l, cls)]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_builders_have_feature_inputs_and_task_named_outputs(name, ads_schema):
  model = models.build(name, ads_schema)
  assert sorted(model.input_names) == sorted(ads_schema.feature_names)
  assert not set(model.input_names) & set(ads_schema.labels)
  assert sorted(model.output_names) == ["ctr", "cvr"]
  features = {k: tf.zeros([3] + spec.shape[1:].as_list(), spec.dtype)
              for k, spec in ads_schema.feature_signature().items()}
  outputs = model(features)
  assert sorted(outputs) == ["ctr", "cvr"]
  for value in outputs.values():
    assert value.shape == (3, 1)
    assert np.all((value.numpy() > 0) & (value.numpy() < 1))


def test_mmoe_structure(ads_dir, ads_schema):
  model = mtl_zoo.build_mmoe(ads_schema, num_experts=5, expert_units=[6])
  banks = _layers_of(model, layers.ExpertBank)
  gates = _layers_of(model, layers.SoftmaxGate)
  assert len(banks) == 1 and banks[0].num_experts == 5  # experts shared by all tasks
  assert sorted(g.name for g in gates) == ["gate_ctr", "gate_cvr"]  # one gate per task
  gate_outputs = keras.Model(model.inputs, [g.output for g in gates])
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 64, shuffle=False)
  for weights in gate_outputs(next(iter(ds))[0]):
    assert weights.shape == (64, 5)
    np.testing.assert_allclose(weights.numpy().sum(axis=1), 1.0, rtol=1e-5)
  assert all(v.trainable for v in model.variables)


def test_shared_bottom_structure(ads_schema):
  model = mtl_zoo.build_shared_bottom(ads_schema, bottom_units=[12], tower_units=[4])
  bottoms = [l for l in model.layers if l.name == "shared_bottom"]
  towers = [l for l in model.layers if l.name.endswith("_tower")]
  assert len(bottoms) == 1 and bottoms[0].units == [12]
  assert sorted(t.name for t in towers) == ["ctr_tower", "cvr_tower"]
  assert all(len(t._outbound_nodes) == 1 for t in towers)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_short_training_lowers_the_loss(name, ads_dir, ads_schema):
  keras.utils.set_random_seed(0)
  model = models.build(name, ads_schema)
  models.compile_model(model, ads_schema, learning_rate=5e-3)
  train = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 256, seed=0)
  before = model.evaluate(train, verbose=0, return_dict=True)["loss"]
  model.fit(train, epochs=3, verbose=0)
  after = model.evaluate(train, verbose=0, return_dict=True)["loss"]
  assert after < before - 0.02


def test_masked_examples_do_not_touch_the_masked_task(ads_dir, ads_schema):
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema)
  models.compile_model(model, ads_schema)
  ds = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 512, shuffle=False)
  features, labels, weights = next(iter(ds))
  masked = weights["cvr"].numpy() == 0
  assert masked.any() and (~masked).any()
  flipped = dict(labels)
  flipped["cvr"] = tf.where(masked[:, None], 1.0 - labels["cvr"], labels["cvr"])

  def cvr_loss_and_grads(task_labels):
    with tf.GradientTape() as tape:
      out = model(features, training=True)
      loss = model.compiled_loss(task_labels, out, weights)
    return loss.numpy(), tape.gradient(loss, model.trainable_variables)

  loss_a, grads_a = cvr_loss_and_grads(labels)
  loss_b, grads_b = cvr_loss_and_grads(flipped)
  assert loss_a == pytest.approx(loss_b, rel=1e-6)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), atol=1e-7)
  # ... while flipping unmasked labels does change the loss.
  flipped["cvr"] = 1.0 - labels["cvr"]
  assert cvr_loss_and_grads(flipped)[0] != pytest.approx(loss_a, rel=1e-3)


def test_loss_weights_come_from_the_schema(ads_schema):
  schema = Schema(ads_schema.features, ads_schema.labels,
                  [ads_schema.task("ctr"), dataclasses.replace(ads_schema.task("cvr"),
                                                               loss_weight=3.0)])
  model = mtl_zoo.build_mmoe(schema)
  models.compile_model(model, schema)
  assert model.compiled_loss._loss_weights == {"ctr": 1.0, "cvr": 3.0}


def test_keras_model_file_round_trip(tmp_path, ads_dir, ads_schema):
  model = mtl_zoo.build_mmoe(ads_schema)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 100, shuffle=False)
  features = next(iter(ds))[0]
  for task in ("ctr", "cvr"):
    np.testing.assert_allclose(model(features)[task], loaded(features)[task], atol=1e-6)


def test_unknown_model_name_lists_the_choices(ads_schema):
  with pytest.raises(ValueError, match="unknown model 'mmeo'.*'mmoe'"):
    models.build("mmeo", ads_schema)
