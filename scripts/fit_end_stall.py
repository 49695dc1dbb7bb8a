"""How long `fit` takes to return after its last epoch, with tf.data autotuning
on and off (`pipelines.tfdata.dataset_options` turns it off).

  python scripts/fit_end_stall.py [--data_dir=...] [--repeats=6]

Each repeat trains the census Group 1 MMoE of `scripts/benchmark_census.py` (its
flags: --census_dir, --data_dir, --epochs, the first of --batch_sizes) from
`reader.make_dataset`, once with autotuning switched back on and once as the
reader sets it, alternating, and prints the seconds from the `on_train_end`
callback to `fit` returning (the deletion of the dataset's iterator) and the
CPU seconds spent meanwhile. With autotuning on, TF 2.21's autotuning thread
sometimes misses the iterator's cancellation and the deletion waits, idle, for
its next optimisation.
"""

import math
import os
import time

from absl import app, flags

# Beside this script: puts the repository on the path, chooses the Keras, and
# defines the census flags and model this script shares.
import benchmark_census as bench
import mtl_zoo
import tensorflow as tf
from pipelines import reader
from pipelines.sources import SOURCES

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 6, "Fits per setting.")


class TrainEnd(mtl_zoo.keras.callbacks.Callback):
  """Notes when `on_train_end` runs (wall and CPU clocks)."""

  def on_train_end(self, logs=None):
    self.wall, self.cpu = time.perf_counter(), time.process_time()


def fit_end_seconds(schema, pattern, batch, autotune):
  """(seconds from train end to `fit` returning, CPU seconds meanwhile)."""
  trainable, _ = bench.build_mmoe(schema)
  ds = reader.make_dataset(pattern, schema, batch, seed=0)
  if autotune:
    options = tf.data.Options()
    options.autotune.enabled = True
    ds = ds.with_options(options)
  end = TrainEnd()
  steps = math.ceil(reader.count_records(pattern) / batch)
  trainable.fit(ds.repeat(), epochs=FLAGS.epochs, steps_per_epoch=steps, verbose=0,
                callbacks=[end])
  return time.perf_counter() - end.wall, time.process_time() - end.cpu


def main(argv):
  del argv
  schema = SOURCES["census"].write_if_missing(FLAGS.data_dir, census_dir=FLAGS.census_dir)
  pattern = os.path.join(FLAGS.data_dir, "train-*")
  batch = int(FLAGS.batch_sizes[0])
  seconds = {True: [], False: []}
  for repeat in range(FLAGS.repeats):
    for autotune in (True, False):
      wall, cpu = fit_end_seconds(schema, pattern, batch, autotune)
      seconds[autotune].append(wall)
      print(f"repeat {repeat}, autotune {'on ' if autotune else 'off'}: train end -> fit "
            f"returns {wall:.2f}s ({cpu:.2f} CPU s)", flush=True)
  for autotune, values in seconds.items():
    slow = sum(s > 1.0 for s in values)
    print(f"autotune {'on ' if autotune else 'off'}: {slow} of {len(values)} fits took over "
          f"1 s to return (longest {max(values):.2f}s)")


if __name__ == "__main__":
  app.run(main)
