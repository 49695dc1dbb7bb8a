"""Export (with `keep`), batch scoring and fusion search with every path on
TensorFlow's in-memory filesystem (ram://), the tests' stand-in for gs://: each
gives what the same call gives on a local disk. ram:// lives in this process
only, so everything here runs in-process (no CLI subprocesses)."""

import csv
import dataclasses
import io
import os
import uuid

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import mtl_zoo
from mtl_zoo import fusion_search, layers, predict, serving
from pipelines import files
from pipelines import reader
from pipelines import schema as schema_lib

FUSION = "product:ctr=1,cvr=0.5,price=1"


@pytest.fixture(scope="module")
def ram_root():
  root = f"ram://mtl_zoo-{uuid.uuid4().hex[:8]}"
  yield root
  files.remove(root)


@pytest.fixture(scope="module")
def ram_data(ads_dir, ram_root):
  """The ads log's eval shards and schema.json, copied to ram://."""
  data = files.join(ram_root, "data")
  tf.io.gfile.makedirs(data)
  for name in tf.io.gfile.listdir(ads_dir):
    if name.startswith("eval-") or name == schema_lib.SCHEMA_FILENAME:
      tf.io.gfile.copy(os.path.join(ads_dir, name), files.join(data, name))
  return data


@pytest.fixture(scope="module")
def exports(ads_dir, ads_schema, ram_root, tmp_path_factory):
  """One model exported twice with keep=1 to a local disk and to ram://:
  {"local" or "ram": (base directory, [first version, second version])}."""
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema)
  warmup = ads_schema.serving_examples(
      reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=8))
  bases = {"local": str(tmp_path_factory.mktemp("export") / "ads"),
           "ram": files.join(ram_root, "export", "ads")}
  return {where: (base, [serving.export_saved_model(model, ads_schema, base, keep=1,
                                                    warmup_examples=warmup,
                                                    fusion=layers.parse_fusion(FUSION))
                         for _ in range(2)])
          for where, base in bases.items()}


def _method_names(path):
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(files.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return {name: s.method_name for name, s in proto.meta_graphs[0].signature_def.items()}


def test_export_with_keep_on_ram_serves_what_the_local_export_serves(exports, ads_dir,
                                                                     ads_schema):
  base, (first, second) = exports["ram"]
  assert serving.existing_versions(base) == [int(second.rsplit("/", 1)[1])]
  assert tf.io.gfile.listdir(base) == [second.rsplit("/", 1)[1]]  # no temporary left
  for pruned_file in ("saved_model.pb", "variables/variables.index",
                      serving.SCHEMA_ASSET, serving.WARMUP_ASSET):
    assert not tf.io.gfile.exists(files.join(first, pruned_file))
  assert schema_lib.Schema.load(files.join(second, serving.SCHEMA_ASSET)) == ads_schema
  warmup = list(tf.data.TFRecordDataset(files.join(second, serving.WARMUP_ASSET)))
  assert len(warmup) == 2

  local = exports["local"][1][1]
  assert _method_names(second) == _method_names(local)
  served = {where: tf.saved_model.load(path).signatures for where, path in
            (("local", local), ("ram", second))}
  assert sorted(served["ram"]) == sorted(served["local"]) == [
      "classify", "features", "rank", "regress", "serving_default"]
  examples = tf.constant(ads_schema.serving_examples(
      reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=50)))
  for name, argument in (("serving_default", "examples"), ("rank", "examples"),
                         ("classify", "inputs"), ("regress", "inputs")):
    outputs = {where: signatures[name](**{argument: examples})
               for where, signatures in served.items()}
    assert sorted(outputs["ram"]) == sorted(outputs["local"])
    for key, value in outputs["local"].items():
      np.testing.assert_array_equal(outputs["ram"][key], value)

  ram_configs = serving.write_serving_configs(base, num_batch_threads=2)
  local_configs = serving.write_serving_configs(exports["local"][0], num_batch_threads=2)
  assert ram_configs == [files.join(base.rsplit("/", 1)[0], name)
                         for name in ("models.config", "batching_parameters.txt")]
  for ram_path, local_path in zip(ram_configs, local_configs):
    with tf.io.gfile.GFile(ram_path) as ram_file, open(local_path) as local_file:
      assert ram_file.read() == local_file.read()


