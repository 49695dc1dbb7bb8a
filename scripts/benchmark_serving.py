"""Latency of the exported MMoE (census-sized schema) through its tf.Example signature.

  python scripts/benchmark_serving.py [--census_dir=...] [--calls=300]

Exports an MMoE (8 experts of 16, towers of 8) for census Group 1, reloads the
SavedModel, and calls `serving_default` in-process with batches of 1, 32 and 256
real census test examples (serialized in the serving layout): p50 and p99 per
call. It also times `tf.io.parse_example` alone on the same batch of 256 (the
floor), alternating its calls with the signature's, and prints the signature's
share of that throughput: called in-process from Python; as graph execution
alone (tf.compat.v1 Session on the SavedModel, as TF Serving runs it), where
the ~250 us per-call Python overhead both pay no longer hides the model's cost;
and graph only with 2 and 4 concurrent callers (a server under load). The parse
alone hands back one of its 38 outputs, as the signature hands back its 2:
handing back all 38 costs ~55 us a call, which would be counted against the
parse (the op parses every feature whichever outputs are read). Last, graph
only, where the model's time goes: the parse followed by the model's first
layers only (each reduced to one value per example), against the parse alone.
Weights are untrained: latency does not depend on their values.
"""

import os
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (pins Keras 2 first)
from mtl_zoo import serving  # noqa: E402
from mtl_zoo._keras import keras  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "census_group1"),
                    "TFRecords (written on first use).")
flags.DEFINE_integer("calls", 300, "Timed calls per batch size.")
flags.DEFINE_integer("ratio_rounds", 1000, "Rounds of signature, parse, parse, signature "
                     "calls for the throughput ratio.")
flags.DEFINE_list("batch_sizes", ["1", "32", "256"], "Batch sizes.")
flags.DEFINE_list("callers", ["2", "4"], "Concurrent callers for the graph-only "
                  "throughput under load.")
flags.DEFINE_float("load_seconds", 2.0, "Seconds per throughput-under-load measurement.")


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
  schema = SOURCES["census"].write_if_missing(FLAGS.data_dir, census_dir=FLAGS.census_dir)
  model = mtl_zoo.build_mmoe(schema, num_experts=8, expert_units=[16], tower_units=[8])
  path = serving.export_saved_model(model, schema, tempfile.mkdtemp(prefix="mmoe-latency-"))
  serve = tf.saved_model.load(path).signatures["serving_default"]
  largest = max(int(b) for b in FLAGS.batch_sizes)
  examples = schema.serving_examples(reader.read_columns(
      os.path.join(FLAGS.data_dir, "test-*"), schema, limit=largest))
  print(f"MMoE census export, {len(schema.feature_names)} features, serving_default, "
        f"in-process, {FLAGS.calls} calls per batch size")
  for batch in (int(b) for b in FLAGS.batch_sizes):
    tensor = tf.constant(examples[:batch])
    seconds = timed(lambda: serve(examples=tensor), FLAGS.calls)
    print(f"batch {batch:4d}: p50 {1000 * np.percentile(seconds, 50):.2f} ms, "
          f"p99 {1000 * np.percentile(seconds, 99):.2f} ms, "
          f"{batch / np.median(seconds):,.0f} examples/s at p50")
  tensor = tf.constant(examples[:largest])
  spec = schema.serving_parse_spec()
  parse = tf.function(lambda s: one_output(tf.io.parse_example(s, spec)))
  report(f"in-process, batch {largest}",
         *alternate(lambda: serve(examples=tensor), lambda: parse(tensor)), largest)
  signature, parse_call = session_calls(path, examples[:largest], spec)
  report(f"graph only (Session::Run, as TF Serving runs it), batch {largest}",
         *alternate(signature, parse_call), largest)
  for callers in (int(c) for c in FLAGS.callers):
    done = {signature: 0, parse_call: 0}
    for call in (signature, parse_call, parse_call, signature):
      done[call] += under_load(call, callers)
    signature_rate, parse_rate = (largest * done[call] / (2 * FLAGS.load_seconds)
                                  for call in (signature, parse_call))
    print(f"graph only, {callers} concurrent callers, batch {largest}: signature "
          f"{signature_rate:,.0f} examples/s, parse alone {parse_rate:,.0f}; signature / "
          f"parse-only {signature_rate / parse_rate:.0%}")
  print(f"graph only, batch {largest}: the parse and the model up to a layer, its "
        "output summed per example, against the parse alone")
  for layer in ("feature_embedding", "experts"):
    part = keras.Model(model.input, model.get_layer(layer).output)
    part_call, parse_call = session_calls(export_part(part, schema), examples[:largest], spec)
    part_seconds, parse_seconds = alternate(part_call, parse_call)
    print(f"  up to {layer!r}: +{1e6 * (np.median(part_seconds) - np.median(parse_seconds)):.0f}"
          " us over the parse")


