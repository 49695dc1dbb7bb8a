import numpy as np
import pytest
import tensorflow as tf

from conftest import mixed_schema
from mtl_zoo import _keras, layers
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib

pytestmark = pytest.mark.keras3  # every layer, under both Keras


def _embedding():
  layer = layers.feature_embedding(mixed_schema())
  features = {"user": tf.constant([0, 4, 5, -1], tf.int64),
              "raw_id": tf.constant([3, 10, -4, 3], tf.int64),
              "slot": tf.constant([1, 1, 1, 1], tf.int64),
              "tags": tf.constant([[0, 1, -1], [-1, -1, -1], [2, 2, 2], [9, -1, -1]], tf.int64),
              "price": tf.constant([0.0, np.e - 1, 1.0, 5.0]),
              "age": tf.constant([30.0, 40.0, 20.0, 30.0])}
  return layer, layer(features).numpy()


def test_feature_embedding_layout_and_oov():
  layer, out = _embedding()
  assert out.shape == (4, layer.output_dim) == (4, 3 + 3 + 2 + 2 + 2)
  table3 = layer._tables[0].numpy()  # user (6 rows incl. OOV) then raw_id (7, hashed)
  user = out[:, 0:3]
  np.testing.assert_allclose(user[0], table3[0])
  np.testing.assert_allclose(user[1], table3[4])
  np.testing.assert_allclose(user[2], table3[5])  # id == vocab_size -> OOV row
  np.testing.assert_allclose(user[3], table3[5])  # negative id -> OOV row
  raw = out[:, 3:6]
  np.testing.assert_allclose(raw[1], table3[6 + 10 % 7])  # hashed into a bucket
  np.testing.assert_allclose(raw[2], table3[6 + (-4) % 7])


def test_a_missing_hashed_id_has_its_own_row_in_both_layouts():
  schema = mixed_schema()
  layer = layers.feature_embedding(schema)
  columns = {"user": [1, 2], "raw_id": [None, 5], "slot": [0, 0], "tags": [[1], [1]],
             "price": [1.0, 1.0], "age": [30.0, 30.0], "click": [0.0, 0.0],
             "conversion": [0.0, 0.0]}
  packed = schema.pack_columns(columns)
  training = schema.split_packed({k: tf.constant(v) for k, v in packed.items()})[0]
  serving = schema.parse_serving_examples(tf.constant(schema.serving_examples(
      {k: v for k, v in columns.items() if k != "raw_id"})))  # raw_id absent
  assert list(training["raw_id"].numpy()) == [schema_lib.MISSING_ID, 5]
  assert list(serving["raw_id"].numpy()) == [schema_lib.MISSING_ID] * 2
  out_training, out_serving = layer(training).numpy(), layer(serving).numpy()
  table = layer._tables[0].numpy()  # user (6 rows), raw_id (7 buckets + missing)
  missing = table[6 + 7]
  np.testing.assert_allclose(out_training[0, 3:6], missing)
  np.testing.assert_allclose(out_serving[:, 3:6], [missing, missing])
  assert table.shape[0] == 6 + 8
  for bucket in range(7):  # no real id, whatever it hashes to, reads the missing row
    assert not np.allclose(missing, table[6 + bucket])
  real = layer({**training, "raw_id": tf.constant([-8, 6], tf.int64)}).numpy()
  np.testing.assert_allclose(real[:, 3:6], [table[6 + (-8) % 7], table[6 + 6]])


def test_list_pooling_ignores_padding_and_numeric_uses_schema_stats():
  layer, out = _embedding()
  tags = layer._list_tables[0].numpy()
  pooled = out[:, 8:10]
  np.testing.assert_allclose(pooled[0], (tags[0] + tags[1]) / 2, rtol=1e-6)
  np.testing.assert_allclose(pooled[1], 0.0)  # empty list
  np.testing.assert_allclose(pooled[2], tags[2], rtol=1e-6)
  np.testing.assert_allclose(pooled[3], tags[6], rtol=1e-6)  # out of range -> OOV
  numeric = out[:, 10:]
  np.testing.assert_allclose(numeric[:, 0], [(0 - 1) / 2, 0.0, (np.log1p(1) - 1) / 2,
                                             (np.log1p(5) - 1) / 2], rtol=1e-5)
  np.testing.assert_allclose(numeric[:, 1], [0.0, 1.0, -1.0, 0.0], atol=1e-6)


