import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from conftest import REPO
from mtl_zoo import models, serving
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import shards
from tensorflow.core.protobuf import saved_model_pb2

RELOAD = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
examples = tf.constant(np.load(sys.argv[2], allow_pickle=True).tolist())
out = loaded.signatures["serving_default"](examples=examples)
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


@pytest.fixture(scope="module")
def exported(ads_dir, ads_schema, tmp_path_factory):
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(ads_schema)
  mtl_zoo.compile_model(model, ads_schema)
  model.fit(reader.make_dataset(os.path.join(ads_dir, "train-*"), ads_schema, 256),
            epochs=1, verbose=0)
  base = str(tmp_path_factory.mktemp("export") / "mmoe")
  return model, base, serving.export_saved_model(model, ads_schema, base)


def _serving_records(ads_dir, schema, n=200):
  cols = reader.read_columns(os.path.join(ads_dir, "eval-*"), schema)
  records = []
  for i in range(n):
    record = {}
    for f in schema.features:
      value = cols[f.name][i]
      record[f.name] = [v for v in value if v >= 0] if f.kind == "categorical_list" else value
    records.append(record)
  records[0].pop("price")  # missing optional features
  records[1]["item_tags"] = []
  records[2]["item_id"] = 10**6  # out of vocabulary
  records[3]["item_tags"] = [1, 2, 3, 4, 5, 6]  # longer than max_len
  return records


