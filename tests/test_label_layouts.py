"""Natural label layouts: a deeper event left blank where the event before it
did not happen (no conversion logged without a click) reads as 0 for every
strategy, and nothing good is refused or skipped for it."""

import csv
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from mtl_zoo import runner, strategies
from mtl_zoo.config import RunConfig
from pipelines import reader, validation
from pipelines import schema as schema_lib
from pipelines.sources import SOURCES

TEMPLATE = {
    "features": [{"name": "item", "kind": "categorical", "embedding_dim": 4},
                 {"name": "category", "kind": "categorical", "embedding_dim": 2},
                 {"name": "price", "kind": "numeric"}],
    "labels": ["click", "conversion"],
    "tasks": [{"name": "ctr", "label": "click"},
              {"name": "cvr", "label": "conversion", "mask": "click"}],
    "request_id": "req", "item_id": "item", "item_category": "category"}
TRAIN_ROWS, EVAL_ROWS = 400, 200


def _write_log(path, n: int, seed: int) -> int:
  """A CSV log whose conversion cell is blank on every unclicked impression;
  returns the number of unclicked rows."""
  rng = np.random.default_rng(seed)
  unclicked = 0
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["req", "item", "category", "price", "click", "conversion"])
    for i in range(n):
      item = int(rng.integers(0, 20))
      click = int(rng.random() < 0.2 + 0.03 * (item % 10))
      conversion = int(rng.random() < 0.3 + 0.05 * (item % 5)) if click else ""
      unclicked += not click
      out.writerow([i // 5, f"item{item}", f"cat{item % 4}", f"{1 + item:.1f}", click,
                    conversion])
  return unclicked


@pytest.fixture(scope="module")
def blank_log(tmp_path_factory):
  """Converted CSV log (400 train, 200 eval impressions), conversion blank
  without a click."""
  base = tmp_path_factory.mktemp("layouts")
  (base / "template.json").write_text(json.dumps(TEMPLATE))
  assert _write_log(base / "train.csv", TRAIN_ROWS, 1) > TRAIN_ROWS // 2
  _write_log(base / "eval.csv", EVAL_ROWS, 2)
  out = str(base / "data")
  SOURCES["csv"].write(out, csv_schema=str(base / "template.json"),
                       csv=[f"train:{base / 'train.csv'}", f"eval:{base / 'eval.csv'}"])
  return out


def test_blank_conversion_reads_as_zero_where_not_clicked(blank_log):
  schema = schema_lib.Schema.load(blank_log)
  assert schema.label_masks == {"conversion": "click"}
  assert (schema.item_id, schema.item_category) == ("item", "category")
  columns = reader.read_columns(f"{blank_log}/eval-*", schema)
  assert not np.isnan(columns["conversion"]).any()
  assert (columns["conversion"][columns["click"] == 0] == 0).all()
  assert columns["conversion"][columns["click"] == 1].sum() > 0


CASES = {"mmoe": dict(model="mmoe", hyperparameters={"num_experts": 2, "expert_units": [4],
                                                     "tower_units": [4]}),
         "esmm": dict(model="esmm", hyperparameters={"bottom_units": [8], "tower_units": [4]}),
         "sample_weighting": dict(strategy="sample_weighting",
                                  hyperparameters={"bottom_units": [8], "tower_units": [4]}),
         "learning_to_rank": dict(strategy="learning_to_rank", list_size=5,
                                  hyperparameters={"bottom_units": [8], "tower_units": [4]})}


