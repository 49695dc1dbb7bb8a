import math

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from conftest import mixed_schema
from mtl_zoo import losses
from mtl_zoo.balancers import shared
from pipelines import targets
from pipelines import schema as schema_lib


def _softplus(x):
  return math.log1p(math.exp(x))


def test_relevance_is_the_grade_of_the_highest_graded_event():
  task = schema_lib.Task("relevance", "purchase", type=schema_lib.RANKING,
                         events={"purchase": 3, "cart": 2, "click": 1}, list_size=4,
                         ranking_loss="listwise")
  columns = {"click": tf.constant([0., 1., 1., 1., 0.]), "cart": tf.constant([0., 0., 1., 1., 1.]),
             "purchase": tf.constant([0., 0., 0., 1., 0.])}
  assert targets.relevance_grade(task, columns).numpy().ravel().tolist() == [0, 1, 2, 3, 2]


def test_pairwise_loss_matches_hand_computation_and_ignores_padding():
  labels = tf.constant([[2.0, 0.0, 1.0, 5.0]])
  scores = tf.constant([[1.0, 2.0, 0.5, -9.0]])
  mask = tf.constant([[1.0, 1.0, 1.0, 0.0]])  # the last item is padding
  # Pairs: (0 > 1): margin -1; (0 > 2): margin 0.5; (2 > 1): margin -1.5.
  expected = (_softplus(1.0) + _softplus(-0.5) + _softplus(1.5)) / 3
  assert float(losses.pairwise_logistic_loss(labels, scores, mask)) == pytest.approx(
      expected, rel=1e-5)
  # No pair (all labels equal): exactly zero.
  assert float(losses.pairwise_logistic_loss(tf.ones([1, 3]), tf.zeros([1, 3]))) == 0.0
  # Perfect order: small but not zero with finite margins; vanishing with huge ones.
  ordered = losses.pairwise_logistic_loss(tf.constant([[2.0, 1.0, 0.0]]),
                                           tf.constant([[3.0, 2.0, 1.0]]))
  assert 0 < float(ordered) < losses.pairwise_logistic_loss(
      tf.constant([[2.0, 1.0, 0.0]]), tf.constant([[1.0, 2.0, 3.0]]))
  assert float(losses.pairwise_logistic_loss(tf.constant([[1.0, 0.0]]),
                                              tf.constant([[100.0, 0.0]]))) < 1e-30


def test_listwise_loss_matches_hand_computation_and_skips_irrelevant_lists():
  labels = tf.constant([[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  scores = tf.constant([[0.0, 1.0, 2.0, 50.0], [1.0, 2.0, 3.0, 4.0]])
  mask = tf.constant([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  log_z = math.log(math.exp(0.0) + math.exp(1.0) + math.exp(2.0))  # padding excluded
  expected = -(0.25 * (0.0 - log_z) + 0.75 * (2.0 - log_z))  # second list skipped
  assert float(losses.listwise_softmax_loss(labels, scores, mask)) == pytest.approx(
      expected, rel=1e-5)
  # One relevant item far ahead of the rest: ~0. Finite margin: positive.
  assert float(losses.listwise_softmax_loss(tf.constant([[1.0, 0.0]]),
                                             tf.constant([[100.0, 0.0]]))) < 1e-30
  assert float(losses.listwise_softmax_loss(tf.constant([[1.0, 0.0]]),
                                             tf.constant([[2.0, 0.0]]))) > 0.1


def test_keras_loss_wrappers_use_the_sample_weight_as_mask():
  labels, scores = tf.constant([[1.0, 0.0, 2.0]]), tf.constant([[0.3, 0.1, -0.2]])
  mask = tf.constant([[1.0, 1.0, 0.0]])
  assert float(losses.PairwiseLogisticLoss()(labels, scores, mask)) == pytest.approx(
      float(losses.pairwise_logistic_loss(labels, scores, mask)))
  assert float(losses.ListwiseSoftmaxLoss()(labels, scores, mask)) == pytest.approx(
      float(losses.listwise_softmax_loss(labels, scores, mask)))


@pytest.mark.parametrize("loss_class, loss_fn", [
    (losses.PairwiseLogisticLoss, losses.pairwise_logistic_loss),
    (losses.ListwiseSoftmaxLoss, losses.listwise_softmax_loss)])
def test_list_losses_cut_flat_batches_into_lists(loss_class, loss_fn):
  # Two lists of three, flat as the reader batches them ([6, 1] like a model output).
  labels = tf.constant([[2.0], [0.0], [1.0], [0.0], [1.0], [0.0]])
  scores = tf.constant([[0.1], [0.4], [-0.3], [1.0], [0.2], [0.0]])
  mask = tf.constant([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
  expected = loss_fn(tf.reshape(labels, [2, 3]), tf.reshape(scores, [2, 3]),
                     tf.reshape(mask, [2, 3]))
  loss = loss_class(list_size=3)
  assert float(loss(labels, scores, mask)) == pytest.approx(float(expected), rel=1e-6)
  restored = loss_class.from_config(loss.get_config())
  assert restored.list_size == 3


def _logloss(y, p):
  p = np.clip(p, 1e-7, 1 - 1e-7)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
@pytest.mark.parametrize("mode", ["masked", "batch"])
def test_masked_loss_averages_a_masked_task_over_its_kept_examples_or_the_batch(
    mode, weighting):
  schema = mixed_schema()  # cvr is masked by click; ctr has no mask
  model = mtl_zoo.build_shared_bottom(schema, bottom_units=[4], tower_units=[])
  trainable = mtl_zoo.compile_model(model, schema, weighting=weighting, masked_loss=mode)
  features = shared.probe_features(schema, batch=8)
  labels = {"ctr": tf.constant([[1.], [0.], [1.], [0.], [0.], [1.], [0.], [0.]]),
            "cvr": tf.constant([[1.], [0.], [0.], [0.], [0.], [1.], [0.], [0.]])}
  weights = {"ctr": tf.ones([8]), "cvr": tf.reshape(labels["ctr"], [8])}  # clicks: 3 of 8
  outputs = model(features)
  p = {t: outputs[t].numpy()[:, 0] for t in ("ctr", "cvr")}
  kept = weights["cvr"].numpy()
  cvr_terms = _logloss(labels["cvr"].numpy()[:, 0], p["cvr"]) * kept
  expected = {"ctr": _logloss(labels["ctr"].numpy()[:, 0], p["ctr"]).mean(),
              "cvr": cvr_terms.sum() / (3 if mode == "masked" else 8)}
  if weighting == "fixed":  # Keras' own compile/evaluate
    got = trainable.evaluate(features, labels, sample_weight=weights, batch_size=8,
                             verbose=0, return_dict=True)
    got = {t: got[f"{t}_loss"] for t in ("ctr", "cvr")}
  else:  # the balancers' trainer
    got = dict(zip(("ctr", "cvr"), (float(v) for v in trainable.task_losses(
        labels, outputs, weights))))
  assert got == pytest.approx(expected, rel=1e-5)
  # A batch whose mask keeps nothing adds nothing (no NaN).
  empty = losses.task_loss(schema.task("cvr"), mode)(labels["cvr"], outputs["cvr"],
                                                        sample_weight=tf.zeros([8]))
  assert float(empty) == 0.0
