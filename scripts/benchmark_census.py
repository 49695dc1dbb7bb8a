"""Throughput of the input pipeline and of MMoE training on Census-Income, from TFRecords.

  python scripts/benchmark_census.py [--census_dir=...] [--batch_sizes=2048,1024]

Prints, for the census Group 1 TFRecords (199,523 training examples):
  * the reader alone: uncached passes of `pipelines.reader.make_dataset` with
    the train CLI's input settings (shuffle, block parse; the better of two
    passes), and a cached pass;
  * MMoE (8 experts of 16 units, towers of 8) trained with Keras `fit` for 5
    epochs from the same TFRecords with the CLI's default input settings: the
    average over the 5 epochs (total examples / total fit time, so tracing and
    the first, uncached epoch count) and each epoch's own rate.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (pins Keras 2 first)
from mtl_zoo import models  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines.datasets import census  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "census_group1"),
                    "TFRecords (written on first use).")
flags.DEFINE_list("batch_sizes", ["2048", "1024"], "Training batch sizes to measure; the "
                  "first is the CLI default.")
flags.DEFINE_integer("epochs", 5, "Training epochs per measurement.")


class EpochTimer(mtl_zoo.keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.seconds = []

  def on_train_begin(self, logs=None):
    self.train_begin = time.perf_counter()

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()
    if epoch == 0:
      self.setup_seconds = self._start - self.train_begin

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def main(argv):
  del argv
  schema = census.write_if_missing(FLAGS.census_dir, FLAGS.data_dir)
  pattern = os.path.join(FLAGS.data_dir, "train-*")
  n = reader.count_records(pattern)
  default_batch = int(FLAGS.batch_sizes[0])

  def one_pass(ds):
    start = time.perf_counter()
    for _ in ds:
      pass
    return n / (time.perf_counter() - start)

  # Two uncached passes, each read and parsed from disk; the better one counts
  # (the first can pay one-off start-up costs on a busy machine).
  uncached_ds = reader.make_dataset(pattern, schema, default_batch, seed=0, cache=False)
  uncached_passes = [one_pass(uncached_ds) for _ in range(2)]
  uncached = max(uncached_passes)
  cached_ds = reader.make_dataset(pattern, schema, default_batch, seed=0)
  one_pass(cached_ds)
  cached = one_pass(cached_ds)
  print(f"examples: {n:,} (census group 1 train)")
  print(f"reader alone, uncached, one pass, batch {default_batch}: {uncached:,.0f} examples/s "
        f"(passes: {', '.join(f'{r:,.0f}' for r in uncached_passes)})")
  print(f"reader alone, cached epoch:                 {cached:,.0f} examples/s")

  training = {}
  for batch in (int(b) for b in FLAGS.batch_sizes):
    mtl_zoo.keras.utils.set_random_seed(0)
    model = models.build("mmoe", schema, num_experts=8, expert_units=[16], tower_units=[8])
    models.compile_model(model, schema, learning_rate=2e-3)
    ds = reader.make_dataset(pattern, schema, batch, seed=0)
    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(ds, epochs=FLAGS.epochs, verbose=0, callbacks=[timer])
    total = time.perf_counter() - start
    print(f"  fit call {total:.2f}s: before epoch 1 {timer.train_begin - start + timer.setup_seconds:.2f}s, "
          f"epochs {sum(timer.seconds):.2f}s")
    training[batch] = FLAGS.epochs * n / total
    per_epoch = ", ".join(f"{n / s:,.0f}" for s in timer.seconds)
    print(f"MMoE training from TFRecords, batch {batch}: {training[batch]:,.0f} "
          f"examples/s averaged over {FLAGS.epochs} epochs (whole fit call); "
          f"per epoch: {per_epoch}")
  print(f"uncached reader / training at batch {default_batch}: "
        f"{uncached / training[default_batch]:.2f}x (target >= 2x)")


if __name__ == "__main__":
  app.run(main)