def _read_scores(path: str, fmt: str) -> dict:
  """Columns of a `predict.score` output on any filesystem."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if fmt == "csv":
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return {column: np.array([float(r[column]) for r in rows]) for column in rows[0]}
  if fmt == "parquet":
    return pyarrow.parquet.read_table(pyarrow.BufferReader(data)).to_pydict()
  columns = ("index", "request_id", "ctr", "cvr")
  spec = {c: tf.io.FixedLenFeature([], tf.int64 if c in ("index", "request_id")
                                   else tf.float32) for c in columns}
  parsed = tf.io.parse_example(
      tf.data.TFRecordDataset(path).batch(10_000).get_single_element(), spec)
  return {c: parsed[c].numpy() for c in columns}  # a tf.Example's features have no order


@pytest.mark.parametrize("fmt", ["csv", "tfrecord", "parquet"])
def test_predict_reads_and_writes_ram(exports, ads_dir, ram_data, ram_root, tmp_path, fmt):
  local_out = str(tmp_path / f"scores.{fmt}")
  ram_out = files.join(ram_root, "scores", fmt, f"scores.{fmt}")
  local = predict.score(exports["local"][1][1], os.path.join(ads_dir, "eval-*"), local_out,
                        batch_size=300)
  ram = predict.score(exports["ram"][1][1], files.join(ram_data, "eval-*"), ram_out,
                      batch_size=300)
  assert ram["examples"] == local["examples"] == 1000
  assert tf.io.gfile.listdir(files.join(ram_root, "scores", fmt)) == [f"scores.{fmt}"]
  expected = _read_scores(local_out, fmt)
  got = _read_scores(ram_out, fmt)
  assert list(got) == list(expected) == ["index", "request_id", "ctr", "cvr"]
  for column, values in expected.items():
    np.testing.assert_array_equal(got[column], values)


def test_fusion_search_reads_and_writes_ram(exports, ads_dir, ram_data, ram_root, tmp_path):
  candidates = fusion_search.grid_candidates(3, [0.0, 0.5, 1.0])
  results = {}
  for where, export_path, pattern, output in (
      ("local", exports["local"][1][1], os.path.join(ads_dir, "eval-*"),
       str(tmp_path / "search.csv")),
      ("ram", exports["ram"][1][1], files.join(ram_data, "eval-*"),
       files.join(ram_root, "search", "search.csv"))):
    # The schema is found beside the shards, on ram:// too.
    outputs, columns, schema = fusion_search.load_eval(export_path, pattern)
    rows = fusion_search.search(outputs, columns, schema, "product", ["ctr", "cvr", "price"],
                                candidates)
    fusion_search.write_csv(output, rows, list(rows[0]))
    with tf.io.gfile.GFile(output) as f:
      results[where] = list(csv.DictReader(f))
  assert tf.io.gfile.listdir(files.join(ram_root, "search")) == ["search.csv"]
  assert len(results["ram"]) == len(candidates) == 9
  assert results["ram"] == results["local"]


def test_export_failing_half_way_through_publishing_leaves_no_version(ads_schema, ram_root,
                                                                      monkeypatch):
  """Off a local disk a version is published file by file; a failure in between
  leaves neither a version without its model file nor the temporary copy."""
  base = files.join(ram_root, "failing", "m")
  model = mtl_zoo.build_shared_bottom(ads_schema)
  kept = serving.export_saved_model(model, ads_schema, base)
  rename, published = tf.io.gfile.rename, []

  def fail_on_the_second_published_file(source, target, overwrite=False):
    if target.split(base + "/", 1)[-1].split("/")[0].isdigit():  # into a version
      published.append(target)
      if len(published) == 2:
        raise tf.errors.UnavailableError(None, None, "connection reset")
    return rename(source, target, overwrite)

  monkeypatch.setattr(tf.io.gfile, "rename", fail_on_the_second_published_file)
  with pytest.raises(tf.errors.UnavailableError, match="connection reset"):
    serving.export_saved_model(model, ads_schema, base)
  monkeypatch.undo()
  assert len(published) == 2
  assert tf.io.gfile.listdir(base) == [kept.rsplit("/", 1)[1]]
  assert serving.existing_versions(base) == [int(kept.rsplit("/", 1)[1])]


def test_convert_train_with_backup_and_export_all_on_ram(ram_root):
  """The whole training path on ram://: the built-in source writes its shards
  there, training backs up, checkpoints, caches to a file and keeps its outputs
  there, and the export keeps one version there; the exported model scores
  the ram:// eval data as the trained model does."""
  from mtl_zoo import runner
  from mtl_zoo.config import RunConfig
  from pipelines.sources import SOURCES
  root = files.join(ram_root, "end_to_end")
  data = files.join(root, "data")
  SOURCES["synthetic"].write(data, num_shards=2, seed=3, synthetic_requests=100,
                             synthetic_eval_requests=40, synthetic_users=100,
                             synthetic_items=50)
  config = RunConfig(train_files=files.join(data, "train-*"),
                     eval_files=files.join(data, "eval-*"), model="shared_bottom",
                     model_dir=files.join(root, "run"), export_dir=files.join(root, "export"),
                     output_dir=files.join(root, "out"), keep=1, max_epochs=2, patience=0,
                     backup_every_steps=1, batch_size=64, cache="file", quiet=True)
  runner.run(config)
  result = runner.run(dataclasses.replace(config, model_dir=files.join(root, "run2")))
  assert result.summary["cache"] == "file"
  run_files = tf.io.gfile.listdir(config.model_dir)
  for name in ("model.keras", "metrics.json", "schema.json", "monitor.json"):
    assert name in run_files, run_files
  assert not any(name.startswith("backup") for name in run_files)  # removed when done
  versions = [v for v in tf.io.gfile.listdir(config.export_dir) if v.strip("/").isdigit()]
  assert len(versions) == 1  # keep=1 pruned the first run's version
  schema = result.schema
  columns = reader.read_columns(config.eval_files, schema)
  loaded = tf.saved_model.load(result.summary["export"]).signatures["serving_default"]
  served = loaded(examples=tf.constant(schema.serving_examples(columns)))
  direct = result.model(schema.parse_serving_examples(
      tf.constant(schema.serving_examples(columns))), training=False)
  np.testing.assert_allclose(served["ctr"].numpy(), direct["ctr"].numpy().ravel(), atol=1e-6)
