import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, mixed_columns, mixed_schema, run_cli_cases
from pipelines import files, integrity, manifest, reader, records, targets, validation
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import SOURCES, base, census, synthetic_ads


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
  os.remove(os.path.join(mixed_dir, manifest.MANIFEST_FILENAME))  # shards nobody vouches for
  path = sorted(glob.glob(os.path.join(mixed_dir, "train-*")))[0]
  data = bytearray(open(path, "rb").read())
  data[200] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(validation.BadRecordError,
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
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
  with writer_lib.DatasetWriter(out, schema, overwrite=True) as w:
    w.write_split("train", mixed_columns(40), num_shards=2)
  assert os.listdir(tmp_path) == ["d"]  # nothing left beside it
  assert sorted(os.listdir(out)) == ["manifest.json", "schema.json",
                                     "train-00000-of-00002.tfrecord",
                                     "train-00001-of-00002.tfrecord"]
  assert len(reader.read_columns(os.path.join(out, "train-*"), schema)["user"]) == 40


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_paths_swaps_two_directories_in_one_step(tmp_path):
  for name in ("a", "b"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / f"from_{name}").write_text(name)
  assert files.exchange_paths(str(tmp_path / "a"), str(tmp_path / "b"))
  assert os.listdir(tmp_path / "a") == ["from_b"] and os.listdir(tmp_path / "b") == ["from_a"]
  assert not files.exchange_paths(str(tmp_path / "a"), str(tmp_path / "missing"))
  assert os.listdir(tmp_path / "a") == ["from_b"]


def test_synthetic_log_is_deterministic_and_conversions_follow_clicks():
  world = synthetic_ads.AdsWorld(100, 50, seed=5)
  a, _ = world.sample_log(200, 10, seed=6)
  b, _ = synthetic_ads.AdsWorld(100, 50, seed=5).sample_log(200, 10, seed=6)
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
    schema = SOURCES["census"].write(out, census_dir=str(raw), census_group=group, seed=0,
                                     num_shards=2)
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
    SOURCES["census"].write(str(tmp_path / "x"), census_dir=str(tmp_path / "nowhere"))


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
  (tmp_path / "template.json").write_text(json.dumps(template))
  out = str(tmp_path / "out")
  schema = SOURCES["csv"].write(out, csv_schema=str(tmp_path / "template.json"),
                                csv=[f"train:{tmp_path / 'train.csv'}",
                                     f"eval:{tmp_path / 'eval.csv'}"])
  assert schema.feature("city").vocabulary == ["paris", "rome"]
  assert schema.feature("price").mean == pytest.approx(20.0)
  cols = reader.read_columns(os.path.join(out, "eval-*"), schema)
  assert cols["city"].tolist() == [-1]  # unseen city -> OOV
  assert cols["tags"].tolist() == [[-1, schema.feature("tags").vocabulary.index("a")]]
  assert cols["req"].tolist() == [3]
  (tmp_path / "bad.csv").write_text("city,tags,price,click,req\nparis,a,cheap,1,1\n")
  with pytest.raises(ValueError, match="bad.csv, row 2: column 'price' must be a number"):
    SOURCES["csv"].write(str(tmp_path / "o2"), csv_schema=str(tmp_path / "template.json"),
                         csv=[f"train:{tmp_path / 'bad.csv'}"])
  assert sorted(os.listdir(tmp_path)) == ["bad.csv", "eval.csv", "out", "template.json",
                                          "train.csv"]  # nothing half-written


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
  assert targets.default_event_weights(columns, ["click", "conversion"]) == {
      "click": pytest.approx(0.2), "conversion": 1.0}
  with pytest.raises(ValueError, match="never 1"):
    targets.default_event_weights({"click": np.zeros(3)}, ["click"])


def test_event_counts_stream_the_same_counts_as_the_columns(ads_dir, ads_schema):
  pattern = os.path.join(ads_dir, "train-*")
  columns = reader.read_columns(pattern, ads_schema)
  counts = targets.count_events(pattern, ads_schema, ["conversion", "click"])
  assert counts == {e: float(np.sum(columns[e] > 0.5)) for e in ("conversion", "click")}
  assert 0 < counts["conversion"] < counts["click"]
  assert targets.event_weights_from_counts(counts) == targets.default_event_weights(
      columns, ["conversion", "click"])


def test_event_weights_are_validated():
  with pytest.raises(schema_lib.SchemaError, match="events must map label columns"):
    _engagement_schema().from_dict({**_engagement_schema().to_dict(), "tasks": [
        {"name": "e", "label": "click", "events": {"purchase": 1.0}}]})
  assert schema_lib.Schema.from_dict(_engagement_schema().to_dict()).task(
      "engagement").events == {"conversion": 1.0, "click": 0.2}


# ------------------------------------------------------------ atomic publishing

def test_publishing_file_by_file_moves_the_marker_last_and_replaces_the_old_one(
    tmp_path, monkeypatch):
  """The object-store path (no directory rename), run on local directories."""
  old, new = tmp_path / "data", tmp_path / ".data.tmp-1"
  for directory, content in ((old, b"old"), (new, b"new")):
    directory.mkdir()
    for name in ("train-00000-of-00001.tfrecord", "schema.json"):
      (directory / name).write_bytes(content)
  moved = []
  rename = tf.io.gfile.rename

  def recording_rename(source, destination, overwrite=False):
    moved.append((source, destination))
    rename(source, destination, overwrite)

  monkeypatch.setattr(tf.io.gfile, "rename", recording_rename)
  files.publish_directory(str(new), str(old), marker="schema.json", by_file=True)
  assert {p.name: p.read_bytes() for p in old.iterdir()} == {
      "train-00000-of-00001.tfrecord": b"new", "schema.json": b"new"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
  # The old dataset stops looking whole first; the new one looks whole only at the end.
  assert moved[0][0] == str(old / "schema.json")
  assert moved[-1] == (str(new / "schema.json"), str(old / "schema.json"))
  assert len(moved) == 4


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_a_local_directory_replaces_the_old_one(tmp_path, monkeypatch, exchange):
  old, new = tmp_path / "data", tmp_path / ".data.tmp-1"
  for directory, content in ((old, b"old"), (new, b"new")):
    directory.mkdir()
    (directory / "schema.json").write_bytes(content)
  if not exchange:  # where the OS cannot swap: the two-rename path
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
  files.publish_directory(str(new), str(old), by_file=False)
  assert (old / "schema.json").read_bytes() == b"new"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ------------------------------------------------------------ numpy encoding

def _hostile_columns(n: int) -> dict:
  """mixed_schema columns with the ids that need every varint length."""
  columns = mixed_columns(n, seed=7)
  columns["raw_id"] = np.array([0, 127, 128, 2**14, 2**21 - 1, 2**35, 2**63 - 1, -1, -2**63]
                               * (n // 9 + 1))[:n]
  columns["tags"] = [list(np.random.default_rng(i).integers(-3, 2**40, i % 5))
                     for i in range(n)]
  return columns


@pytest.mark.parametrize("columns", ["mixed", "hostile", "ads"])
def test_numpy_encoded_records_equal_the_proto_path_byte_for_byte(columns, tmp_path):
  if columns == "ads":
    data, _ = synthetic_ads.AdsWorld(100, 50, seed=2).sample_log(40, 10, seed=3)
    schema = writer_lib.with_numeric_statistics(synthetic_ads.make_schema(100, 50), data)
  else:
    schema = mixed_schema()
    data = mixed_columns(300, seed=1) if columns == "mixed" else _hostile_columns(300)
  # protobuf's deterministic serialization: map keys in order, as the encoder writes.
  expected = [tf.train.Example.FromString(r).SerializeToString(deterministic=True)
              for r in schema.training_examples(data)]
  packed = schema.pack_columns(data)
  encoded, lengths = records.encode_examples(packed)
  ends = np.cumsum(lengths)
  assert [encoded[e - n:e].tobytes() for e, n in zip(ends, lengths)] == expected
  with tf.io.TFRecordWriter(str(tmp_path / "proto.tfrecord")) as w:
    for record in expected:
      w.write(record)
  assert records.tfrecords(packed) == (tmp_path / "proto.tfrecord").read_bytes()


def test_masked_crc32c_is_tfrecords_checksum():
  crc = 0xE3069283  # CRC32C of "123456789", the standard check value
  masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  assert integrity.masked_crc32c(b"123456789") == masked
  strings = [b"", b"a", b"123456789", bytes(range(256)) * 3]
  data = np.frombuffer(b"".join(strings), np.uint8)
  lengths = np.array([len(s) for s in strings], np.int64)
  assert records.masked_crc32c(data, lengths).tolist() == [
      integrity.masked_crc32c(s) for s in strings]


# ------------------------------------------------------------ sources

class ToySource(base.Source):
  """A source defined outside the package: `toy_rows` rows of x and y = x > 0."""

  name = "toy"
  description = "a toy"
  options = (base.Option("toy_rows", 10, int, "toy: rows.", lower_bound=1),)

  def convert(self, out_dir, *, num_shards, compression, overwrite, seed, toy_rows):
    x = np.random.default_rng(seed).normal(size=toy_rows)
    schema = schema_lib.Schema([schema_lib.Feature("x", "numeric")], ["y"],
                               [schema_lib.Task("positive", "y")], name="toy")
    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split="train") as w:
      w.write_split("train", {"x": x, "y": (x > 0).astype(np.float32)}, num_shards)
    return w.schema


def test_sources_are_a_registry_with_declared_options(tmp_path, monkeypatch):
  assert {"synthetic", "census", "csv", "mmoe_synthetic"} <= set(SOURCES)
  assert all(name == source.name for name, source in SOURCES.items())
  names = [o.name for source in SOURCES.values() for o in source.options]
  assert len(names) == len(set(names))  # one flag per option
  assert [name for name, source in SOURCES.items() if source.runs_on_beam] == ["csv"]
  with pytest.raises(ValueError, match=r"source 'synthetic' takes no option \['csv'\]; its "
                                       r"options are \['synthetic_calibration_requests'"):
    SOURCES["synthetic"].write(str(tmp_path / "a"), csv=["train:x.csv"])
  with pytest.raises(ValueError, match="option synthetic_requests must be at least 1"):
    SOURCES["synthetic"].write(str(tmp_path / "a"), synthetic_requests=0)
  with pytest.raises(ValueError, match="option census_group must be of type int, got '1'"):
    SOURCES["census"].write(str(tmp_path / "a"), census_group="1")
  assert not (tmp_path / "a").exists()

  monkeypatch.setitem(SOURCES, "toy", ToySource())  # registered from outside
  schema = SOURCES["toy"].write(str(tmp_path / "toy"), num_shards=2, seed=3, toy_rows=25)
  assert schema == schema_lib.Schema.load(str(tmp_path / "toy"))
  assert schema.feature("x").mean is not None
  assert reader.count_records(str(tmp_path / "toy" / "train-*")) == 25
  assert SOURCES["toy"].write_if_missing(str(tmp_path / "toy"), toy_rows=99) == schema
  # The convert CLI defines its flags from SOURCES, toy's included. In a process
  # of its own: another CLI imported by an earlier test defines --source too.
  check = ("import sys; sys.path.insert(0, 'tests'); from test_pipelines import ToySource; "
           "from pipelines.sources import SOURCES; SOURCES['toy'] = ToySource(); "
           "from pipelines import convert; "
           "assert ('toy', ToySource.options[0]) in convert.source_options()")
  run = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]


def test_synthetic_log_streams_in_chunks_and_the_first_is_the_single_draw(monkeypatch):
  world = synthetic_ads.AdsWorld(100, 50, seed=5)
  monkeypatch.setattr(synthetic_ads, "CHUNK_REQUESTS", 10)
  chunks = list(synthetic_ads.sample_chunks(world, 25, 10, seed=6))
  assert [len(c["click"]) for c, _ in chunks] == [100, 100, 50]
  # A log that fits one chunk is the single draw; each further chunk draws anew.
  np.testing.assert_array_equal(chunks[0][0]["item_id"],
                                world.sample_log(10, 10, seed=6)[0]["item_id"])
  np.testing.assert_array_equal(chunks[1][0]["item_id"],
                                world.sample_log(10, 10, seed=[6, 1])[0]["item_id"])
  np.testing.assert_array_equal(np.concatenate([c["request_id"] for c, _ in chunks]),
                                np.repeat(np.arange(25), 10))
  # Each chunk's oracle holds the chunk's impressions, in order.
  np.testing.assert_array_equal(np.concatenate([o.columns["request_id"] for _, o in chunks]),
                                np.repeat(np.arange(25), 10))


def _csv_template(tmp_path) -> str:
  template = {"features": [{"name": "city", "kind": "categorical", "embedding_dim": 4},
                           {"name": "tags", "kind": "categorical_list", "embedding_dim": 4,
                            "max_len": 3},
                           {"name": "slot", "kind": "categorical", "vocab_size": 9,
                            "embedding_dim": 2},
                           {"name": "price", "kind": "numeric", "transform": "log1p"}],
              "labels": ["click"], "tasks": [{"name": "ctr", "label": "click"}],
              "request_id": "req"}
  path = tmp_path / "template.json"
  path.write_text(json.dumps(template))
  return str(path)


def _csv_rows(n: int, seed: int) -> list:
  rng = np.random.default_rng(seed)
  cities = ["paris", "rome", "oslo", "", "new york,\nny", "zürich"]
  return [[i // 3, cities[rng.integers(len(cities))],
           "|".join(rng.choice(list("abcde"), rng.integers(0, 6)).tolist()),
           rng.integers(0, 12), "" if rng.random() < 0.1 else f"{rng.gamma(2.0, 9.0):.3f}",
           int(rng.random() < 0.3)] for i in range(n)]


def _write_csv(path, rows) -> None:
  import csv
  with open(path, "w", newline="", encoding="utf-8") as f:
    out = csv.writer(f)
    out.writerow(["req", "city", "tags", "slot", "price", "click"])
    out.writerows(rows)


def _parsed(pattern: str) -> list:
  return [tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True)
          for r in tf.data.TFRecordDataset(sorted(glob.glob(pattern)))]


def test_csv_streams_a_file_pattern_block_by_block(tmp_path, monkeypatch):
  """Three files in blocks of a few rows, encoded a few rows at a time, across
  shard bounds: the same dataset as one file read whole."""
  template = _csv_template(tmp_path)
  rows = _csv_rows(200, seed=1)
  _write_csv(tmp_path / "all.csv", rows)
  for i, part in enumerate((rows[:70], rows[70:71], rows[71:])):
    _write_csv(tmp_path / f"train-{i}.csv", part)
  _write_csv(tmp_path / "eval.csv", _csv_rows(30, seed=2))
  whole = SOURCES["csv"].write(str(tmp_path / "whole"), num_shards=3, csv_schema=template,
                               csv=[f"train:{tmp_path / 'all.csv'}",
                                    f"eval:{tmp_path / 'eval.csv'}"])
  from pipelines.sources import csv_reading
  monkeypatch.setattr(csv_reading, "READ_BYTES", 128)
  monkeypatch.setattr(csv_reading, "BLOCK_BYTES", 256)
  monkeypatch.setattr(writer_lib, "ENCODE_ROWS", 7)
  streamed = SOURCES["csv"].write(str(tmp_path / "streamed"), num_shards=3,
                                  csv_schema=template,
                                  csv=[f"train:{tmp_path / 'train-*.csv'}",
                                       f"eval:{tmp_path / 'eval.csv'}"])
  assert streamed.feature("city").vocabulary == whole.feature("city").vocabulary
  assert "new york,\nny" in streamed.feature("city").vocabulary
  assert streamed.feature("price").mean == pytest.approx(whole.feature("price").mean,
                                                         rel=1e-12)
  for split in ("train", "eval"):
    assert (_parsed(str(tmp_path / "streamed" / f"{split}-*"))
            == _parsed(str(tmp_path / "whole" / f"{split}-*")))
  listed = files.read_json(str(tmp_path / "streamed" / manifest.MANIFEST_FILENAME))
  assert {s: v["records"] for s, v in listed["splits"].items()} == {"train": 200, "eval": 30}
  assert [listed["files"][f]["records"] for f in listed["splits"]["train"]["files"]] == [
      66, 67, 67]
  # A bad cell in a later block of the second file is named by file, row and column.
  rows[150][4] = "cheap"  # the 80th row of train-2.csv: row 81, the header being row 1
  _write_csv(tmp_path / "train-2.csv", rows[71:])
  with pytest.raises(ValueError, match=r"train-2.csv, row 81: column 'price' must be a "
                                       r"number, got 'cheap'"):
    SOURCES["csv"].write(str(tmp_path / "bad"), csv_schema=template,
                         csv=[f"train:{tmp_path / 'train-*.csv'}"])
  with pytest.raises(FileNotFoundError, match="split 'eval': no CSV file matches"):
    SOURCES["csv"].write(str(tmp_path / "bad"), csv_schema=template,
                         csv=[f"train:{tmp_path / 'all.csv'}", f"eval:{tmp_path}/x-*.csv"])
  assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------ the manifest

def _scans(monkeypatch) -> list:
  """The files every framing scan reads, from now on."""
  scanned, scan = [], integrity.scan_shards
  monkeypatch.setattr(integrity, "scan_shards",
                      lambda files: scanned.append(list(files)) or scan(files))
  return scanned


def test_record_counts_come_from_the_manifest_while_the_shards_are_unchanged(
    ads_dir, tmp_path, monkeypatch):
  data = str(tmp_path / "ads")
  shutil.copytree(ads_dir, data)
  pattern = os.path.join(data, "train-*")
  scanned = _scans(monkeypatch)
  assert reader.count_records(pattern) == 3000  # as listed: nothing read
  ds = reader.make_dataset(pattern, schema_lib.Schema.load(data), 512, shuffle=False)
  assert scanned == []
  assert sum(len(labels["ctr"]) for _, labels, _ in ds) == 3000
  listed = files.read_json(os.path.join(data, manifest.MANIFEST_FILENAME))
  assert listed["splits"]["train"]["records"] == 3000
  assert listed["splits"]["eval"]["records"] == 1000
  # A shard changed after conversion (another size) is counted and checked again.
  shard = sorted(glob.glob(pattern))[0]
  records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
  with tf.io.TFRecordWriter(shard) as w:
    for r in records[:-10]:
      w.write(r)
  assert reader.count_records(pattern) == 2990
  assert scanned == [[shard]]
  os.truncate(shard, os.path.getsize(shard) - 5)  # cut inside its last record
  with pytest.raises(validation.BadRecordError, match="ends inside this record"):
    reader.count_records(pattern)


def test_counting_then_reading_scans_each_shard_once(ads_dir, tmp_path, monkeypatch):
  data = str(tmp_path / "ads")
  shutil.copytree(ads_dir, data)
  os.remove(os.path.join(data, manifest.MANIFEST_FILENAME))  # e.g. written by Beam
  pattern = os.path.join(data, "train-*")
  scanned = _scans(monkeypatch)
  assert reader.count_records(pattern) == 3000
  reader.make_dataset(pattern, schema_lib.Schema.load(data), 512)
  assert scanned == [sorted(glob.glob(pattern))]


def _autotuning_of_datasets_in(function) -> list:
  """tf.data autotuning (True, False, or None when unset) of each
  `with_options` in a tf.function's graph."""
  from tensorflow.core.framework import dataset_options_pb2
  found = []
  for op in function.get_concrete_function().graph.get_operations():
    if op.type == "OptionsDataset":
      options = dataset_options_pb2.Options.FromString(op.get_attr("serialized_options"))
      found.append(options.autotune_options.enabled
                   if options.autotune_options.HasField("enabled") else None)
  return found


def test_every_read_runs_without_tf_data_autotuning(ads_dir, ads_schema):
  """Its thread can hold an iterator's deletion for seconds (pipelines.tfdata):
  training, scoring and reading-back datasets, and the counting passes."""
  pattern = os.path.join(ads_dir, "train-*")
  for ds in (reader.make_dataset(pattern, ads_schema, 64),
             reader.make_dataset(pattern, ads_schema, 64, bad_records="skip", cache=False)):
    assert ds.options().autotune.enabled is False
    assert ds.options().experimental_warm_start is True
  for counting_pass in (integrity._count, integrity._count_each, integrity._run_length):
    assert _autotuning_of_datasets_in(counting_pass) == [False]


def test_shard_damaged_in_place_after_conversion_fails_as_it_is_read(mixed_dir):
  """Same size, so the manifest still vouches for it: TensorFlow's checksums
  catch the damage while reading; under "skip" every shard is scanned."""
  path = sorted(glob.glob(os.path.join(mixed_dir, "train-*")))[0]
  data = bytearray(open(path, "rb").read())
  data[200] ^= 0xFF
  open(path, "wb").write(bytes(data))
  ds = reader.make_dataset(os.path.join(mixed_dir, "train-*"), mixed_schema(), 64)
  with pytest.raises(tf.errors.DataLossError):
    for _ in ds:
      pass
  skipped = validation.SkippedRecords()
  ds = reader.make_dataset(os.path.join(mixed_dir, "train-*"), mixed_schema(), 64,
                           bad_records="skip", skipped=skipped)
  assert sum(len(labels["ctr"]) for _, labels, _ in ds) == 599
  assert skipped.counts()["corrupt"] == 1


# ------------------------------------------------------------ the command line


def test_convert_cli_takes_each_source_with_its_own_flags(tmp_path):
  template = _csv_template(tmp_path)
  for i in range(2):
    _write_csv(tmp_path / f"train-{i}.csv", _csv_rows(20, seed=i))
  cases = {
      "csv": ["--source=csv", f"--csv_schema={template}",
              f"--csv=train:{tmp_path}/train-*.csv", f"--out_dir={tmp_path}/csv",
              "--compression=gzip"],
      "synthetic": ["--source=synthetic", "--synthetic_requests=30",
                    f"--out_dir={tmp_path}/ads", "--num_shards=2"],
      "another source's flag": ["--source=synthetic", "--census_group=2",
                                f"--out_dir={tmp_path}/refused"],
      "csv without files": ["--source=csv", f"--out_dir={tmp_path}/refused"],
  }
  results = run_cli_cases("pipelines.convert", cases, tmp_path / "results.json")
  code, out, err = results["csv"]
  assert code == 0, err
  assert "train: wrote 40 rows in" in err and "rows/s" in err
  assert reader.count_records(f"{tmp_path}/csv/train-*") == 40
  assert sorted(os.listdir(tmp_path / "csv"))[0] == "manifest.json"
  assert glob.glob(f"{tmp_path}/csv/train-*.tfrecord.gz")
  code, out, err = results["synthetic"]
  assert code == 0, err
  assert reader.count_records(f"{tmp_path}/ads/eval-*") == 70  # a quarter of the requests
  assert reader.count_records(f"{tmp_path}/ads/calibration-*") == 70  # as many as eval
  code, _, err = results["another source's flag"]
  assert code == 1
  assert ("--census_group belongs to --source=census; it does not apply to "
          "--source=synthetic") in err
  code, _, err = results["csv without files"]
  assert code == 1 and "the csv source needs a schema template" in err
  assert not (tmp_path / "refused").exists()
