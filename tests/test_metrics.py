import math

import numpy as np
import pytest

from mtl_zoo import metrics
from pipelines import schema as schema_lib


def test_auc_counts_ties_as_half():
  assert metrics.auc([0, 1, 0, 1], [0.1, 0.9, 0.5, 0.5]) == pytest.approx(0.875)
  assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_gauc_weights_groups_by_size_and_skips_one_class_groups():
  labels = [1, 0, 0, 1, 0, 1, 1, 0, 0]
  scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.4, 0.6, 0.7]
  groups = [7, 7, 7, 3, 3, 9, 9, 5, 5]
  # group 7: AUC 1.0 (3 examples); group 3: 0.0 (2); group 9: one class, skipped;
  # group 5: one class, skipped.
  assert metrics.gauc(labels, scores, groups) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)
  assert math.isnan(metrics.gauc([1, 1], [0.1, 0.2], [1, 1]))


def test_ndcg_matches_hand_computed_values():
  relevance = [3, 0, 1, 2, 0]
  scores = [0.1, 0.9, 0.8, 0.3, 0.2]
  groups = [1, 1, 1, 1, 1]
  # Ranked relevance by score: 0, 1, 2, 0, 3.
  dcg = (2**0 - 1) / np.log2(2) + (2**1 - 1) / np.log2(3) + (2**2 - 1) / np.log2(4) \
      + 0 + (2**3 - 1) / np.log2(6)
  ideal = (2**3 - 1) / np.log2(2) + (2**2 - 1) / np.log2(3) + (2**1 - 1) / np.log2(4)
  assert metrics.ndcg_at_k(relevance, scores, groups, k=5) == pytest.approx(dcg / ideal)
  dcg3 = (2**1 - 1) / np.log2(3) + (2**2 - 1) / np.log2(4)
  assert metrics.ndcg_at_k(relevance, scores, groups, k=3) == pytest.approx(dcg3 / ideal)
  # Perfect order gives 1; a group with nothing relevant is skipped.
  assert metrics.ndcg_at_k([2, 1, 0, 0, 0], [5, 4, 3, 2, 1], [1, 1, 1, 2, 2]) == 1.0


def test_epoch_evaluation_records_a_curve_logs_and_gates(ads_dir, ads_schema, tmp_path,
                                                         capsys):
  import os
  import mtl_zoo
  from pipelines import reader
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema, num_experts=3)
  mtl_zoo.compile_model(model, ads_schema)
  heldout = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 500,
                                shuffle=False)
  evaluation = metrics.EpochEvaluation(model, ads_schema, heldout, steps_per_epoch=4,
                                       log_dir=str(tmp_path / "logs"), report=True)
  history = model.fit(reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 256),
                      epochs=2, steps_per_epoch=4, callbacks=[evaluation], verbose=0)
  assert [point["step"] for point in evaluation.curve] == [4, 8]
  assert evaluation.curve[-1]["metrics"] == evaluation.latest
  # The last epoch's figures are exact metrics of the trained model on that data.
  expected = metrics.evaluate(model, ads_schema, heldout)
  assert evaluation.latest["ctr"]["auc"] == pytest.approx(expected["ctr"]["auc"], abs=1e-6)
  assert history.history["eval_ctr_auc"][-1] == evaluation.latest["ctr"]["auc"]
  assert sorted(evaluation.gates) == ["gate_ctr", "gate_cvr"]
  assert "epoch 2 eval: ctr auc" in capsys.readouterr().out
  assert os.listdir(tmp_path / "logs")  # gate summaries for TensorBoard


