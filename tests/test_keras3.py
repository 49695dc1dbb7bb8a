"""Keras 3: the builders inside a user's Keras 3 model, and exports that do not
depend on which Keras trained them."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import mtl_zoo
from conftest import REPO
from mtl_zoo import _keras, layers, serving
from mtl_zoo.serving import warmup
from pipelines import reader
from pipelines import schema as schema_lib
from test_export import _serving_records

FUSION = "product:ctr=1,cvr=0.5,price=1"

def export_trained_mmoe(data: str, out: str) -> str:
  """Builds the same MMoE under this process's Keras (with a DCN cross, the
  layer that differs between the two), takes its weights from weights.npz (or
  trains a few steps and writes them there, layer by layer), then exports it
  under one model name (the warm-up requests carry it); returns the version's
  path."""
  schema = schema_lib.Schema.load(data)
  model = mtl_zoo.build_mmoe(schema, cross_layers=1)
  weights_path = os.path.join(out, "weights.npz")
  if not os.path.exists(weights_path):
    _keras.keras.utils.set_random_seed(0)
    mtl_zoo.compile_model(model, schema)
    model.fit(reader.make_dataset(os.path.join(data, "train-*"), schema, 256).take(5),
              verbose=0)
    np.savez(weights_path, **{f"{l.name}/{i}": w for l in model.layers
                              for i, w in enumerate(l.get_weights())})
  saved = np.load(weights_path)
  for layer in model.layers:
    if layer.weights:
      layer.set_weights([saved[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
  examples = list(np.load(os.path.join(out, "examples.npy"), allow_pickle=True))
  return serving.export_saved_model(model, schema,
                                    os.path.join(out, f"keras{_keras.VERSION}", "mmoe"),
                                    version=1, warmup_examples=examples[:4],
                                    fusion=layers.parse_fusion(FUSION))


# The Keras 3 half runs in a process of its own (a process has one Keras).
_EXPORT_UNDER_KERAS_3 = ("import sys; sys.path.insert(0, 'tests'); import test_keras3; "
                         "assert test_keras3._keras.KERAS_3; "
                         "test_keras3.export_trained_mmoe(*sys.argv[1:])")


def _signature_defs(path: str) -> dict:
  """Every signature's method name and its inputs' and outputs' dtypes and
  shapes (not the graph's tensor names, which are internal)."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  defs = {}
  for key, sig in proto.meta_graphs[0].signature_def.items():
    defs[key] = {
        "method": sig.method_name,
        **{f"{side}:{name}": (info.dtype, str(info.tensor_shape))
           for side, tensors in (("in", sig.inputs), ("out", sig.outputs))
           for name, info in tensors.items()}}
  return defs


@pytest.mark.slow
def test_exports_under_keras_2_and_3_have_one_signature_and_agree(ads_dir, ads_schema,
                                                                   tmp_path):
  examples = [ads_schema.serving_example(r) for r in _serving_records(ads_dir, ads_schema, 100)]
  np.save(tmp_path / "examples.npy", np.array(examples, dtype=object))
  # Keras 2 (this process) trains and writes the weights; Keras 3 reads them.
  assert not _keras.KERAS_3
  exports = {"2": export_trained_mmoe(ads_dir, str(tmp_path))}
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  run = subprocess.run([sys.executable, "-c", _EXPORT_UNDER_KERAS_3, ads_dir, str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**env, _keras.ENV_VAR: "3", "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  exports["3"] = str(tmp_path / "keras3" / "mmoe" / "1")
  defs = {v: _signature_defs(p) for v, p in exports.items()}
  assert sorted(defs["2"]) == ["__saved_model_init_op", "classify", "features", "rank",
                               "regress", "serving_default"]
  assert defs["2"] == defs["3"]
  warmups = [open(os.path.join(p, warmup.WARMUP_ASSET), "rb").read() for p in exports.values()]
  assert warmups[0] and warmups[0] == warmups[1]
  served = {v: tf.saved_model.load(p) for v, p in exports.items()}
  batch = tf.constant(examples)
  for name, inputs in (("serving_default", {"examples": batch}), ("rank", {"examples": batch}),
                       ("classify", {"inputs": batch}),
                       ("features", ads_schema.parse_serving_examples(batch))):
    two, three = (served[v].signatures[name](**inputs) for v in ("2", "3"))
    assert sorted(two) == sorted(three)
    for key in two:
      if two[key].dtype.is_floating:
        np.testing.assert_allclose(two[key], three[key], atol=1e-5, err_msg=f"{name}/{key}")
      else:
        np.testing.assert_array_equal(two[key], three[key])


@pytest.mark.keras3
@pytest.mark.skipif(not _keras.KERAS_3, reason="the user's model is Keras 3 code")
def test_mmoe_inside_a_users_keras_3_model_trains_saves_and_exports(ads_dir, ads_schema,
                                                                     tmp_path):
  import keras  # the user's Keras: Keras 3 itself, not reached through mtl_zoo
  assert keras is mtl_zoo.keras
  # The user feeds price through their own branch; MMoE sees the other features.
  price_feature = ads_schema.feature("price")
  mmoe_schema = schema_lib.Schema([f for f in ads_schema.features if f.name != "price"],
                                  ads_schema.labels, ads_schema.tasks, name="ads")
  keras.utils.set_random_seed(0)
  mmoe = mtl_zoo.build_mmoe(mmoe_schema, num_experts=3, expert_units=[8], tower_units=[4])
  inputs = {t.name: t for t in mmoe.inputs}
  price = keras.Input(shape=(), dtype="float32", name="price")
  scaled = keras.layers.Normalization(axis=None, mean=price_feature.mean,
                                      variance=price_feature.std ** 2)(keras.ops.log1p(price))
  price_ctr = keras.layers.Dense(1, activation="sigmoid", name="price_ctr")(
      keras.layers.Reshape((1,))(scaled))
  towers = mmoe(inputs)
  model = keras.Model({**inputs, "price": price}, {
      "ctr": keras.layers.Average(name="ctr")([towers["ctr"], price_ctr]),
      "cvr": keras.layers.Identity(name="cvr")(towers["cvr"])})
  mtl_zoo.compile_model(model, ads_schema, learning_rate=5e-3)
  train = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 128, seed=0)
  before = model.evaluate(train.take(8), verbose=0, return_dict=True)["loss"]
  model.fit(train.take(8), epochs=3, verbose=0)
  assert model.evaluate(train.take(8), verbose=0, return_dict=True)["loss"] < before
  path = str(tmp_path / "user.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.get_layer(mmoe.name), keras.Model)
  # Record 0 lacks price: the user's branch has no rule for a missing value.
  serialized = [ads_schema.serving_example(r)
                for r in _serving_records(ads_dir, ads_schema, 50)[1:]]
  features = ads_schema.parse_serving_examples(tf.constant(serialized))
  expected = model(features)
  export = serving.export_saved_model(loaded, ads_schema, str(tmp_path / "export"))
  served = tf.saved_model.load(export).signatures["serving_default"](
      examples=tf.constant(serialized))
  for task in ("ctr", "cvr"):
    np.testing.assert_allclose(loaded(features)[task], expected[task], atol=1e-6)
    np.testing.assert_allclose(served[task], expected[task][:, 0], atol=1e-5)


@pytest.mark.keras3
@pytest.mark.skipif(not _keras.KERAS_3, reason="what Keras 3 refuses")
@pytest.mark.parametrize("settings, flag", [
    ({"distribution": "mirrored"}, "--distribution=mirrored needs Keras 2"),
    ({"backup_every_steps": 10}, "--backup_every_steps: crash backups"),
])
def test_what_needs_keras_2_is_refused_at_start_naming_the_flag(settings, flag):
  from mtl_zoo.config import ConfigError, RunConfig
  with pytest.raises(ConfigError, match=flag):
    RunConfig(**settings).validate()
  RunConfig().validate()  # the defaults run under Keras 3


@pytest.mark.keras3
def test_a_model_built_under_a_strategy_compiles_outside_it_and_trains(ads_dir, ads_schema):
  """Keras 3 refuses an optimizer made outside the scope of the model's
  variables; compile_model makes it under the strategy the model was built in."""
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    model = mtl_zoo.build_mmoe(ads_schema, num_experts=2, expert_units=[8], tower_units=[4])
  trainable = mtl_zoo.compile_model(model, ads_schema, learning_rate=5e-3)
  assert trainable.distribute_strategy is strategy
  train = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 128, seed=0)
  before = model.evaluate(train.take(4), verbose=0, return_dict=True)["loss"]
  trainable.fit(train.take(4), epochs=3, verbose=0)
  assert model.evaluate(train.take(4), verbose=0, return_dict=True)["loss"] < before
