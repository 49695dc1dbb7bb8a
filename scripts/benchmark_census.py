"""Throughput of the input pipeline and of MMoE training on Census-Income, from
TFRecords, against DeepCTR's MMoE trained from memory.

  python scripts/benchmark_census.py [--census_dir=...] [--batch_sizes=2048,1024]
      [--deepctr_python=/tmp/deepctr-anchor/bin/python]

Prints, for the census Group 1 TFRecords (199,523 training examples):
  * what comes before `fit`: building the model, the counting pass
    (`reader.count_records`) and `reader.make_dataset`; each may run the framing
    scan (`integrity.scan_shards`, one read of every shard; timed and counted
    wherever it runs);
  * the reader alone: uncached passes of `make_dataset` with the train CLI's
    input settings (shuffle, block parse; the better of two passes), the time to
    its first batch, and a cached pass;
  * tracing alone: the time to the end of the first step of `fit` on one batch
    held in memory (no reading); with a later epoch's time it gives what epoch
    1 / later would be if epoch 1's read cost nothing;
  * MMoE (8 experts of 16 units, towers of 8) trained with Keras `fit` for 5
    epochs from the same TFRecords with the CLI's default input settings
    (repeated, steps per epoch from the count): the
    average over the 5 epochs (total examples / whole fit call, so tracing and
    the first, uncached epoch count), each epoch's own rate and the time to the
    first step's end;
  * DeepCTR's MMoE (same experts, towers, epochs and batch), fitted from numpy
    arrays in memory, run right after ours at each batch size when its venv
    exists (`../shared/anchors/make_deepctr_env.sh` builds it; never a
    dependency of this project); then a table of both.
With --isolate_first_epoch=N, only a diagnostic of epoch 1: N rounds of a
usual fit, one whose cache is filled before `fit` and one whose train step is
traced before `fit` (each moves one of epoch 1's costs out of it).
Epochs, reader passes and tracing also print their CPU seconds (all cores
together: where the time goes on a 2-core machine). The machine may be busy
with other work: compare runs, not single numbers.
"""

import math
import os
import re
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (chooses the Keras first)
import tensorflow as tf  # noqa: E402
from pipelines import integrity, reader  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = os.path.join(REPO, "..", "shared", "anchors")
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "census_group1"),
                    "TFRecords (written on first use).")
flags.DEFINE_list("batch_sizes", ["2048", "1024"], "Training batch sizes to measure; the "
                  "first is the CLI default.")
flags.DEFINE_integer("epochs", 5, "Training epochs per measurement.")
flags.DEFINE_string("deepctr_python", "/tmp/deepctr-anchor/bin/python",
                    "Python of the DeepCTR venv (built by make_deepctr_env.sh); when it "
                    "does not exist, DeepCTR is skipped.")
flags.DEFINE_string("deepctr_script", os.path.join(ANCHORS, "deepctr_census.py"),
                    "DeepCTR's census benchmark (prints train_examples_per_s=...).")
flags.DEFINE_integer("deepctr_timeout", 1800, "Seconds before a DeepCTR run is abandoned.")
flags.DEFINE_integer("isolate_first_epoch", 0, "N > 0: instead of the above, N rounds of "
                     "three fits at the first batch size that tell epoch 1's costs apart: as "
                     "usual; with the cache filled before fit (no read in epoch 1); with the "
                     "train step traced before fit (no tracing in epoch 1). Diagnostic only: "
                     "the last two move work out of fit.")

LEARNING_RATE = 2e-3
MMOE = dict(num_experts=8, expert_units=[16], tower_units=[8])


class ScanTimer:
  """Seconds spent in the framing scan, and shards scanned, wherever it runs."""

  def __init__(self, scan_shards):
    self.scan_shards, self.seconds, self.shards = scan_shards, 0.0, 0

  def __call__(self, files, *args, **kwargs):
    start = time.perf_counter()
    try:
      return self.scan_shards(files, *args, **kwargs)
    finally:
      self.seconds += time.perf_counter() - start
      self.shards += len(files)


class EpochTimer(mtl_zoo.keras.callbacks.Callback):
  """Times train begin, the first step's end, epoch 1's start, each epoch and
  train end."""

  def __init__(self):
    super().__init__()
    self.seconds, self.cpu_seconds = [], []
    self.first_step = None

  def on_train_begin(self, logs=None):
    self.train_begin = time.perf_counter()

  def on_epoch_begin(self, epoch, logs=None):
    self._start, self._cpu_start = time.perf_counter(), time.process_time()
    if epoch == 0:
      self.setup_seconds = self._start - self.train_begin

  def on_train_batch_end(self, batch, logs=None):
    if self.first_step is None:
      self.first_step = time.perf_counter() - self.train_begin

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)
    self.cpu_seconds.append(time.process_time() - self._cpu_start)

  def on_train_end(self, logs=None):
    self.train_end = time.perf_counter()


