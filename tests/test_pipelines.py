import glob
import gzip
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import mixed_columns, mixed_schema
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.datasets import census, csv_source, synthetic_ads


def test_writer_reader_round_trip_equals_source(tmp_path):
  schema, columns = mixed_schema(), mixed_columns(250, seed=3)
  out = str(tmp_path / "d")
  with writer_lib.DatasetWriter(out, schema, compression="GZIP") as w:
    files = w.write_split("train", columns, num_shards=3)
  assert [os.path.basename(f) for f in files] == [
      f"train-0000{i}-of-00003.tfrecord.gz" for i in range(3)]
  assert schema_lib.Schema.load(out) == schema
  back = reader.read_columns(os.path.join(out, "train-*"), schema)
  for name in ("user", "raw_id", "slot"):
    np.testing.assert_array_equal(back[name], columns[name])
  np.testing.assert_allclose(back["price"], columns["price"], rtol=1e-6)
  np.testing.assert_array_equal(back["click"], columns["click"])
  for row, tags in zip(back["tags"], columns["tags"]):
    expected = list(tags[:3]) + [-1] * (3 - len(tags[:3]))
    assert row.tolist() == expected


def test_serving_and_training_layouts_parse_to_the_same_tensors():
  schema, columns = mixed_schema(), mixed_columns(20, seed=4)
  records = [{k: v[i] for k, v in columns.items()} for i in range(20)]
  records[0].pop("price")  # a missing optional feature gets the same default
  records[1].pop("tags")
  training = tf.constant([schema.training_example(r) for r in records])
  serving = tf.constant([schema.serving_example(r) for r in records])
  from_training, _ = schema.parse_training_examples(training)
  from_serving = schema.parse_serving_examples(serving)
  assert sorted(from_training) == sorted(from_serving) == sorted(schema.feature_names)
  for name in schema.feature_names:
    np.testing.assert_array_equal(from_training[name].numpy(), from_serving[name].numpy())
  # The schema mean (1.0) is taken after price's log1p: missing is its inverse.
  assert from_serving["price"][0].numpy() == pytest.approx(np.e - 1)
  assert from_serving["tags"][1].numpy().tolist() == [-1, -1, -1]


def test_make_dataset_yields_every_example_once_per_epoch(ads_dir, ads_schema):
  ds = reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, batch_size=128,
                           shuffle_block=512, seed=0)
  epochs = []
  for _ in range(2):
    ids = []
    for features, labels, weights in ds:
      assert sorted(features) == sorted(ads_schema.feature_names)
      assert sorted(labels) == ["ctr", "cvr"] and labels["ctr"].shape[1] == 1
      ids.append(np.stack([features["user_id"], features["item_id"],
                           features["position"]], 1))
    epochs.append(np.concatenate(ids))
  assert len(epochs[0]) == 3000
  assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1]))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_masks_become_sample_weights(ads_dir, ads_schema):
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 1000, shuffle=False)
  features, labels, weights = next(iter(ds))
  np.testing.assert_array_equal(weights["cvr"], labels["ctr"][:, 0])
  np.testing.assert_array_equal(weights["ctr"], np.ones(1000))
  # A conversion only ever follows a click.
  assert np.all(labels["cvr"].numpy() <= labels["ctr"].numpy())


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no files match .*nothing-here"):
    reader.make_dataset(str(tmp_path / "nothing-here-*"), mixed_schema(), 8)


def test_corrupt_record_is_named_before_reading(mixed_dir):
  path = sorted(glob.glob(os.path.join(mixed_dir, "train-*")))[0]
  data = bytearray(open(path, "rb").read())
  data[200] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(reader.BadRecordError,
                     match=f"(?s){re.escape(path)}: record 1 .*data fails its checksum"
                           ".*--bad_records=skip"):
    reader.make_dataset(os.path.join(mixed_dir, "train-*"), mixed_schema(), 64)


def test_binary_label_out_of_range_names_the_label(tmp_path):
  schema, columns = mixed_schema(), mixed_columns(50)
  columns["click"][7] = 3.0
  out = str(tmp_path / "bad")
  with writer_lib.DatasetWriter(out, schema) as w:
    w.write_split("train", columns)
  ds = reader.make_dataset(os.path.join(out, "train-*"), schema, 64)
  with pytest.raises(tf.errors.InvalidArgumentError, match="label column click of binary task ctr must be 0 or 1"):
    next(iter(ds))