def test_expert_bank_equals_separate_mlps():
  bank = layers.ExpertBank(3, [5, 4])
  x = tf.random.stateless_normal([6, 7], seed=[1, 2])
  out = bank(x).numpy()
  assert out.shape == (6, 3, 4)
  for e in range(3):
    k0, b0, k1, b1 = (w.numpy() for w in bank.expert_weights(e))
    h = np.maximum(np.maximum(x.numpy() @ k0 + b0, 0) @ k1 + b1, 0)
    np.testing.assert_allclose(out[:, e], h, rtol=1e-5, atol=1e-6)


def test_gate_sums_to_one_and_mixture_weights_experts():
  gate = layers.SoftmaxGate(4)
  x = tf.random.stateless_normal([5, 3], seed=[0, 1])
  w = gate(x).numpy()
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
  experts = tf.random.stateless_normal([5, 4, 2], seed=[2, 3])
  mixed = layers.ExpertMixture()([experts, w]).numpy()
  np.testing.assert_allclose(mixed, np.einsum("beu,be->bu", experts.numpy(), w), rtol=1e-5)


def test_fused_gates_equal_separate_gates():
  gates = layers.SoftmaxGates(3, ["a", "b"])
  x = tf.random.stateless_normal([5, 4], seed=[4, 5])
  fused = gates(x)
  assert list(fused) == ["a", "b"]
  kernel, bias = gates._logits.kernel.numpy(), gates._logits.bias.numpy()
  for i, name in enumerate(["a", "b"]):
    single = layers.SoftmaxGate(3)
    single(x)
    single._logits.set_weights([kernel[:, 3 * i:3 * i + 3], bias[3 * i:3 * i + 3]])
    np.testing.assert_allclose(fused[name].numpy(), single(x).numpy(), rtol=1e-6)
  with pytest.raises(ValueError, match="distinct gate names"):
    layers.SoftmaxGates(3, ["a", "a"])


@pytest.mark.parametrize("make", [
    lambda: layers.MLP([4, 2], "tanh", 0.1, kernel_l2=1e-4, name="m"),
    lambda: layers.ExpertBank(3, [4], dropout=0.2, name="e"),
    lambda: layers.SoftmaxGate(3, name="g"),
    lambda: layers.SoftmaxGates(3, ["a", "b"], name="gs"),
    lambda: layers.TaskHead("regression", name="t"),
    lambda: layers.ExpertMixture(name="x"),
    lambda: layers.feature_embedding(mixed_schema(), embeddings_l2=1e-5),
])
def test_layers_round_trip_through_config(make):
  layer = make()
  config = layer.get_config()
  clone = type(layer).from_config(config)
  assert clone.get_config() == config
  restored = keras.layers.deserialize(keras.layers.serialize(layer))
  assert type(restored) is type(layer)


def test_cross_stitch_starts_near_identity_and_mixes_linearly():
  unit = layers.CrossStitch(self_weight=0.8)
  inputs = [tf.fill([2, 3], float(v)) for v in (1.0, 2.0, 4.0)]
  outputs = unit(inputs)
  alpha = unit.alpha.numpy()
  np.testing.assert_allclose(np.diag(alpha), 0.8)
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(outputs[0].numpy(), 0.8 * 1 + 0.1 * 2 + 0.1 * 4, rtol=1e-6)
  unit.alpha.assign(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32))
  np.testing.assert_allclose(unit(inputs)[0].numpy(), 2.0)