def test_reloaded_savedmodel_matches_keras_in_a_fresh_process(exported, ads_dir, ads_schema,
                                                              tmp_path):
  model, _, path = exported
  records = _serving_records(ads_dir, ads_schema)
  serialized = [ads_schema.serving_example(r) for r in records]
  np.save(tmp_path / "examples.npy", np.array(serialized, dtype=object))
  result = subprocess.run([sys.executable, "-c", RELOAD, path, str(tmp_path / "examples.npy")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 0, result.stderr
  served = json.loads(result.stdout.strip().splitlines()[-1])
  keras_out = model(ads_schema.parse_serving_examples(tf.constant(serialized)))
  assert sorted(served) == ["ctr", "cvr"]
  for task in ("ctr", "cvr"):
    assert len(served[task]) == len(records)
    np.testing.assert_allclose(served[task], keras_out[task].numpy()[:, 0], atol=1e-5)


def test_features_signature_matches_serving_default(exported, ads_dir, ads_schema):
  _, _, path = exported
  loaded = tf.saved_model.load(path)
  serialized = tf.constant([ads_schema.serving_example(r)
                            for r in _serving_records(ads_dir, ads_schema, 50)])
  by_example = loaded.signatures["serving_default"](examples=serialized)
  by_feature = loaded.signatures["features"](**ads_schema.parse_serving_examples(serialized))
  for task in ("ctr", "cvr"):
    np.testing.assert_allclose(by_example[task], by_feature[task], atol=1e-6)
  assert schema_lib.Schema.load(os.path.join(path, serving.SCHEMA_ASSET)) == ads_schema


def test_saved_model_cli_lists_both_signatures_without_labels(exported, ads_schema):
  _, _, path = exported
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  result = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  text = result.stdout
  for signature in ("serving_default", "features"):
    assert f"signature_def['{signature}']" in text
  assert "inputs['examples'] tensor_info" in text
  assert "outputs['ctr'] tensor_info" in text and "outputs['cvr'] tensor_info" in text
  for label in ads_schema.labels:
    assert f"inputs['{label}']" not in text
  for feature in ads_schema.feature_names:
    # position is train-only: the log has it, a server does not
    assert (f"inputs['{feature}']" in text) == (feature != "position")


def test_versions_increase_and_failed_export_leaves_nothing(exported, ads_schema,
                                                            monkeypatch):
  model, base, first = exported
  second = serving.export_saved_model(model, ads_schema, base)
  assert int(os.path.basename(second)) > int(os.path.basename(first))

  def crash(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(tf.saved_model, "save", crash)
  with pytest.raises(RuntimeError, match="disk full"):
    serving.export_saved_model(model, ads_schema, base)
  assert sorted(os.listdir(base)) == sorted([os.path.basename(first),
                                             os.path.basename(second)])
  assert serving.existing_versions(base) == [int(os.path.basename(first)),
                                            int(os.path.basename(second))]
  with pytest.raises(FileExistsError, match="never overwritten"):
    serving.export_saved_model(model, ads_schema, base, version=os.path.basename(first))


@pytest.mark.keras3
@pytest.mark.parametrize("name", sorted(mtl_zoo.MODELS))
def test_every_architecture_round_trips_through_the_example_signature(
    name, ads_dir, ads_schema, tmp_path):
  schema = mtl_zoo.training_schema(name, ads_schema)
  model = mtl_zoo.build(name, schema)
  path = serving.export_saved_model(model, schema, str(tmp_path / name))
  serialized = tf.constant([schema.serving_example(r)
                            for r in _serving_records(ads_dir, schema, 64)])
  loaded = tf.saved_model.load(path)
  served = loaded.signatures["serving_default"](examples=serialized)
  expected = models.serving_model(model)(schema.parse_serving_examples(serialized))
  assert sorted(served) == sorted(schema.task_names)
  # Saved: the signatures and the variables they read; not the Keras model,
  # whose per-layer functions no server runs.
  assert len(loaded.model_variables) == len(models.serving_model(model).variables)
  assert not hasattr(loaded, "model")
  for task in schema.task_names:
    np.testing.assert_allclose(served[task], expected[task][:, 0], atol=1e-5)


def test_classify_and_regress_have_tf_serving_method_names(exported):
  _, _, path = exported
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
  signatures = proto.meta_graphs[0].signature_def
  assert signatures["classify"].method_name == "tensorflow/serving/classify"
  assert signatures["regress"].method_name == "tensorflow/serving/regress"
  assert signatures["serving_default"].method_name == "tensorflow/serving/predict"
  assert sorted(signatures["classify"].inputs) == ["inputs"]
  assert sorted(signatures["classify"].outputs) == ["classes", "scores"]
  assert sorted(signatures["regress"].outputs) == ["outputs"]


def test_classify_and_regress_serve_the_first_task(exported, ads_dir, ads_schema):
  _, _, path = exported
  loaded = tf.saved_model.load(path)
  serialized = tf.constant(ads_schema.serving_examples(
      reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=20)))
  p = loaded.signatures["serving_default"](examples=serialized)["ctr"].numpy()
  classified = loaded.signatures["classify"](inputs=serialized)
  np.testing.assert_allclose(classified["scores"].numpy(), np.stack([1 - p, p], 1), atol=1e-6)
  assert classified["classes"].numpy()[0].tolist() == [b"0", b"1"]
  np.testing.assert_allclose(loaded.signatures["regress"](inputs=serialized)["outputs"], p,
                             atol=1e-6)


def test_warmup_requests_replay_against_the_saved_model(ads_dir, ads_schema, tmp_path):
  from tensorflow_serving.apis import prediction_log_pb2
  model = mtl_zoo.build_mmoe(ads_schema)
  examples = ads_schema.serving_examples(
      reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=16))
  path = serving.export_saved_model(model, ads_schema, str(tmp_path / "ads_mmoe"),
                                   warmup_examples=examples)
  loaded = tf.saved_model.load(path)
  sizes = []
  for record in tf.data.TFRecordDataset(os.path.join(path, serving.WARMUP_ASSET)):
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    request = log.predict_log.request
    assert request.model_spec.name == "ads_mmoe"
    signature = loaded.signatures[request.model_spec.signature_name]
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    sizes.append(len(outputs["ctr"]))
  assert sizes == [16, 1]


def test_keep_prunes_the_oldest_versions(ads_schema, tmp_path):
  model = mtl_zoo.build_shared_bottom(ads_schema)
  base = str(tmp_path / "m")
  paths = [serving.export_saved_model(model, ads_schema, base, version=v, keep=2)
           for v in (10, 11, 12)]
  assert serving.existing_versions(base) == [11, 12]
  assert sorted(os.listdir(base)) == ["11", "12"]  # nothing half-deleted left behind
  assert all(os.path.exists(p) for p in paths[1:])


def test_saved_model_cli_runs_the_example_signature(exported):
  _, _, path = exported
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  example = '[{"user_id": [3], "item_id": [7], "price": [12.5], "item_tags": [1, 2]}]'
  result = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve",
                           "--signature_def", "serving_default",
                           "--input_examples", f"examples={example}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Result for output key ctr" in result.stdout
  assert "Result for output key cvr" in result.stdout


def test_predict_scores_files_in_both_layouts(exported, ads_dir, ads_schema, tmp_path):
  import csv
  from mtl_zoo import predict
  model, _, path = exported
  out = str(tmp_path / "scores.csv")
  stats = predict.score(path, os.path.join(ads_dir, "eval-*"), out, batch_size=300)
  rows = list(csv.DictReader(open(out)))
  assert stats["examples"] == len(rows) == 1000 and stats["examples_per_second"] > 0
  assert list(rows[0]) == ["index", "request_id", "ctr", "cvr"]
  cols = reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema)
  expected = model(ads_schema.split_packed(
      tf.io.parse_example(tf.data.TFRecordDataset(shards.list_files(
          os.path.join(ads_dir, "eval-*"))).batch(1000).get_single_element(),
          ads_schema.training_parse_spec()))[0])
  np.testing.assert_allclose([float(r["ctr"]) for r in rows], expected["ctr"][:, 0], rtol=1e-4)
  assert [int(r["request_id"]) for r in rows] == cols["request_id"].tolist()
  serving_file = str(tmp_path / "serving.tfrecord")
  with tf.io.TFRecordWriter(serving_file) as w:
    for example in ads_schema.serving_examples(cols):
      w.write(example)
  out2 = str(tmp_path / "scores2.csv")
  predict.score(path, serving_file, out2, layout="serving", batch_size=256)
  rows2 = list(csv.DictReader(open(out2)))
  assert list(rows2[0]) == ["index", "ctr", "cvr"]
  np.testing.assert_allclose([float(r["cvr"]) for r in rows2], [float(r["cvr"]) for r in rows],
                             rtol=1e-4)


