import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from mtl_zoo import _keras, layers, models
from mtl_zoo._keras import input_names, keras, output_names
from mtl_zoo.balancers import shared
from pipelines import reader
from pipelines.schema import Schema


def _layers_of(model, cls):
  return [l for l in model.layers if isinstance(l, cls)]


@pytest.mark.keras3
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_builders_have_feature_inputs_and_task_named_outputs(name, ads_schema):
  model = models.build(name, ads_schema)
  # The training model takes the train-only position too; the served one does not.
  assert sorted(input_names(model)) == sorted(ads_schema.feature_names)
  assert sorted(input_names(models.serving_model(model))) == sorted(
      set(ads_schema.feature_names) - {"position"})
  assert not set(input_names(model)) & set(ads_schema.labels)
  tasks = sorted(models.training_schema(name, ads_schema).task_names)
  assert tasks == (["ctr", "ctr_cvr", "cvr"] if name == "esmm" else ["ctr", "cvr"])
  assert sorted(output_names(model)) == tasks
  features = {k: tf.zeros([3] + spec.shape[1:].as_list(), spec.dtype)
              for k, spec in ads_schema.feature_signature().items()}
  outputs = model({**features, "position": tf.zeros([3], tf.int64)})
  assert sorted(outputs) == tasks
  for value in outputs.values():
    assert value.shape == (3, 1)
    assert np.all((value.numpy() > 0) & (value.numpy() < 1))


