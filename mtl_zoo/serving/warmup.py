"""TF Serving warm-up requests: PredictionLog records the server replays against a
version when it loads it, so the first real request does not pay the tracing
and memory allocation of a cold model."""

from typing import Sequence

import tensorflow as tf

from mtl_zoo.serving import signatures
from pipelines import files

# Where TF Serving looks for them inside a version directory.
WARMUP_ASSET = files.join("assets.extra", "tf_serving_warmup_requests")


def write_warmup_requests(path: str, examples: Sequence[bytes], model_name: str) -> int:
  """Writes one request of every example and one of a single example (both batch
  shapes the server meets) against `serving_default`.

  Args:
    path: the file to write (any filesystem; written atomically).
    examples: serialized serving-layout tf.Examples.
    model_name: the serving name the requests address.

  Returns:
    The number of requests written.
  """
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
  batches = [list(examples), list(examples[:1])] if len(examples) > 1 else [list(examples)]
  with files.atomic_path(path) as tmp:
    with tf.io.TFRecordWriter(tmp) as writer:
      for batch in batches:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signatures.SERVING_DEFAULT
        request.inputs[signatures.EXAMPLES_INPUT].CopyFrom(
            tf.make_tensor_proto(batch, dtype=tf.string))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())
  return len(batches)