def test_predict_writes_tfrecord_and_parquet_like_csv(exported, ads_dir, tmp_path):
  import csv
  import pyarrow.parquet
  from mtl_zoo import predict
  _, _, path = exported
  pattern = os.path.join(ads_dir, "eval-*")
  outputs = {fmt: str(tmp_path / f"scores.{fmt}") for fmt in ("csv", "tfrecord", "parquet")}
  for out in outputs.values():
    predict.score(path, pattern, out, batch_size=300)
  rows = list(csv.DictReader(open(outputs["csv"])))
  table = pyarrow.parquet.read_table(outputs["parquet"])
  assert table.column_names == ["index", "request_id", "ctr", "cvr"]
  assert str(table.schema.field("ctr").type) == "float" and table.num_rows == 1000
  spec = {"index": tf.io.FixedLenFeature([], tf.int64),
          "request_id": tf.io.FixedLenFeature([], tf.int64),
          "ctr": tf.io.FixedLenFeature([], tf.float32),
          "cvr": tf.io.FixedLenFeature([], tf.float32)}
  records = tf.io.parse_example(
      tf.data.TFRecordDataset(outputs["tfrecord"]).batch(2000).get_single_element(), spec)
  for column in ("index", "request_id"):
    expected = [int(r[column]) for r in rows]
    assert table.column(column).to_pylist() == expected
    assert records[column].numpy().tolist() == expected
  np.testing.assert_allclose(table.column("ctr").to_numpy(), records["ctr"].numpy())
  np.testing.assert_allclose(records["cvr"], [float(r["cvr"]) for r in rows], rtol=1e-5)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  with pytest.raises(ValueError, match="name it .csv, .tfrecord or .parquet"):
    predict.score(path, pattern, str(tmp_path / "scores.txt"))
  assert not os.path.exists(tmp_path / "scores.txt")
  nested = tmp_path / "new" / "dir" / "scores.parquet"
  assert predict.score(path, pattern, str(nested))["examples"] == 1000  # directory made
  for fmt in outputs:  # a directory where the file must go
    os.makedirs(tmp_path / f"blocked.{fmt}")
    with pytest.raises(predict.OutputError, match=f"cannot write --output=.*blocked.{fmt}"):
      predict.score(path, pattern, str(tmp_path / f"blocked.{fmt}"))


