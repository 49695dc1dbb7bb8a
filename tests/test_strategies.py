"""The four ranking strategies: request lists, schema transformations, the
objective report and the fusion-weight search."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from mtl_zoo import fusion_search
from mtl_zoo import metrics
from mtl_zoo import models
from mtl_zoo import strategies
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import shards, validation


def test_group_by_request_pads_masks_and_keeps_file_order():
  block = {schema_lib.PACKED_REQUEST_ID: tf.constant([5, 3, 5, 3, 3, 7, 3], tf.int64),
           "__numeric__": tf.constant([[0.], [1.], [2.], [3.], [4.], [5.], [6.]]),
           "tags": tf.constant([[i, -1] for i in range(7)], tf.int64)}
  lists = reader.group_by_request(block, list_size=3)
  # Requests in id order; request 3 has four examples, its fourth is cut.
  assert lists[schema_lib.PACKED_REQUEST_ID].numpy().tolist() == [
      [3, 3, 3], [5, 5, 0], [7, 0, 0]]
  assert lists["__numeric__"].numpy()[..., 0].tolist() == [[1, 3, 4], [0, 2, 0], [5, 0, 0]]
  assert lists["tags"].numpy()[..., 0].tolist() == [[1, 3, 4], [0, 2, 0], [5, 0, 0]]
  assert lists[reader.LIST_MASK].numpy().tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]


@pytest.fixture(scope="module")
def ltr_schema(ads_schema):
  return strategies.learning_to_rank_schema(ads_schema, {"conversion": 2, "click": 1},
                                            list_size=12)


def test_ranking_batches_hold_whole_requests_with_grades_and_padding(ads_dir, ltr_schema):
  columns = reader.read_columns(f"{ads_dir}/train-*", ltr_schema)
  expected_grade = {}
  for request, click, conversion in zip(columns["request_id"], columns["click"],
                                        columns["conversion"]):
    expected_grade.setdefault(int(request), []).append(2 if conversion else int(click))
  ds = reader.make_dataset(f"{ads_dir}/train-*", ltr_schema, batch_size=48, seed=0)
  seen = {}
  for features, labels, weights in ds:
    assert features["user_id"].shape[0] % 12 == 0
    mask = tf.reshape(weights["relevance"], [-1, 12]).numpy()
    grades = tf.reshape(labels["relevance"], [-1, 12]).numpy()
    users = tf.reshape(features["user_id"], [-1, 12]).numpy()
    for row in range(mask.shape[0]):
      real = mask[row] > 0
      assert real[:real.sum()].all()  # padding only at the end
      assert len(set(users[row][real])) == 1  # one request = one user
      seen.setdefault(int(users[row][0]), []).append(sorted(grades[row][real].tolist()))
  # Every impression appears once, with its grade (10 per request; the shards may
  # split a request into two lists).
  total = sum(len(g) for lists in seen.values() for g in lists)
  assert total == len(columns["click"])
  all_seen = sorted(g for lists in seen.values() for grades in lists for g in grades)
  assert all_seen == sorted(g for grades in expected_grade.values() for g in grades)


def test_examples_past_list_size_are_counted(ads_dir, ads_schema):
  short = strategies.learning_to_rank_schema(ads_schema, {"conversion": 2, "click": 1},
                                             list_size=4)
  expected = 0
  for path in shards.list_files(f"{ads_dir}/train-*"):  # a shard is read in one block
    requests = reader.read_columns(path, short)["request_id"].tolist()
    expected += sum(max(0, requests.count(r) - 4) for r in set(requests))
  assert expected > 0
  overflow = validation.ListOverflow()
  ds = reader.make_dataset(f"{ads_dir}/train-*", short, batch_size=40, shuffle=False,
                           shuffle_block=100_000, list_overflow=overflow)
  kept = sum(float(tf.reduce_sum(w["relevance"])) for _, _, w in ds)
  assert overflow.count == expected
  assert kept == len(reader.read_columns(f"{ads_dir}/train-*", short)["request_id"]) - expected


def test_a_ranking_model_trains_with_the_list_loss(ads_dir, ltr_schema):
  model = models.build("single_task", ltr_schema, bottom_units=[16], tower_units=[])
  mtl_zoo.compile_model(model, ltr_schema, learning_rate=5e-3)
  assert model.loss["relevance"].list_size == 12
  ds = reader.make_dataset(f"{ads_dir}/train-*", ltr_schema, batch_size=120, seed=0)
  history = model.fit(ds, epochs=4, verbose=0).history["loss"]
  assert history[-1] < history[0]


@pytest.mark.parametrize("change, message", [
    (dict(list_size=1), "list_size must be an integer >= 2"),
    (dict(ranking_loss="pointwise"), "ranking_loss must be one of"),
    (dict(events={"click": 0}), "positive grades"),
    (dict(mask="click"), "take no mask"),
])
def test_ranking_tasks_are_validated(ads_schema, change, message):
  task = dict(name="relevance", label="click", type=schema_lib.RANKING,
              events={"click": 1}, list_size=4, ranking_loss="listwise")
  task.update(change)
  with pytest.raises(schema_lib.SchemaError, match=message):
    schema_lib.Schema(ads_schema.features, ads_schema.labels, [schema_lib.Task(**task)],
                      ads_schema.request_id)
  with pytest.raises(schema_lib.SchemaError, match="declare the schema's request_id"):
    schema_lib.Schema(ads_schema.features, ads_schema.labels, [schema_lib.Task(
        "relevance", "click", type=schema_lib.RANKING, events={"click": 1}, list_size=4,
        ranking_loss="listwise")])
  with pytest.raises(schema_lib.SchemaError, match="belong to ranking tasks"):
    schema_lib.Schema(ads_schema.features, ads_schema.labels,
                      [schema_lib.Task("ctr", "click", list_size=4)])


def test_strategy_defaults_follow_the_funnel(ads_schema, ltr_schema):
  assert [t.name for t in strategies.funnel(ads_schema)] == ["ctr", "cvr"]
  assert strategies.default_grades(ads_schema) == {"click": 1.0, "conversion": 2.0}
  assert strategies.default_fusion(ads_schema) == {"mode": "product", "terms": ["ctr", "cvr"],
                                                   "weights": [1.0, 1.0]}
  weighted = strategies.sample_weighting_schema(ads_schema, {"conversion": 1, "click": 0.2})
  assert weighted.tasks[0].label == "conversion" and weighted.task_names == ["engagement"]
  assert ltr_schema.list_size == 12 and ltr_schema.tasks[0].label == "conversion"
  restored = schema_lib.Schema.from_json(ltr_schema.to_json())
  assert restored.tasks[0] == ltr_schema.tasks[0]


def _report_columns():
  return {"click": np.array([1, 0, 1, 0, 1, 1, 0, 0], np.float32),
          "conversion": np.array([1, 0, 0, 0, 0, 1, 0, 0], np.float32),
          "request_id": np.array([0, 0, 0, 0, 1, 1, 1, 1])}


def test_objective_report_ranks_one_score_against_every_objective(ads_schema):
  columns = _report_columns()
  score = np.array([0.9, 0.1, 0.3, 0.5, 0.2, 0.6, 0.7, 0.05])
  report = strategies.objective_report(score, columns, ads_schema, k=2)
  clicked = columns["click"] > 0
  assert report["ctr_auc"] == metrics.auc(columns["click"], score)
  assert report["cvr_auc"] == metrics.auc(columns["conversion"][clicked], score[clicked])
  assert report["cvr_entire_auc"] == metrics.auc(columns["conversion"], score)
  assert report["gauc"] == metrics.gauc(columns["click"], score, columns["request_id"])
  # Request 0 puts its conversion first, request 1 second: NDCG@2 1 and 1/log2(3).
  assert report["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 2)


def test_objective_report_rates_what_each_request_shows(ads_schema):
  columns = {**_report_columns(), "item_id": np.array([5, 6, 7, 5, 8, 9, 5, 1]),
             "item_category": np.array([0, 1, 2, 0, 1, 2, 3, 3])}
  score = np.array([0.9, 0.1, 0.3, 0.5, 0.2, 0.6, 0.7, 0.05])
  popularity = metrics.popularity(np.r_[np.zeros(100), 1.0])  # one OOV impression
  report = strategies.objective_report(score, columns, ads_schema, k=4,
                                       item_popularity=popularity, beyond_k=2)
  # Top 2 of request 0: records 0, 3 (items 5, 5; categories 0, 0); of request
  # 1: records 6, 5 (items 5, 9; categories 3, 2).
  assert ads_schema.feature("item_id").vocab_size == 100
  assert report["coverage@2"] == 2 / 100
  assert report["diversity@2"] == 0.5
  assert report["novelty@2"] == pytest.approx(np.log2(102))  # each item 1 / 102
  assert "ndcg@4" in report and "coverage@4" not in report


def test_beyond_accuracy_rates_fewer_items_than_requests_hold(ads_schema):
  """On requests of at most k candidates a top k is the whole request, the same
  for any score; the default list is then a third of the median request."""
  tens = np.repeat(np.arange(50), 10)
  assert strategies.default_beyond_k(tens, 10) == 3
  assert strategies.default_beyond_k(np.repeat(np.arange(50), 5), 10) == 2
  assert strategies.default_beyond_k(np.repeat(np.arange(50), 40), 10) == 10
  row = np.arange(500)
  columns = {"request_id": tens, "item_id": row % 10, "item_category": row % 5,
             "click": (row % 3 == 0).astype(np.float32),
             "conversion": (row % 6 == 0).astype(np.float32)}
  rng = np.random.default_rng(0)
  reports = [strategies.objective_report(score, columns, ads_schema, k=10)
             for score in (rng.random(500), (row % 10).astype(float))]
  # The whole request at 10 would rate both scores alike; their top 3 differ.
  assert "coverage@3" in reports[0] and "coverage@10" not in reports[0]
  assert reports[0]["coverage@3"] > reports[1]["coverage@3"] == 3 / 100


def test_fusion_search_scores_candidates_and_finds_the_pareto_front(ads_schema):
  columns = _report_columns()
  outputs = {"ctr": np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.3, 0.1]),
             "cvr": np.array([0.5, 0.2, 0.1, 0.1, 0.1, 0.9, 0.2, 0.3])}
  candidates = fusion_search.grid_candidates(2, [0.0, 1.0, 4.0])
  assert candidates == [(1.0, 0.0), (1.0, 1.0), (1.0, 4.0)]
  rows = fusion_search.search(outputs, columns, ads_schema, "product", ["ctr", "cvr"],
                              candidates, k=2)
  # Weight 0 on cvr ranks by ctr alone.
  assert rows[0]["ctr_auc"] == metrics.auc(columns["click"], outputs["ctr"])
  fused = outputs["ctr"] * outputs["cvr"] ** 4
  assert rows[2]["cvr_entire_auc"] == pytest.approx(metrics.auc(columns["conversion"], fused))
  assert len(fusion_search.random_candidates(3, 5, seed=1)) == 5

  front_rows = [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.4},
                {"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 0.0}]
  front = fusion_search.pareto_front(front_rows, ["a", "b"])
  assert front == [front_rows[0], front_rows[1], front_rows[3], front_rows[4]]