def test_failed_write_leaves_nothing_and_keeps_old_data(tmp_path):
  schema = mixed_schema()
  out = str(tmp_path / "d")
  with writer_lib.DatasetWriter(out, schema) as w:
    w.write_split("train", mixed_columns(30))
  before = sorted(os.listdir(out))
  with pytest.raises(RuntimeError):
    with writer_lib.DatasetWriter(out, schema, overwrite=True) as w:
      w.write_split("train", mixed_columns(40))
      raise RuntimeError("crash mid-write")
  assert sorted(os.listdir(out)) == before
  assert os.listdir(tmp_path) == ["d"]  # no temporary directory left behind
  assert len(reader.read_columns(os.path.join(out, "train-*"), schema)["user"]) == 30
  with pytest.raises(FileExistsError, match="overwrite"):
    writer_lib.DatasetWriter(out, schema)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_the_dataset_whole(tmp_path, monkeypatch, exchange):
  schema = mixed_schema()
  out = str(tmp_path / "d")
  with writer_lib.DatasetWriter(out, schema) as w:
    w.write_split("train", mixed_columns(30))
  if not exchange:  # where the OS cannot swap: the two-rename path
    monkeypatch.setattr(writer_lib, "exchange_paths", lambda a, b: False)
  with writer_lib.DatasetWriter(out, schema, overwrite=True) as w:
    w.write_split("train", mixed_columns(40), num_shards=2)
  assert os.listdir(tmp_path) == ["d"]  # nothing left beside it
  assert sorted(os.listdir(out)) == ["schema.json", "train-00000-of-00002.tfrecord",
                                     "train-00001-of-00002.tfrecord"]
  assert len(reader.read_columns(os.path.join(out, "train-*"), schema)["user"]) == 40


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_paths_swaps_two_directories_in_one_step(tmp_path):
  for name in ("a", "b"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / f"from_{name}").write_text(name)
  assert writer_lib.exchange_paths(str(tmp_path / "a"), str(tmp_path / "b"))
  assert os.listdir(tmp_path / "a") == ["from_b"] and os.listdir(tmp_path / "b") == ["from_a"]
  assert not writer_lib.exchange_paths(str(tmp_path / "a"), str(tmp_path / "missing"))
  assert os.listdir(tmp_path / "a") == ["from_b"]


def test_synthetic_log_is_deterministic_and_conversions_follow_clicks():
  world = synthetic_ads.AdsWorld(100, 50, seed=5)
  a = world.sample_log(200, 10, seed=6)
  b = synthetic_ads.AdsWorld(100, 50, seed=5).sample_log(200, 10, seed=6)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k], dtype=object),
                                  np.asarray(b[k], dtype=object))
  assert np.all(a["conversion"] <= a["click"])
  assert 0.05 < a["click"].mean() < 0.5 and a["conversion"].sum() > 0
  assert len(np.unique(a["request_id"])) == 200


def _fake_census_line(rng, i):
  fields = [str(rng.integers(0, 90))] + [f"c{rng.integers(0, 3)}" for _ in range(41)]
  for name in census.NUMERIC:
    fields[census.COLUMNS.index(name)] = str(rng.integers(0, 100))
  fields[census.COLUMNS.index("education")] = (
      "Bachelors degree(BA AB BS)" if i % 3 == 0 else "High school graduate")
  fields[census.COLUMNS.index("marital_stat")] = "Never married" if i % 2 else "Divorced"
  fields[census.COLUMNS.index("instance_weight")] = "1234.5"
  fields[census.COLUMNS.index("income_50k")] = "50000+." if i % 5 == 0 else "- 50000."
  return ", ".join(fields)


def test_census_conversion_follows_the_paper_setup(tmp_path):
  rng = np.random.default_rng(0)
  raw = tmp_path / "raw"
  raw.mkdir()
  for name, n in ((census.TRAIN_FILE, 60), (census.TEST_FILE, 40)):
    with gzip.open(raw / name, "wt") as f:
      f.write("\n".join(_fake_census_line(rng, i) for i in range(n)) + "\n")
  for group, tasks in ((1, ["income", "marital"]), (2, ["education", "marital"])):
    out = str(tmp_path / f"g{group}")
    schema = census.write(str(raw), out, group=group, seed=0, num_shards=2)
    assert schema.task_names == tasks
    assert not {"education", "marital_stat", "income_50k", "instance_weight"} & set(
        schema.feature_names)
    counts = {s: reader.count_records(os.path.join(out, f"{s}-*"))
              for s in ("train", "validation", "test")}
    assert counts == {"train": 60, "validation": 20, "test": 20}
    cols = reader.read_columns(os.path.join(out, "train-*"), schema)
    np.testing.assert_array_equal(cols["income_50k"], [i % 5 == 0 for i in range(60)])
    np.testing.assert_array_equal(cols["never_married"], [i % 2 for i in range(60)])
    np.testing.assert_array_equal(cols["college"], [i % 3 == 0 for i in range(60)])
  with pytest.raises(FileNotFoundError, match="census-income.data.gz"):
    census.write(str(tmp_path / "nowhere"), str(tmp_path / "x"))