def test_serving_config_lists_every_exported_model(ads_schema, tmp_path):
  for name in ("ctr_model", "cvr_model"):
    serving.export_saved_model(mtl_zoo.build_shared_bottom(ads_schema), ads_schema,
                              str(tmp_path / name))
    config_path, batching_path = serving.write_serving_configs(str(tmp_path / name))
  from google.protobuf import text_format
  from tensorflow_serving.config import model_server_config_pb2
  config = open(config_path).read()
  parsed = text_format.Parse(config, model_server_config_pb2.ModelServerConfig())
  assert [c.name for c in parsed.model_config_list.config] == ["ctr_model", "cvr_model"]
  assert parsed.model_config_list.config[0].model_version_policy.latest.num_versions == 1
  assert 'base_path: "/models/ctr_model"' in config
  assert 'base_path: "/models/cvr_model"' in config
  assert "max_batch_size { value: 256 }" in open(batching_path).read()


def test_rank_signature_fuses_scores_and_takes_per_request_weights(ads_dir, ads_schema,
                                                                   tmp_path):
  from mtl_zoo import client, layers
  model = mtl_zoo.build_mmoe(ads_schema)
  fusion = layers.parse_fusion("product:ctr=1,cvr=0.5,price=1")
  path = serving.export_saved_model(model, ads_schema, str(tmp_path / "e"), fusion=fusion)
  loaded = tf.saved_model.load(path)
  records = _serving_records(ads_dir, ads_schema, 20)  # record 0 has no price
  examples = client.serialize(ads_schema, records)
  ranked = loaded.signatures["rank"](examples=tf.constant(examples))
  plain = loaded.signatures["serving_default"](examples=tf.constant(examples))
  missing_price = ads_schema.missing_numeric_value(ads_schema.feature("price"))
  price = np.array([r.get("price", missing_price) for r in records])
  ctr, cvr = plain["ctr"].numpy(), plain["cvr"].numpy()
  np.testing.assert_allclose(ranked["ctr"], ctr, atol=1e-6)
  np.testing.assert_allclose(ranked["score"], ctr * cvr ** 0.5 * price, rtol=1e-4)
  overridden = [client.with_fusion_weights(e, [0.0, 1.0, 0.0]) for e in examples]
  reranked = loaded.signatures["rank"](examples=tf.constant(overridden))
  np.testing.assert_allclose(reranked["score"], cvr, rtol=1e-5)
  np.testing.assert_allclose(reranked["ctr"], ctr, atol=1e-6)  # task scores unchanged
  np.testing.assert_allclose(reranked["cvr"], cvr, atol=1e-6)
  # A client's NaN or infinite weight counts as missing; a huge one saturates.
  hostile = [client.with_fusion_weights(e, w) for e, w in zip(
      examples[:3], [[float("nan"), 0.5, 1.0], [1.0, float("inf"), 1.0], [1.0, 1.0, 1e30]])]
  hostile_scores = loaded.signatures["rank"](examples=tf.constant(hostile))["score"].numpy()
  assert np.all(np.isfinite(hostile_scores))
  np.testing.assert_allclose(hostile_scores[:2], ranked["score"][:2], rtol=1e-5)
  with pytest.raises(ValueError, match="neither tasks"):
    serving.export_saved_model(model, ads_schema, str(tmp_path / "bad"),
                              fusion=layers.parse_fusion("sum:ctr=1,dwell=2"))