def timed(fn, *args, **kwargs):
  """(fn's result, seconds it took)."""
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def build_mmoe(schema):
  """A fresh, compiled census MMoE; returns (what to fit, seconds to build)."""
  mtl_zoo.keras.utils.set_random_seed(0)
  start = time.perf_counter()
  model = mtl_zoo.build("mmoe", schema, **MMOE)
  trainable = mtl_zoo.compile_model(model, schema, learning_rate=LEARNING_RATE)
  return trainable, time.perf_counter() - start


def deepctr_rate(batch):
  """DeepCTR's examples/s over its whole `fit` at `batch`, or None with why."""
  command = [FLAGS.deepctr_python, FLAGS.deepctr_script, FLAGS.census_dir, "mmoe",
             str(FLAGS.epochs), "0", str(batch), str(LEARNING_RATE)]
  env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=FLAGS.deepctr_timeout)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {FLAGS.deepctr_timeout}s"
  found = re.search(r"train_examples_per_s=(\d+)", done.stdout)
  if done.returncode or not found:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit {done.returncode}: {tail}"
  print(f"  {done.stdout.strip().splitlines()[-1]}", flush=True)
  return float(found.group(1)), None


def isolate_first_epoch(schema, pattern, rounds):
  """Prints epoch 1 / later epochs for fits that skip one of epoch 1's costs."""
  batch = int(FLAGS.batch_sizes[0])
  steps = math.ceil(reader.count_records(pattern) / batch)
  for round_ in range(rounds):
    for variant in ("as usual", "cache filled first", "traced first"):
      trainable, _ = build_mmoe(schema)
      ds = reader.make_dataset(pattern, schema, batch, seed=0)
      if variant == "cache filled first":
        for _ in ds:
          pass
      ds = ds.repeat()
      if variant == "traced first":
        trainable.make_train_function().get_concrete_function(iter(ds))
      timer = EpochTimer()
      trainable.fit(ds, epochs=FLAGS.epochs, steps_per_epoch=steps, verbose=0,
                    callbacks=[timer])
      later = sum(timer.seconds[1:]) / max(len(timer.seconds) - 1, 1)
      print(f"round {round_}, {variant:18s}: epoch 1 {timer.seconds[0]:.2f}s (first step "
            f"ends after {timer.first_step - timer.setup_seconds:.2f}s), later {later:.2f}s: "
            f"{timer.seconds[0] / later:.2f}x", flush=True)