def test_beyond_accuracy_metrics_match_hand_computed_values():
  # Two requests' top 3 (item ids) and their items' categories.
  lists = [np.array([0, 1, 2]), np.array([2, 3, 9])]  # 9: outside a catalog of 8
  assert metrics.catalog_coverage(lists, catalog_size=8) == 4 / 8  # items 0, 1, 2, 3
  # Categories a, a, b: 2 of 3 pairs differ; b, c, d: 3 of 3; a one-item list has no pairs.
  assert metrics.intra_list_diversity([np.array([0, 0, 1]), np.array([1, 2, 3]),
                                       np.array([5])]) == pytest.approx((2 / 3 + 1) / 2)
  with pytest.raises(metrics.MetricError, match="no request shows two items"):
    metrics.intra_list_diversity([np.array([1])])
  # Training impressions 5, 1, 0, 2 of 4 items: add-one shares 6/12, 2/12, 1/12, 3/12.
  popularity = metrics.popularity([5, 1, 0, 2])
  np.testing.assert_allclose(popularity, [0.5, 1 / 6, 1 / 12, 0.25])
  # Shown: 0, 1, 1, 2 -> bits 1, log2(6), log2(6), log2(12).
  assert metrics.novelty([np.array([0, 1]), np.array([1, 2])], popularity) == pytest.approx(
      (1 + 2 * np.log2(6) + np.log2(12)) / 4)
  # Each request's top 2 by score, best first; ties keep the input order.
  assert [l.tolist() for l in metrics.top_k_lists(
      [0.1, 0.9, 0.5, 0.3, 0.3, 0.8], [7, 7, 7, 4, 4, 4], k=2)] == [[5, 3], [1, 2]]
  feature = schema_lib.Feature("item", "categorical", vocab_size=4, embedding_dim=2)
  assert metrics.item_rows([-1, 0, 3, 4], feature).tolist() == [4, 0, 3, 4]


def test_reported_metrics_name_the_column_instead_of_nan():
  with pytest.raises(metrics.MetricError, match="no positive conversion in the eval data "
                     "where click is 1 \\(3 examples\\)"):
    metrics.reported_auc([0, 0, 0], [0.1, 0.2, 0.3], "conversion", " where click is 1")
  with pytest.raises(metrics.MetricError, match="label column conversion has 1 missing"):
    metrics.reported_auc([0, 1, np.nan], [0.1, 0.2, 0.3], "conversion")
  schema = schema_lib.Schema([schema_lib.Feature("x", "numeric", mean=0.0, std=1.0)],
                             ["click", "conversion"],
                             [schema_lib.Task("ctr", "click"),
                              schema_lib.Task("cvr", "conversion", mask="click")])
  collected = {"ctr": {"label": np.array([1.0, 0.0]), "prediction": np.array([0.6, 0.4]),
                       "weight": np.ones(2)},
               "cvr": {"label": np.array([0.0, 0.0]), "prediction": np.array([0.6, 0.4]),
                       "weight": np.array([1.0, 0.0])}}
  with pytest.raises(metrics.MetricError, match="no positive conversion in the eval data "
                     "where click is 1 \\(task cvr\\) \\(1 examples\\)"):
    metrics.task_metrics(schema, collected)
  collected["cvr"].update(label=np.array([1.0, 0.0]), weight=np.ones(2))
  assert metrics.task_metrics(schema, collected)["cvr"]["auc"] == 1.0


def test_predict_function_traces_once_per_feature_layout_and_frees_the_model():
  import gc
  import weakref

  import mtl_zoo
  keras = mtl_zoo.keras
  traces = []

  class Doubling(keras.layers.Layer):
    def call(self, x):
      traces.append(1)  # Python runs only while a graph is traced
      return x * 2.0

  x = keras.Input(shape=(), name="x", dtype="float32")
  model = keras.Model({"x": x}, {"y": Doubling()(x)})
  traces.clear()
  predict = metrics.predict_function(model)
  assert metrics.predict_function(model) is predict  # the same one for the same model
  out = predict({"x": np.arange(5, dtype=np.float32)})
  np.testing.assert_allclose(out["y"], 2 * np.arange(5))
  predict({"x": np.ones(3, np.float32)})  # a smaller last batch: no new trace
  assert len(traces) == 1
  # Features the model does not take (labels, train-only columns) are dropped;
  # a new layout of the features is traced once more.
  out = predict({"x": np.ones(4, np.float32), "position": np.zeros(4, np.int64)})
  np.testing.assert_allclose(out["y"], 2.0)
  assert len(traces) == 2
  freed = weakref.ref(model)
  del model, predict, out
  gc.collect()
  assert freed() is None  # the cache keeps no model alive