def test_offline_ranking_score_equals_the_served_rank_score(ads_dir, ads_schema, tmp_path):
  """fusion_search and the ranking report score through `strategies.ranking_score`;
  with a missing, NaN or infinite price it gives what the rank signature serves."""
  from mtl_zoo import fusion_search, layers, metrics, strategies
  mtl_zoo.keras.utils.set_random_seed(0)
  fusion = layers.parse_fusion("product:ctr=1,cvr=0.5,price=1")
  path = serving.export_saved_model(mtl_zoo.build_mmoe(ads_schema), ads_schema,
                                    str(tmp_path / "e"), fusion=fusion)
  loaded = tf.saved_model.load(path)
  columns = reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=40)
  # A blank CSV price is NaN in the records; serving callers leave it out.
  columns["price"][:4] = [np.nan, np.nan, np.inf, -np.inf]
  examples = ads_schema.serving_examples(columns)
  examples[0] = ads_schema.serving_example(
      {f.name: columns[f.name][0] for f in ads_schema.features if f.name != "price"}
      | {"item_tags": [t for t in columns["item_tags"][0] if t >= 0]})
  served = loaded.signatures["rank"](examples=tf.constant(examples))["score"].numpy()
  outputs = metrics.predict_columns(loaded.signatures["features"], ads_schema, columns)
  offline = strategies.ranking_score(outputs, columns, fusion, ads_schema)
  assert np.isfinite(offline).all()
  np.testing.assert_allclose(offline, served, rtol=1e-6, atol=1e-6)
  (row,) = fusion_search.search(outputs, columns, ads_schema, "product", fusion["terms"],
                                [fusion["weights"]])
  assert row["ctr_auc"] == metrics.auc(columns["click"], offline)


def test_combined_export_serves_several_models_as_one(ads_dir, ads_schema, tmp_path):
  from mtl_zoo import layers
  mtl_zoo.keras.utils.set_random_seed(0)
  ctr_model = mtl_zoo.build_single_task(ads_schema.with_tasks(["ctr"]), name="ctr_model")
  cvr_model = mtl_zoo.build_shared_bottom(ads_schema.with_tasks(["cvr"]), name="cvr_model")
  combined = models.combine_models([ctr_model, cvr_model], ads_schema)
  path = serving.export_saved_model(combined, ads_schema, str(tmp_path / "fused"),
                                   fusion=layers.parse_fusion("product:ctr=1,cvr=1"))
  serialized = tf.constant([ads_schema.serving_example(r)
                            for r in _serving_records(ads_dir, ads_schema, 30)])
  features = ads_schema.parse_serving_examples(serialized)
  ranked = tf.saved_model.load(path).signatures["rank"](examples=serialized)
  ctr, cvr = ctr_model(features)["ctr"][:, 0], cvr_model(features)["cvr"][:, 0]
  np.testing.assert_allclose(ranked["ctr"], ctr, atol=1e-6)
  np.testing.assert_allclose(ranked["cvr"], cvr, atol=1e-6)
  np.testing.assert_allclose(ranked["score"], ctr * cvr, rtol=1e-5)
  with pytest.raises(ValueError, match="distinct task names"):
    models.combine_models([ctr_model, ctr_model], ads_schema)