def under_load(call, callers: int) -> int:
  """Calls completed by `callers` threads calling `call` for --load_seconds
  (Session.run releases the GIL, so the calls run concurrently, as TF Serving
  runs concurrent requests)."""
  done = [0] * callers
  stop = time.perf_counter() + FLAGS.load_seconds

  def work(caller):
    while time.perf_counter() < stop:
      call()
      done[caller] += 1

  threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return sum(done)


def one_output(parsed: dict) -> tf.Tensor:
  """One of the parse's outputs: the signature hands back 2 tensors, and handing
  back all 38 would cost the parse ~55 us more per call than the parsing."""
  return next(iter(parsed.values()))


def export_part(part: keras.Model, schema) -> str:
  """SavedModel whose serving_default parses examples, runs `part` and sums its
  output per example."""
  module = tf.Module()
  module.part = part

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
  def serve(examples):
    out = part(schema.parse_serving_examples(examples), training=False)
    return {"sum": tf.reduce_sum(tf.reshape(out, [tf.shape(out)[0], -1]), axis=1)}

  path = tempfile.mkdtemp(prefix="mmoe-part-")
  tf.saved_model.save(module, path, signatures={"serving_default": serve})
  return path


def alternate(signature_call, parse_call):
  """Per-call seconds of both, their calls alternating (this CPU's speed drifts
  by +-20% between runs, so both must see the same machine state) in ABBA
  order (a call right after the other function's runs ~3% slower)."""
  for _ in range(20):
    signature_call()
    parse_call()
  signature_seconds, parse_seconds = [], []
  calls = ((signature_call, signature_seconds), (parse_call, parse_seconds))
  for _ in range(FLAGS.ratio_rounds):
    for fn, seconds in calls + calls[::-1]:
      start = time.perf_counter()
      fn()
      seconds.append(time.perf_counter() - start)
  return signature_seconds, parse_seconds


def session_calls(path: str, examples: list, spec: dict):
  """The signature and the parse alone, each one `Session.run` over a graph that
  reads the examples from a variable: no per-call Python conversion, and no
  constant for Grappler to fold the parse away."""
  saved = saved_model_pb2.SavedModel.FromString(
      tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb").read())
  placeholder = saved.meta_graphs[0].signature_def["serving_default"].inputs["examples"].name
  graph = tf.Graph()
  with graph.as_default():
    held = tf.compat.v1.Variable(examples, trainable=False, use_resource=True)
    session = tf.compat.v1.Session(graph=graph)
    signature = tf.compat.v1.saved_model.loader.load(
        session, ["serve"], path, input_map={placeholder: held.read_value()}
    ).signature_def["serving_default"]
    session.run(held.initializer)
    outputs = [graph.get_tensor_by_name(t.name) for t in signature.outputs.values()]
    parsed = one_output(tf.io.parse_example(held.read_value(), spec))
  return session.make_callable(outputs), session.make_callable(parsed)


def report(setting: str, signature_seconds, parse_seconds, batch: int) -> None:
  signature_rate = batch / np.median(signature_seconds)
  parse_rate = batch / np.median(parse_seconds)
  print(f"{setting}: signature p50 {1000 * np.median(signature_seconds):.2f} ms "
        f"({signature_rate:,.0f} examples/s), tf.io.parse_example alone p50 "
        f"{1000 * np.median(parse_seconds):.2f} ms ({parse_rate:,.0f} examples/s); "
        f"signature / parse-only throughput {signature_rate / parse_rate:.0%} "
        "(target >= 80%)")


if __name__ == "__main__":
  app.run(main)