def test_l2_constrained_penalty_is_the_pairwise_parameter_distance():
  networks = layers.L2ConstrainedNetworks(3, [4, 2], distance_weight=0.5)
  x = tf.random.stateless_normal([5, 6], seed=[3, 4])
  outputs = networks(x)
  assert len(outputs) == 3 and outputs[0].shape == (5, 2)
  expected = 0.0
  per_task = [[w.numpy() for w in networks.expert_weights(t)] for t in range(3)]
  for a in range(3):
    for b in range(a + 1, 3):
      expected += sum(np.sum((wa - wb) ** 2) for wa, wb in zip(per_task[a], per_task[b]))
  assert networks.losses[-1].numpy() == pytest.approx(0.5 * expected, rel=1e-4)
  k0, b0, k1, b1 = per_task[1]
  h = np.maximum(np.maximum(x.numpy() @ k0 + b0, 0) @ k1 + b1, 0)
  np.testing.assert_allclose(outputs[1].numpy(), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: layers.CrossStitch(0.7, name="c"),
    lambda: layers.L2ConstrainedNetworks(2, [3], 0.1, name="l"),
    lambda: layers.ProbabilityProduct(name="p"),
])
def test_sharing_layers_round_trip_through_config(make):
  layer = make()
  config = layer.get_config()
  assert type(layer).from_config(config).get_config() == config


def test_score_fusion_sum_and_product_follow_their_formulas():
  scores = {"ctr": tf.constant([0.1, 0.5]), "cvr": tf.constant([[0.2], [0.04]]),
            "price": tf.constant([10.0, 3.0])}
  summed = layers.ScoreFusion("sum", ["ctr", "cvr"], [1.0, 2.0])(scores)
  np.testing.assert_allclose(summed, [0.1 + 2 * 0.2, 0.5 + 2 * 0.04], rtol=1e-6)
  product = layers.ScoreFusion("product", ["ctr", "cvr", "price"], [1.0, 0.5, 1.0])
  np.testing.assert_allclose(product(scores), [0.1 * 0.2 ** 0.5 * 10, 0.5 * 0.04 ** 0.5 * 3],
                             rtol=1e-5)
  override = tf.constant([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  np.testing.assert_allclose(product(scores, override), [0.1 ** 2 * 10, 0.5 * 0.04], rtol=1e-5)
  # Client weights that are not finite count as missing; scores saturate.
  hostile = tf.constant([[np.nan, np.inf, 1.0], [1.0, 1.0, 1e30]])
  np.testing.assert_allclose(product(scores, hostile)[0], product(scores)[0], rtol=1e-5)
  assert float(product(scores, hostile)[1]) == pytest.approx(np.finfo(np.float32).max, rel=1e-2)
  tiny = product(scores, tf.constant([[1.0, 1.0, -1e30]] * 2)).numpy()
  assert np.all(tiny > 0) and np.all(tiny < 1e-37)
  summed_hostile = layers.ScoreFusion("sum", ["ctr", "price"], [1.0, 1.0])(
      scores, tf.constant([[-np.inf, 1e38], [1e38, -1e38]])).numpy()
  assert np.all(np.isfinite(summed_hostile)) and summed_hostile[0] > 1e37
  assert layers.parse_fusion("product:ctr=1,cvr=0.5,price=1") == {
      "mode": "product", "terms": ["ctr", "cvr", "price"], "weights": [1.0, 0.5, 1.0]}
  with pytest.raises(ValueError, match="should look like"):
    layers.parse_fusion("ctr=1")
  with pytest.raises(ValueError, match="name=weight"):
    layers.parse_fusion("sum:ctr=high")


def test_every_public_layer_keeps_autograph_away_from_its_call():
  classes = [c for c in vars(layers).values()
             if isinstance(c, type) and issubclass(c, keras.layers.Layer)]
  assert len(classes) >= 14
  not_ours = [c.__name__ for c in classes if not issubclass(c, _keras.Layer)]
  assert not not_ours, f"derive these from mtl_zoo._keras.Layer: {not_ours}"
  if not _keras.KERAS_3:
    # tf-keras' own hook: were it renamed, Keras 2 would silently rewrite every
    # layer's call again (~0.9 s a process).
    assert "_should_use_autograph" in vars(keras.layers.Layer)
    class Plain(keras.layers.Layer):
      pass

    assert Plain()._should_use_autograph() and not layers.MLP([4])._should_use_autograph()