def test_csv_conversion_builds_vocabularies_and_statistics(tmp_path):
  (tmp_path / "train.csv").write_text(
      "city,tags,price,click,req\nparis,a|b,10,1,1\nrome,b,20,0,1\nparis,,30,0,2\n")
  (tmp_path / "eval.csv").write_text("city,tags,price,click,req\noslo,c|a,5,1,3\n")
  template = {"features": [{"name": "city", "kind": "categorical", "embedding_dim": 4},
                           {"name": "tags", "kind": "categorical_list", "embedding_dim": 4,
                            "max_len": 2},
                           {"name": "price", "kind": "numeric"}],
              "labels": ["click"], "tasks": [{"name": "ctr", "label": "click"}],
              "request_id": "req"}
  out = str(tmp_path / "out")
  schema = csv_source.convert(template, [("train", str(tmp_path / "train.csv")),
                                         ("eval", str(tmp_path / "eval.csv"))], out)
  assert schema.feature("city").vocabulary == ["paris", "rome"]
  assert schema.feature("price").mean == pytest.approx(20.0)
  cols = reader.read_columns(os.path.join(out, "eval-*"), schema)
  assert cols["city"].tolist() == [-1]  # unseen city -> OOV
  assert cols["tags"].tolist() == [[-1, schema.feature("tags").vocabulary.index("a")]]
  assert cols["req"].tolist() == [3]
  (tmp_path / "bad.csv").write_text("city,tags,price,click,req\nparis,a,cheap,1,1\n")
  with pytest.raises(ValueError, match="row 2: column 'price' must be a number"):
    csv_source.convert(template, [("train", str(tmp_path / "bad.csv"))], str(tmp_path / "o2"))


def _engagement_schema(**task_options):
  base = mixed_schema()
  task = schema_lib.Task("engagement", "click", events={"conversion": 1.0, "click": 0.2},
                         **task_options)
  return schema_lib.Schema(base.features, base.labels, [task], name="weighted")


def test_sample_weighting_weighs_each_example_by_its_deepest_event(tmp_path):
  schema = _engagement_schema()
  columns = mixed_columns(3)
  columns["click"] = np.array([0.0, 1.0, 1.0], np.float32)
  columns["conversion"] = np.array([0.0, 0.0, 1.0], np.float32)
  out = str(tmp_path / "d")
  with writer_lib.DatasetWriter(out, schema) as w:
    w.write_split("train", columns)
  _, labels, weights = next(iter(reader.make_dataset(os.path.join(out, "train-*"), schema, 8,
                                                     shuffle=False)))
  assert labels["engagement"][:, 0].numpy().tolist() == [0.0, 1.0, 1.0]
  np.testing.assert_allclose(weights["engagement"], [0.2, 0.2, 1.0])
  # Duplication: the same effective weights as copies of weight 1.
  ds = reader.make_dataset(os.path.join(out, "train-*"), schema, 8, shuffle=False,
                           duplicate_task="engagement")
  _, labels, weights = next(iter(ds))
  assert labels["engagement"][:, 0].numpy().tolist() == [0.0, 1.0] + [1.0] * 5
  np.testing.assert_allclose(weights["engagement"], np.ones(7))
  with pytest.raises(ValueError, match="no 'events' weights"):
    reader.make_dataset(os.path.join(out, "train-*"), mixed_schema(), 8,
                        duplicate_task="ctr")
  # An explicit weight for examples without any event.
  heavy = _engagement_schema(negative_weight=0.5)
  _, _, weights = next(iter(reader.make_dataset(os.path.join(out, "train-*"), heavy, 8,
                                                shuffle=False)))
  np.testing.assert_allclose(weights["engagement"], [0.5, 0.2, 1.0])


def test_default_event_weights_come_from_event_counts():
  columns = {"click": np.array([1] * 10 + [0] * 5), "conversion": np.array([1] * 2 + [0] * 13)}
  assert reader.default_event_weights(columns, ["click", "conversion"]) == {
      "click": pytest.approx(0.2), "conversion": 1.0}
  with pytest.raises(ValueError, match="never 1"):
    reader.default_event_weights({"click": np.zeros(3)}, ["click"])


def test_event_counts_stream_the_same_counts_as_the_columns(ads_dir, ads_schema):
  pattern = os.path.join(ads_dir, "train-*")
  columns = reader.read_columns(pattern, ads_schema)
  counts = reader.count_events(pattern, ads_schema, ["conversion", "click"])
  assert counts == {e: float(np.sum(columns[e] > 0.5)) for e in ("conversion", "click")}
  assert 0 < counts["conversion"] < counts["click"]
  assert reader.event_weights_from_counts(counts) == reader.default_event_weights(
      columns, ["conversion", "click"])


def test_event_weights_are_validated():
  with pytest.raises(schema_lib.SchemaError, match="events must map label columns"):
    _engagement_schema().from_dict({**_engagement_schema().to_dict(), "tasks": [
        {"name": "e", "label": "click", "events": {"purchase": 1.0}}]})
  assert schema_lib.Schema.from_dict(_engagement_schema().to_dict()).task(
      "engagement").events == {"conversion": 1.0, "click": 0.2}
