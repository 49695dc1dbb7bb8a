"""The tf.data options of every dataset the pipelines read.

One home, because the options answer one fault for every reader: TF 2.21's
autotuning thread can miss the cancellation of a deleted iterator and hold the
deletion, idle, until its next optimisation (4-5 s at the end of a 10 s census
`fit`; its period grows as a pass goes on). Counting and scanning passes are
iterators too.
"""

import tensorflow as tf


def dataset_options() -> tf.data.Options:
  """Warm start on, autotuning off.

  Warm start: the background threads start when the iterator is made, not at
  the first `next()`, so in `fit` the read overlaps the tracing of the train
  step. No autotuning: each parallel stage runs at the default parallelism
  (the cores) and `prefetch(AUTOTUNE)` sizes its buffer with its own
  autotuner. Options set on a dataset hold for every dataset built from it.

  Returns:
    The options, for `Dataset.with_options`.
  """
  options = tf.data.Options()
  options.experimental_warm_start = True
  options.autotune.enabled = False
  return options