@pytest.mark.parametrize("policy", validation.BAD_RECORD_POLICIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_trains_on_every_record_of_a_blank_label_log(blank_log, case, policy,
                                                                     tmp_path):
  config = RunConfig(train_files=f"{blank_log}/train-*", eval_files=f"{blank_log}/eval-*",
                     max_epochs=1, batch_size=10, bad_records=policy, export_dir="",
                     model_dir=str(tmp_path / "run"), quiet=True, **CASES[case])
  summary = runner.run(config).summary
  assert summary["bad_records"]["skipped"]["train"]["total"] == 0
  assert summary["bad_records"]["skipped"]["eval"]["total"] == 0
  # Every written record is a training example: 400 records in steps of 10
  # (learning to rank: 80 requests of 5, two lists a step).
  assert summary["steps_per_epoch"] == TRAIN_ROWS // 10
  task = next(iter(summary["eval"]))
  assert summary["eval"][task]["examples"] == EVAL_ROWS
  assert all(math.isfinite(v) for v in summary["ranking"].values())
  # Beyond accuracy (the schema names item and category): 20 items in a
  # catalog of 20, 4 categories; requests of 5, so each request's top 2.
  ranking = summary["ranking"]
  assert 0 < ranking["coverage@2"] <= 1 and 0 < ranking["diversity@2"] <= 1
  assert ranking["novelty@2"] > math.log2(20) - 1


def test_a_metric_without_positives_stops_the_run_naming_the_column(tmp_path):
  base = tmp_path / "no-conversions"
  base.mkdir()
  (base / "template.json").write_text(json.dumps(TEMPLATE))
  _write_log(base / "train.csv", 100, 1)
  with open(base / "eval.csv", "w") as f:  # clicks, never a conversion
    f.write("req,item,category,price,click,conversion\n")
    f.writelines(f"{i // 5},item{i % 20},cat{i % 4},2.0,{i % 2},{0 if i % 2 else ''}\n"
                 for i in range(40))
  SOURCES["csv"].write(str(base / "data"), csv_schema=str(base / "template.json"),
                       csv=[f"train:{base / 'train.csv'}", f"eval:{base / 'eval.csv'}"])
  config = RunConfig(train_files=f"{base}/data/train-*", eval_files=f"{base}/data/eval-*",
                     max_epochs=1, batch_size=50, export_dir="", model_dir=str(tmp_path / "run"),
                     quiet=True, **CASES["mmoe"])
  with pytest.raises(runner.DataError, match="eval-\\*: no positive conversion in the eval "
                     "data where click is 1 \\(task cvr\\) \\(20 examples\\)"):
    runner.run(config)


def test_a_missing_label_where_it_counts_is_still_a_bad_record(tmp_path):
  schema = schema_lib.Schema.from_dict(
      {**TEMPLATE, "features": [{"name": "price", "kind": "numeric", "mean": 0.0, "std": 1.0}],
       "item_id": None, "item_category": None})
  schema = strategies.sample_weighting_schema(schema, {"click": 0.2, "conversion": 1.0})
  assert schema.label_masks == {"conversion": "click"}  # carried to the derived schema
  path = str(tmp_path / "train.tfrecord")
  rows = {"price": [1.0, 2.0, 3.0], "req": [0, 0, 1], "click": [0.0, 1.0, float("nan")],
          "conversion": [float("nan"), float("nan"), float("nan")]}
  with tf.io.TFRecordWriter(path) as w:
    for record in schema.training_examples(rows):
      w.write(record)
  skipped = validation.SkippedRecords()
  labels = [l for _, l, _ in reader.make_dataset(path, schema, 8, shuffle=False,
                                                 bad_records="skip", skipped=skipped)]
  # Only the unclicked impression is good: a missing conversion after a click,
  # and a missing click (nothing gates it), are bad records.
  assert labels[0]["engagement"].numpy().ravel().tolist() == [0.0]
  assert skipped.counts()["invalid"] == 2
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="event column conversion of task engagement must be a finite "
                     "number \\(or NaN, missing, where click is 0\\), got nan"):
    list(reader.make_dataset(path, schema, 8, shuffle=False))


def test_a_funnel_fills_gate_by_gate():
  schema = schema_lib.Schema(
      [schema_lib.Feature("x", "numeric", mean=0.0, std=1.0)], ["click", "cart", "buy"],
      [schema_lib.Task("ctr", "click"), schema_lib.Task("buy", "buy")],
      label_masks={"buy": "cart", "cart": "click"})
  assert schema.gated_labels() == [("cart", "click"), ("buy", "cart")]
  assert schema_lib.Schema.from_json(schema.to_json()) == schema
  nan = float("nan")
  labels = tf.constant([[0.0, nan, nan], [1.0, 0.0, nan], [1.0, nan, 1.0], [1.0, 1.0, nan]])
  filled = validation.label_filler(schema)({"__labels__": labels})["__labels__"].numpy()
  np.testing.assert_array_equal(filled[:2], [[0, 0, 0], [1, 0, 0]])
  assert np.isnan(filled[2, 1]) and np.isnan(filled[3, 2])  # a gate was 1: still missing
  with pytest.raises(schema_lib.SchemaError, match="label_masks form a cycle"):
    schema.replace(label_masks={"buy": "cart", "cart": "buy"})
