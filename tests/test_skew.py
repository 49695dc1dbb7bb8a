"""No training/serving skew: the training pipeline + Keras model, serialized
tf.Examples through the reloaded SavedModel (fresh process), and the REST body
the client helper builds, decoded as TF Serving decodes it, must all agree."""

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mtl_zoo
from conftest import mixed_schema
from mtl_zoo import client, serving
from pipelines import reader
from pipelines import writer as writer_lib

SERVE = """
import base64, json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
body = json.load(open(sys.argv[2]))
# TF Serving's REST decoding for a single-input signature in "instances" form:
# each instance is that input's value; {"b64": s} is the base64 of a binary string.
examples = tf.constant([base64.b64decode(i["b64"]) for i in body["instances"]])
out = loaded.signatures[body["signature_name"]](examples=examples)
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


def _records():
  """Every feature kind, with the awkward cases serving meets."""
  schema = mixed_schema()
  records = [
      {"user": 1, "raw_id": 123456789, "slot": 2, "tags": [0, 5], "price": 9.5, "age": 41.0},
      {"user": 4, "raw_id": -7, "slot": 0, "tags": [3], "price": 0.0, "age": 18.0},
      {"user": 99, "raw_id": 5, "slot": 17, "tags": [1, 2], "price": 3.0, "age": 30.0},  # OOV ids
      {"user": 2, "raw_id": 1, "slot": 1, "tags": [0, 1, 2, 3, 4], "price": 1.0, "age": 25.0},
      {"user": 0, "tags": [9, -3], "age": 60.0},  # missing raw_id, slot, price; OOV tags
      {"raw_id": 42},                             # almost everything missing
      {"user": 3, "raw_id": 8, "slot": 3, "tags": [], "price": 100.0, "age": 99.0},
  ]
  return schema, records


@pytest.mark.keras3
def test_training_pipeline_savedmodel_and_rest_agree(tmp_path):
  schema, records = _records()
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(schema, num_experts=3, expert_units=[4], tower_units=[3])
  path = serving.export_saved_model(model, schema, str(tmp_path / "export"))

  # (a) training layout -> reader -> Keras model
  # Missing values stay None: the writer must default them as the serving parse does.
  columns = {name: [r.get(name) for r in records] for name in schema.feature_names}
  columns.update(click=[1.0] * len(records), conversion=[0.0] * len(records))
  with writer_lib.DatasetWriter(str(tmp_path / "data"), schema) as w:
    w.write_split("train", columns)
  ds = reader.make_dataset(str(tmp_path / "data" / "train-*"), schema, 64, shuffle=False)
  features = next(iter(ds))[0]
  via_training = {t: v.numpy()[:, 0] for t, v in model(features).items()}

  # (b) serialized tf.Examples -> reloaded SavedModel in a fresh process,
  # (c) the client's REST body, decoded the way TF Serving decodes it.
  body = client.rest_body(schema, records)
  body_path = tmp_path / "body.json"
  body_path.write_text(json.dumps(body))
  result = subprocess.run([sys.executable, "-c", SERVE, path, str(body_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 0, result.stderr[-2000:]
  via_rest = json.loads(result.stdout.strip().splitlines()[-1])
  serialized = tf.constant(client.serialize(schema, records))
  via_examples = tf.saved_model.load(path).signatures["serving_default"](examples=serialized)

  for task in schema.task_names:
    np.testing.assert_allclose(via_examples[task].numpy(), via_training[task], atol=1e-5)
    np.testing.assert_allclose(via_rest[task], via_training[task], atol=1e-5)


def test_grpc_request_carries_the_serialized_examples():
  schema, records = _records()
  request = client.predict_request(schema, records[:3], "ranker", version=7)
  assert request.model_spec.name == "ranker" and request.model_spec.version.value == 7
  sent = tf.make_ndarray(request.inputs["examples"]).tolist()
  assert sent == client.serialize(schema, records[:3])
  body = client.rest_body(schema, records[:1])
  assert base64.b64decode(body["instances"][0]["b64"]) == sent[0]
