"""Latency of the exported MMoE (census-sized schema) through its tf.Example signature.

  python scripts/benchmark_serving.py [--census_dir=...] [--calls=300]

Exports an MMoE (8 experts of 16, towers of 8) for census Group 1, reloads the
SavedModel, and calls `serving_default` in-process with batches of 1, 32 and 256
real census test examples (serialized in the serving layout): p50 and p99 per
call. It also times `tf.io.parse_example` alone on the same batch of 256 (the
floor), alternating its calls with the signature's, and prints the signature's
share of that throughput. Weights are
untrained: latency does not depend on their values.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (pins Keras 2 first)
from mtl_zoo import export  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines.datasets import census  # noqa: E402

import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "census_group1"),
                    "TFRecords (written on first use).")
flags.DEFINE_integer("calls", 300, "Timed calls per batch size.")
flags.DEFINE_list("batch_sizes", ["1", "32", "256"], "Batch sizes.")


def timed(fn, calls: int) -> np.ndarray:
  for _ in range(20):
    fn()
  seconds = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return np.array(seconds)


def main(argv):
  del argv
  schema = census.write_if_missing(FLAGS.census_dir, FLAGS.data_dir)
  model = mtl_zoo.build_mmoe(schema, num_experts=8, expert_units=[16], tower_units=[8])
  path = export.export_saved_model(model, schema, tempfile.mkdtemp(prefix="mmoe-latency-"))
  serve = tf.saved_model.load(path).signatures["serving_default"]
  largest = max(int(b) for b in FLAGS.batch_sizes)
  examples = schema.serving_examples(reader.read_columns(
      os.path.join(FLAGS.data_dir, "test-*"), schema, limit=largest))
  print(f"MMoE census export, {len(schema.feature_names)} features, serving_default, "
        f"in-process, {FLAGS.calls} calls per batch size")
  rates = {}
  for batch in (int(b) for b in FLAGS.batch_sizes):
    tensor = tf.constant(examples[:batch])
    seconds = timed(lambda: serve(examples=tensor), FLAGS.calls)
    rates[batch] = batch / np.median(seconds)
    print(f"batch {batch:4d}: p50 {1000 * np.percentile(seconds, 50):.2f} ms, "
          f"p99 {1000 * np.percentile(seconds, 99):.2f} ms, "
          f"{rates[batch]:,.0f} examples/s at p50")
  # The ratio: signature and parse-only calls alternate, so both see the same
  # machine state (this CPU's speed drifts by +-20% between runs).
  tensor = tf.constant(examples[:largest])
  spec = schema.serving_parse_spec()
  parse = tf.function(lambda s: tf.io.parse_example(s, spec))
  for _ in range(20):
    parse(tensor)
  signature_seconds, parse_seconds = [], []
  for _ in range(FLAGS.calls):
    for fn, seconds in ((lambda: serve(examples=tensor), signature_seconds),
                        (lambda: parse(tensor), parse_seconds)):
      start = time.perf_counter()
      fn()
      seconds.append(time.perf_counter() - start)
  signature_rate = largest / np.median(signature_seconds)
  parse_rate = largest / np.median(parse_seconds)
  print(f"interleaved, batch {largest}: signature p50 "
        f"{1000 * np.median(signature_seconds):.2f} ms ({signature_rate:,.0f} examples/s), "
        f"tf.io.parse_example alone p50 {1000 * np.median(parse_seconds):.2f} ms "
        f"({parse_rate:,.0f} examples/s)")
  print(f"signature / parse-only throughput at batch {largest}: "
        f"{signature_rate / parse_rate:.0%} (target >= 80%)")


if __name__ == "__main__":
  app.run(main)
