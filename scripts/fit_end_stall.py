"""How long `fit` takes to return after its last epoch, with tf.data autotuning
on and off (`pipelines.reader.dataset_options` turns it off).

  python scripts/fit_end_stall.py [--data_dir=...] [--repeats=6]

Each repeat trains census Group 1 MMoE (8 experts of 16 units) for 5 epochs from
`reader.make_dataset`, as `scripts/benchmark_census.py` does, once with
autotuning switched back on and once as the reader sets it, alternating, and
prints the seconds from the `on_train_end` callback to `fit` returning (the
deletion of the dataset's iterator) and the CPU seconds spent meanwhile. With
autotuning on, TF 2.21's autotuning thread sometimes misses the iterator's
cancellation and the deletion waits, idle, for its next optimisation.
"""

import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl_zoo  # noqa: E402  (chooses the Keras first)
import tensorflow as tf  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with the raw census files.")
flags.DEFINE_string("data_dir", os.path.join("mtl_zoo_output", "data", "census_group1"),
                    "TFRecords (written on first use).")
flags.DEFINE_integer("repeats", 6, "Fits per setting.")
flags.DEFINE_integer("epochs", 5, "Epochs per fit.")
BATCH = 2048


class TrainEnd(mtl_zoo.keras.callbacks.Callback):
  """Notes when `on_train_end` runs (wall and CPU clocks)."""

  def on_train_end(self, logs=None):
    self.wall, self.cpu = time.perf_counter(), time.process_time()


def fit_end_seconds(schema, pattern, steps, autotune):
  """(seconds from train end to `fit` returning, CPU seconds meanwhile)."""
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build("mmoe", schema, num_experts=8, expert_units=[16], tower_units=[8])
  trainable = mtl_zoo.compile_model(model, schema, learning_rate=2e-3)
  ds = reader.make_dataset(pattern, schema, BATCH, seed=0)
  if autotune:
    options = tf.data.Options()
    options.autotune.enabled = True
    ds = ds.with_options(options)
  end = TrainEnd()
  trainable.fit(ds.repeat(), epochs=FLAGS.epochs, steps_per_epoch=steps, verbose=0,
                callbacks=[end])
  return time.perf_counter() - end.wall, time.process_time() - end.cpu


def main(argv):
  del argv
  schema = SOURCES["census"].write_if_missing(FLAGS.data_dir, census_dir=FLAGS.census_dir)
  pattern = os.path.join(FLAGS.data_dir, "train-*")
  steps = math.ceil(reader.count_records(pattern) / BATCH)
  seconds = {True: [], False: []}
  for repeat in range(FLAGS.repeats):
    for autotune in (True, False):
      wall, cpu = fit_end_seconds(schema, pattern, steps, autotune)
      seconds[autotune].append(wall)
      print(f"repeat {repeat}, autotune {'on ' if autotune else 'off'}: train end -> fit "
            f"returns {wall:.2f}s ({cpu:.2f} CPU s)", flush=True)
  for autotune, values in seconds.items():
    slow = sum(s > 1.0 for s in values)
    print(f"autotune {'on ' if autotune else 'off'}: {slow} of {len(values)} fits took over "
          f"1 s to return (longest {max(values):.2f}s)")


if __name__ == "__main__":
  app.run(main)
