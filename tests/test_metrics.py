import math

import numpy as np
import pytest

from mtl_zoo import metrics


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
