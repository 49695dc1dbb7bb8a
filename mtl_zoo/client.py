"""Build TF Serving requests from raw feature dicts, using the export's schema.

Callers never hand-write tf.Examples:

  schema = Schema.load("<export>/<version>/assets.extra/schema.json")
  request = predict_request(schema, [{"user_id": 3, "price": 12.5}], "mmoe")  # gRPC
  body = rest_body(schema, [{"user_id": 3, "price": 12.5}])   # POST .../models/mmoe:predict

Records hold feature values by name (ids for categorical features, lists of ids
for list features, numbers for numerics); features left out get the schema's
neutral defaults, and names the schema does not know are an error.
"""

import base64
from typing import Iterable, List, Optional

import tensorflow as tf

from pipelines import schema as schema_lib

EXAMPLES_INPUT = "examples"


def serialize(schema: schema_lib.Schema, records: Iterable[dict]) -> List[bytes]:
  return [schema.serving_example(r) for r in records]


def with_fusion_weights(example: bytes, weights) -> bytes:
  """A serialized tf.Example plus per-request fusion weights (one per fusion term,
  in the export's order), which the `rank` signature uses instead of its
  configured ones."""
  from mtl_zoo.serving import FUSION_WEIGHTS_FEATURE  # lazily: it imports Keras
  proto = tf.train.Example.FromString(example)
  proto.features.feature[FUSION_WEIGHTS_FEATURE].float_list.value[:] = [float(w) for w in weights]
  return proto.SerializeToString()


def predict_request(schema: schema_lib.Schema, records: Iterable[dict], model_name: str,
                    signature_name: str = "serving_default",
                    version: Optional[int] = None):
  """A gRPC `PredictRequest` for the export's tf.Example signature."""
  from tensorflow_serving.apis import predict_pb2
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  if version is not None:
    request.model_spec.version.value = int(version)
  request.inputs[EXAMPLES_INPUT].CopyFrom(
      tf.make_tensor_proto(serialize(schema, records), dtype=tf.string))
  return request


def rest_body(schema: schema_lib.Schema, records: Iterable[dict],
              signature_name: str = "serving_default") -> dict:
  """The JSON body of a REST predict call: one instance per record, each the
  serialized tf.Example in TF Serving's {"b64": ...} form for binary strings."""
  return {"signature_name": signature_name,
          "instances": [{"b64": base64.b64encode(e).decode("ascii")}
                        for e in serialize(schema, records)]}