def test_export_cli_combines_separately_trained_runs(ads_dir, ads_schema, tmp_path):
  """Two single-objective runs, both named "single_task" as the CLI names them,
  export as one model whose rank signature fuses them."""
  mtl_zoo.keras.utils.set_random_seed(0)
  runs = []
  for task in ("ctr", "cvr"):
    schema = ads_schema.with_tasks([task])
    model = mtl_zoo.build_single_task(schema, bottom_units=[8])
    run_dir = tmp_path / task
    run_dir.mkdir()
    model.save(str(run_dir / "model.keras"))
    schema.save(str(run_dir / "schema.json"))
    runs.append(model)
  result = subprocess.run(
      [sys.executable, "-m", "mtl_zoo.export", f"--model_dir={tmp_path}/ctr,{tmp_path}/cvr",
       f"--export_base={tmp_path}/serving", "--model_name=fused",
       "--fusion=product:ctr=1,cvr=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (version,) = os.listdir(tmp_path / "serving" / "fused")
  rank = tf.saved_model.load(str(tmp_path / "serving" / "fused" / version)).signatures["rank"]
  serialized = tf.constant([ads_schema.serving_example(r)
                            for r in _serving_records(ads_dir, ads_schema, 20)])
  features = ads_schema.parse_serving_examples(serialized)
  ranked = rank(examples=serialized)
  ctr, cvr = runs[0](features)["ctr"][:, 0], runs[1](features)["cvr"][:, 0]
  np.testing.assert_allclose(ranked["ctr"], ctr, atol=1e-6)
  np.testing.assert_allclose(ranked["score"], ctr * cvr ** 2, rtol=1e-5)


def test_batching_parameters_leave_threads_to_the_server_unless_given(ads_schema, tmp_path):
  """The training machine's core count must not reach the server's config: by
  default TF Serving picks one batch thread per core of the machine it runs on."""
  base = str(tmp_path / "m")
  serving.export_saved_model(mtl_zoo.build_shared_bottom(ads_schema), ads_schema, base)
  _, batching_path = serving.write_serving_configs(base)
  default = open(batching_path).read()
  assert "num_batch_threads" not in default
  assert "max_batch_size { value: 256 }" in default
  _, batching_path = serving.write_serving_configs(base, num_batch_threads=3)
  assert "num_batch_threads { value: 3 }\n" in open(batching_path).read()
  with pytest.raises(ValueError, match="num_batch_threads must be >= 1"):
    serving.write_serving_configs(base, num_batch_threads=0)
  assert sorted(os.listdir(tmp_path)) == ["batching_parameters.txt", "m", "models.config"]


def test_a_signature_is_one_function_and_one_table_row(ads_dir, ads_schema, tmp_path,
                                                       monkeypatch):
  """A row added to SIGNATURES is exported with its method name, as the built-in
  ones are."""

  def cvr_regress(module):
    def serve(inputs):
      return {"outputs": module.serve_examples(inputs)["cvr"]}
    return tf.function(serve, input_signature=[serving.INPUTS_SPEC])

  monkeypatch.setitem(serving.SIGNATURES, "cvr_regress",
                      serving.Signature(cvr_regress, serving.REGRESS_METHOD))
  path = serving.export_saved_model(mtl_zoo.build_mmoe(ads_schema), ads_schema,
                                    str(tmp_path / "e"))
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
  assert proto.meta_graphs[0].signature_def["cvr_regress"].method_name == \
      "tensorflow/serving/regress"
  loaded = tf.saved_model.load(path)
  serialized = tf.constant(ads_schema.serving_examples(
      reader.read_columns(os.path.join(ads_dir, "eval-*"), ads_schema, limit=10)))
  np.testing.assert_allclose(loaded.signatures["cvr_regress"](inputs=serialized)["outputs"],
                             loaded.signatures["serving_default"](examples=serialized)["cvr"],
                             atol=1e-6)
  assert "rank" not in loaded.signatures  # a builder that does not apply adds nothing