def main(argv):
  del argv
  if FLAGS.isolate_first_epoch:
    schema = SOURCES["census"].write_if_missing(FLAGS.data_dir, census_dir=FLAGS.census_dir)
    isolate_first_epoch(schema, os.path.join(FLAGS.data_dir, "train-*"),
                        FLAGS.isolate_first_epoch)
    return
  # Every framing scan of the run is timed, wherever the reader calls it.
  scan = integrity.scan_shards = ScanTimer(integrity.scan_shards)
  schema = SOURCES["census"].write_if_missing(FLAGS.data_dir, census_dir=FLAGS.census_dir)
  pattern = os.path.join(FLAGS.data_dir, "train-*")
  files = sorted(tf.io.gfile.glob(pattern))
  megabytes = sum(tf.io.gfile.stat(f).length for f in files) / 2**20
  default_batch = int(FLAGS.batch_sizes[0])
  deepctr = os.path.exists(FLAGS.deepctr_python)

  n, count_seconds = timed(reader.count_records, pattern)
  count_scans = scan.shards
  _, scan_seconds = timed(scan, files)
  manifest = os.path.exists(os.path.join(FLAGS.data_dir, "manifest.json"))
  print(f"examples: {n:,} (census group 1 train; {len(files)} shard(s), {megabytes:.1f} MiB; "
        f"{'with' if manifest else 'no'} converter manifest)")
  print(f"counting pass (reader.count_records): {count_seconds:.2f}s "
        f"({count_scans} of {len(files)} shards framing-scanned); "
        f"framing scan alone (integrity.scan_shards): {scan_seconds:.2f}s")

  def one_pass(ds):
    """(examples/s of a whole pass, seconds to its first batch, CPU seconds)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    first = None
    for _ in ds:
      first = first or time.perf_counter() - start
    return n / (time.perf_counter() - start), first, time.process_time() - cpu_start

  # Two uncached passes, each read and parsed from disk; the better one counts
  # (the first can pay one-off start-up costs on a busy machine).
  uncached_ds, uncached_build = timed(
      reader.make_dataset, pattern, schema, default_batch, seed=0, cache=False)
  uncached_passes = [one_pass(uncached_ds) for _ in range(2)]
  uncached = max(rate for rate, _, _ in uncached_passes)
  cached_ds = reader.make_dataset(pattern, schema, default_batch, seed=0)
  one_pass(cached_ds)
  cached, _, cached_cpu = one_pass(cached_ds)
  print(f"reader alone, make_dataset (with any framing scan): {uncached_build:.2f}s")
  print(f"reader alone, uncached, one pass, batch {default_batch}: {uncached:,.0f} examples/s "
        f"= {n / uncached:.2f}s (passes: "
        + ", ".join(f"{r:,.0f}/s, first batch after {f:.2f}s, {c:.2f} CPU s"
                    for r, f, c in uncached_passes) + ")")
  print(f"reader alone, cached epoch: {cached:,.0f} examples/s = {n / cached:.2f}s, "
        f"{cached_cpu:.2f} CPU s")

  # Tracing alone: one step of fit on one batch already in memory.
  trainable, _ = build_mmoe(schema)
  batch_in_memory = tf.data.Dataset.from_tensors(next(iter(cached_ds)))
  timer = EpochTimer()
  trainable.fit(batch_in_memory, epochs=1, verbose=0, callbacks=[timer])
  tracing_alone = timer.first_step
  print(f"tracing alone (fit on one batch in memory, train begin to first step end): "
        f"{tracing_alone:.2f}s (its one-step epoch: {timer.cpu_seconds[0]:.2f} CPU s)")
  if not deepctr:
    print(f"DeepCTR skipped: no {FLAGS.deepctr_python} (build it with "
          f"bash {os.path.normpath(ANCHORS)}/make_deepctr_env.sh)")

  rows = []
  for batch in (int(b) for b in FLAGS.batch_sizes):
    scan.seconds = scan.shards = 0
    trainable, build_seconds = build_mmoe(schema)
    ds, dataset_seconds = timed(reader.make_dataset, pattern, schema, batch, seed=0)
    scanned = scan.shards
    timer = EpochTimer()
    start = time.perf_counter()
    # As the train CLI does: a repeated dataset and steps from the count. (A
    # finite one ends each epoch with an OutOfRange error, which costs time.)
    trainable.fit(ds.repeat(), epochs=FLAGS.epochs, steps_per_epoch=math.ceil(n / batch),
                  verbose=0, callbacks=[timer])
    end = time.perf_counter()
    total = end - start
    ours = FLAGS.epochs * n / total
    # What the epoch callbacks do not see.
    between = (timer.train_end - timer.train_begin - timer.setup_seconds
               - sum(timer.seconds))
    later = sum(timer.seconds[1:]) / max(len(timer.seconds) - 1, 1)
    later_cpu = sum(timer.cpu_seconds[1:]) / max(len(timer.cpu_seconds) - 1, 1)
    print(f"MMoE training from TFRecords, batch {batch}: {ours:,.0f} examples/s averaged "
          f"over {FLAGS.epochs} epochs (whole fit call, {total:.2f}s); per epoch: "
          f"{', '.join(f'{n / s:,.0f}' for s in timer.seconds)}")
    print(f"  before fit: model {build_seconds:.2f}s, make_dataset {dataset_seconds:.2f}s "
          f"({scanned} shards framing-scanned, {scan.seconds:.2f}s); the CLI also counts first: "
          f"+{count_seconds:.2f}s")
    print(f"  fit: call -> train begin {timer.train_begin - start:.2f}s, -> epoch 1 "
          f"{timer.setup_seconds:.2f}s; epoch 1 -> first step end "
          f"{timer.first_step - timer.setup_seconds:.2f}s; epoch 1 {timer.seconds[0]:.2f}s vs "
          f"later {later:.2f}s (+{timer.seconds[0] - later:.2f}s); CPU seconds (all cores) "
          f"epoch 1 {timer.cpu_seconds[0]:.2f} vs later {later_cpu:.2f}; epochs "
          f"{sum(timer.seconds):.2f}s, between them {between:.2f}s; train end -> return "
          f"{end - timer.train_end:.2f}s", flush=True)
    if batch == default_batch:
      print(f"  epoch 1 / later with a free read, (later + tracing alone) / later: "
            f"{(later + tracing_alone) / later:.2f}x; measured {timer.seconds[0] / later:.2f}x")
    theirs = None
    if deepctr:
      theirs, why = deepctr_rate(batch)
      if why:
        print(f"  DeepCTR at batch {batch} failed: {why}")
    rows.append((batch, ours, theirs, timer.seconds[0] / later))

  print(f"uncached reader / training at batch {default_batch}: "
        f"{uncached / rows[0][1]:.2f}x (target >= 2x)")
  print(f"\nbatch | ours, {FLAGS.epochs}-epoch avg ex/s | DeepCTR ex/s | ours / DeepCTR | "
        "epoch 1 / later epochs")
  for batch, ours, theirs, first_ratio in rows:
    their_text, ratio = (f"{theirs:,.0f}", f"{ours / theirs:.2f}x") if theirs else ("-", "-")
    print(f"{batch:5d} | {ours:22,.0f} | {their_text:>12} | {ratio:>14} | {first_ratio:.2f}x")
  print("(targets: ours / DeepCTR >= 2x, epoch 1 / later <= 1.5x; fit only: the "
        "counting pass and make_dataset come before it)")


if __name__ == "__main__":
  app.run(main)