def test_mmoe_structure(ads_dir, ads_schema):
  model = mtl_zoo.build_mmoe(ads_schema, num_experts=5, expert_units=[6])
  banks = _layers_of(model, layers.ExpertBank)
  (gates,) = _layers_of(model, layers.SoftmaxGates)
  assert len(banks) == 1 and banks[0].num_experts == 5  # experts shared by all tasks
  assert gates.gate_names == ["gate_ctr", "gate_cvr"]  # one gate per task
  # Each task's mixture reads its own gate.
  for task in ("ctr", "cvr"):
    assert model.get_layer(f"mixture_{task}").input[1] is gates.output[f"gate_{task}"]
  gate_outputs = keras.Model(model.inputs, gates.output)
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 64, shuffle=False)
  weights = gate_outputs(next(iter(ds))[0])
  for w in weights.values():
    assert w.shape == (64, 5)
    np.testing.assert_allclose(w.numpy().sum(axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(weights["gate_ctr"], weights["gate_cvr"])  # separate parameters
  assert all(v.trainable for v in model.variables)


def test_shared_bottom_structure(ads_schema):
  model = mtl_zoo.build_shared_bottom(ads_schema, bottom_units=[12], tower_units=[4])
  bottoms = [l for l in model.layers if l.name == "shared_bottom"]
  towers = [l for l in model.layers if l.name.endswith("_tower")]
  assert len(bottoms) == 1 and bottoms[0].units == [12]
  assert sorted(t.name for t in towers) == ["ctr_tower", "cvr_tower"]
  assert all(len(t._outbound_nodes) == 1 for t in towers)


@pytest.mark.keras3
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_short_training_lowers_the_loss(name, ads_dir, ads_schema):
  keras.utils.set_random_seed(0)
  schema = models.training_schema(name, ads_schema)
  model = models.build(name, schema)
  mtl_zoo.compile_model(model, schema, learning_rate=5e-3)
  train = reader.make_dataset(os.path.join(ads_dir, "train-*"), schema, 256, seed=0)
  before = model.evaluate(train, verbose=0, return_dict=True)["loss"]
  model.fit(train, epochs=3, verbose=0)
  after = model.evaluate(train, verbose=0, return_dict=True)["loss"]
  assert after < before - 0.02


def test_masked_examples_do_not_touch_the_masked_task(ads_dir, ads_schema):
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema)
  mtl_zoo.compile_model(model, ads_schema)
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


@pytest.mark.keras3
@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_fit_traces_the_train_step_once(weighting, ads_dir, ads_schema):
  # A tf.function that creates variables on its first call is traced twice;
  # compile_model makes the optimizer's slots and the loss means beforehand.
  model = mtl_zoo.build_mmoe(ads_schema, num_experts=2, expert_units=[4], tower_units=[4])
  trainable = mtl_zoo.compile_model(model, ads_schema, weighting=weighting)
  traces = []
  train_step = trainable.train_step
  trainable.train_step = lambda data: traces.append(data) or train_step(data)
  trainable.fit(reader.make_dataset(f"{ads_dir}/train-*", ads_schema, 256).take(2), verbose=0)
  assert len(traces) == 1


def test_loss_weights_come_from_the_schema(ads_schema):
  schema = Schema(ads_schema.features, ads_schema.labels,
                  [ads_schema.task("ctr"), dataclasses.replace(ads_schema.task("cvr"),
                                                               loss_weight=3.0)])
  model = mtl_zoo.build_mmoe(schema)
  mtl_zoo.compile_model(model, schema)
  assert model.compiled_loss._user_loss_weights == {"ctr": 1.0, "cvr": 3.0}


@pytest.mark.keras3
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


def _gate_inputs(model, gate_name):
  """Names of the expert banks that reach a gate's mixture."""
  mixture = model.get_layer(gate_name.replace("gate_", "mixture_"))
  experts_input = mixture.input[0]
  history = experts_input._keras_history.layer
  banks = history.input if isinstance(history, keras.layers.Concatenate) else [experts_input]
  return sorted(t._keras_history.layer.name for t in banks)


def test_omoe_has_one_gate_for_all_tasks(ads_schema):
  model = mtl_zoo.build_omoe(ads_schema, num_experts=4)
  gates = _layers_of(model, layers.SoftmaxGate)
  assert [g.name for g in gates] == ["gate"]
  assert len(_layers_of(model, layers.ExpertBank)) == 1


def test_cgc_task_gate_sees_only_own_and_shared_experts(ads_schema):
  model = mtl_zoo.build_cgc(ads_schema, num_task_experts=3, num_shared_experts=2)
  assert _gate_inputs(model, "gate_ctr_0") == ["experts_ctr_0", "experts_shared_0"]
  assert _gate_inputs(model, "gate_cvr_0") == ["experts_cvr_0", "experts_shared_0"]
  gates = model.get_layer("gates_0")  # both task gates read the embeddings: one layer
  assert gates.num_experts == 5 and gates.gate_names == ["gate_ctr_0", "gate_cvr_0"]
  assert not [l for l in model.layers if l.name.startswith("gate_shared")]


def test_cgc_each_task_mixes_its_experts_with_its_own_gate(ads_schema):
  """Gates with opposite preferences (ctr: its own expert; cvr: the shared
  one): a task wired to another task's gate mixes the wrong expert."""
  keras.utils.set_random_seed(0)
  model = mtl_zoo.build_cgc(ads_schema, num_task_experts=1, num_shared_experts=1,
                            tower_units=[])
  gates = model.get_layer("gates_0")
  kernel, bias = gates._logits.get_weights()
  preferred = {"gate_ctr_0": 0, "gate_cvr_0": 1}  # candidates: [own, shared]
  bias = np.full_like(bias, -30.0).reshape(len(gates.gate_names), 2)
  for g, name in enumerate(gates.gate_names):
    bias[g, preferred[name]] = 30.0
  gates._logits.set_weights([np.zeros_like(kernel), bias.reshape(-1)])
  names = ["mixture_ctr_0", "mixture_cvr_0", "experts_ctr_0", "experts_cvr_0",
           "experts_shared_0"]
  probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
  out = dict(zip(names, (t.numpy() for t in probe(shared.probe_features(ads_schema, 32)))))
  experts = {"ctr": out["experts_ctr_0"][:, 0], "cvr": out["experts_cvr_0"][:, 0],
             "shared": out["experts_shared_0"][:, 0]}
  assert all(not np.allclose(experts[a], experts[b])  # the experts can be told apart
             for a, b in [("ctr", "cvr"), ("ctr", "shared"), ("cvr", "shared")])
  np.testing.assert_allclose(out["mixture_ctr_0"], experts["ctr"], atol=1e-5)
  np.testing.assert_allclose(out["mixture_cvr_0"], experts["shared"], atol=1e-5)
  # And each task's head reads its own mixture.
  outputs = model(shared.probe_features(ads_schema, 32))
  for task in ("ctr", "cvr"):
    head = model.get_layer(task)
    np.testing.assert_allclose(outputs[task], head(tf.constant(out[f"mixture_{task}_0"])),
                               rtol=1e-5)


def test_ple_stacks_levels_with_shared_gates_below_the_top(ads_schema):
  model = mtl_zoo.build_ple(ads_schema, num_levels=3, num_task_experts=2,
                            num_shared_experts=1)
  shared_gates = sorted(l.name for l in model.layers if l.name.startswith("gate_shared"))
  assert shared_gates == ["gate_shared_0", "gate_shared_1"]
  assert model.get_layer("gate_shared_0").num_experts == 2 * 2 + 1  # all experts
  # Above the first level each task gate reads its own task's input: a layer each.
  assert model.get_layer("gate_ctr_1").num_experts == 2 + 1
  assert model.get_layer("gates_0").gate_names == ["gate_ctr_0", "gate_cvr_0"]
  assert _gate_inputs(model, "mixture_shared_1".replace("mixture_", "gate_")) == [
      "experts_ctr_1", "experts_cvr_1", "experts_shared_1"]
  # Level 1's shared experts read level 0's shared mixture.
  assert (model.get_layer("experts_shared_1").input.name
          == model.get_layer("mixture_shared_0").output.name)


def test_single_task_shares_no_parameters(ads_schema):
  model = mtl_zoo.build_single_task(ads_schema, bottom_units=[8])
  owners = {}
  for layer in model.layers:
    for v in layer.trainable_weights:
      owners.setdefault(v.ref(), set()).add(layer.name.split("_")[0])
  assert all(len(tasks) == 1 for tasks in owners.values())
  assert sorted({t for tasks in owners.values() for t in tasks}) == ["ctr", "cvr"]


def test_esmm_ctcvr_is_ctr_times_cvr_and_trains_in_entire_space(ads_dir, ads_schema):
  schema = models.training_schema("esmm", ads_schema)
  ctr, cvr, ctcvr = (schema.task(n) for n in ("ctr", "cvr", "ctr_cvr"))
  assert (ctr.mask, ctr.loss_weight) == (None, 1.0)
  assert (cvr.mask, cvr.loss_weight) == ("click", 0.0)  # evaluated on clicks, not fitted
  assert (ctcvr.label, ctcvr.mask, ctcvr.loss_weight) == ("conversion", None, 1.0)
  model = mtl_zoo.build_esmm(ads_schema)
  for seed in range(3):
    features = {k: tf.random.stateless_uniform(
        [50] + spec.shape[1:].as_list(), [seed, 1], -5, 500, tf.int64)
        if spec.dtype == tf.int64 else tf.random.stateless_normal([50], [seed, 2]) * 100
        for k, spec in ads_schema.feature_signature().items()}
    out = model(features)
    np.testing.assert_allclose(out["ctr_cvr"], out["ctr"] * out["cvr"], rtol=1e-6)
  assert [l.name for l in model.layers if isinstance(l, layers.FeatureEmbedding)] == [
      "feature_embedding"]  # embeddings shared by the stages


def test_esmm_follows_longer_funnels_and_rejects_unchained_tasks(ads_schema):
  funnel = Schema(ads_schema.features, ["click", "conversion", "repurchase"],
                  [ads_schema.task("ctr"), ads_schema.task("cvr"),
                   dataclasses.replace(ads_schema.task("cvr"), name="rpr",
                                       label="repurchase", mask="conversion")])
  assert models.training_schema("esmm", funnel).task_names == [
      "ctr", "cvr", "rpr", "ctr_cvr", "ctr_cvr_rpr"]
  model = mtl_zoo.build_esmm(funnel)
  features = {k: tf.zeros([4] + spec.shape[1:].as_list(), spec.dtype)
              for k, spec in funnel.feature_signature().items()}
  out = model(features)
  np.testing.assert_allclose(out["ctr_cvr_rpr"], out["ctr"] * out["cvr"] * out["rpr"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="esmm needs tasks chained by masks"):
    mtl_zoo.build_esmm(ads_schema.with_tasks(["ctr"]))


def test_cross_stitch_units_sit_between_task_layers(ads_schema):
  model = mtl_zoo.build_cross_stitch(ads_schema, bottom_units=[8, 4])
  units = [l for l in model.layers if isinstance(l, layers.CrossStitch)]
  assert [u.name for u in units] == ["cross_stitch_0", "cross_stitch_1"]
  for unit in units:
    np.testing.assert_allclose(np.diag(unit.alpha.numpy()), 0.9)
  assert {l.name for l in model.layers if "_layer_" in l.name} == {
      "ctr_layer_0", "cvr_layer_0", "ctr_layer_1", "cvr_layer_1"}


def test_l2_constrained_penalty_pulls_task_networks_together(ads_dir, ads_schema):
  train = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 256, seed=0)
  distances = {}
  for weight in (0.0, 1.0):
    keras.utils.set_random_seed(0)
    # No embedding penalty: the only added loss is the distance penalty.
    model = mtl_zoo.build_l2_constrained(ads_schema, l2_distance_weight=weight,
                                         embeddings_l2=0.0)
    mtl_zoo.compile_model(model, ads_schema, learning_rate=5e-3)
    assert len(model.losses) == (1 if weight else 0)
    model.fit(train, epochs=2, verbose=0)
    distances[weight] = float(model.get_layer("task_networks").parameter_distance())
  assert distances[1.0] < 0.1 * distances[0.0]


@pytest.mark.keras3
@pytest.mark.parametrize("name", ["mmoe", "single_task", "esmm"])
def test_any_architecture_can_use_a_dcn_cross_bottom(name, tmp_path, ads_dir, ads_schema):
  model = models.serving_model(models.build(name, ads_schema, cross_layers=2))
  cross_type = type(_keras.feature_cross("probe"))  # TFRS' Cross or keras-rs' FeatureCross
  crosses = [l for l in model.layers if isinstance(l, cross_type)]
  assert len(crosses) == (4 if name == "single_task" else 2)
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 50, shuffle=False)
  features = next(iter(ds))[0]
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  for task in output_names(model):
    np.testing.assert_allclose(model(features)[task], loaded(features)[task], atol=1e-6)


@pytest.mark.keras3
def test_learning_rate_decays_with_inverse_time_or_stays_constant(ads_schema):
  def rate(decay_steps):
    trainable = mtl_zoo.compile_model(mtl_zoo.build_mmoe(ads_schema), ads_schema,
                                      learning_rate=0.02, learning_rate_decay_steps=decay_steps)
    return trainable.optimizer.get_config()["learning_rate"]

  schedule = keras.optimizers.schedules.deserialize(rate(100))
  assert [float(schedule(step)) for step in (0, 100, 900)] == pytest.approx([0.02, 0.01, 0.002])
  assert rate(0) == pytest.approx(0.02)
  # The CLI's defaults are the run configuration's (BUILD_NOTES "Learning rate").
  from mtl_zoo import config, train
  defaults = config.RunConfig()
  assert (train.FLAGS["learning_rate"].default, train.FLAGS["learning_rate_decay_steps"].default
          ) == (defaults.learning_rate, defaults.learning_rate_decay_steps)
