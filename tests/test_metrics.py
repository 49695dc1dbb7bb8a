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
