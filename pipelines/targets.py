"""Task targets from label columns: labels and sample weights per task (masks,
event weights), relevance grades for ranking, and default event weights from
event counts."""

from typing import Dict, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from pipelines import schema as schema_lib
from pipelines import shards
from pipelines import validation


def split_for_tasks(schema: schema_lib.Schema, columns: Dict[str, tf.Tensor]
                    ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
  """Label columns -> per-task labels [batch, 1] and sample weights [batch].

  A task's sample weight is its mask column (1 where the loss counts), or ones.
  Where the mask is 0 the label is set to 0: it may be missing there (NaN, e.g.
  no conversion label without a click), and a NaN times a zero weight would
  still make the loss NaN.

  Args:
    schema: the schema whose tasks to build targets for.
    columns: label column -> [batch] float tensor (as `Schema.split_packed` gives).

  Returns:
    (labels, weights): task name -> label [batch, 1]; task name -> weight [batch].
  """
  labels, weights = {}, {}
  for task in schema.tasks:
    if task.type == schema_lib.RANKING:
      labels[task.name] = relevance_grade(task, columns)
      weights[task.name] = tf.ones_like(columns[task.label])
      continue
    if task.events:
      labels[task.name], weights[task.name] = event_target_and_weight(task, columns)
      continue
    label = columns[task.label]
    if task.mask:
      weights[task.name] = columns[task.mask]
      label = tf.where(weights[task.name] > 0, label, tf.zeros_like(label))
    else:
      weights[task.name] = tf.ones_like(label)
    labels[task.name] = label[:, None]
  return labels, weights


def event_target_and_weight(task: schema_lib.Task, columns: Dict[str, tf.Tensor]
                            ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Sample weighting: target 1 when any event happened ([batch, 1]); weight of
  the deepest (highest-weight) event present, else the task's base weight
  ([batch])."""
  events = list(task.events)
  present = tf.stack([columns[c] for c in events], axis=1) > 0.5
  event_weights = tf.constant([task.events[c] for c in events], tf.float32)
  deepest = tf.reduce_max(tf.where(present, event_weights, 0.0), axis=1)
  happened = tf.reduce_any(present, axis=1)
  return (tf.cast(happened, tf.float32)[:, None],
          tf.where(happened, deepest, task.base_weight))


def relevance_grade(task: schema_lib.Task, columns: Dict[str, tf.Tensor]) -> tf.Tensor:
  """Ranking tasks: the grade of the highest-graded event present, else 0; [batch, 1]."""
  present = tf.stack([columns[c] for c in task.events], axis=1) > 0.5
  grades = tf.constant(list(task.events.values()), tf.float32)
  return tf.reduce_max(tf.where(present, grades, 0.0), axis=1, keepdims=True)


def default_event_weights(columns: Dict[str, np.ndarray], events: Sequence[str]
                          ) -> Dict[str, float]:
  """Event weights from label columns in memory (see `event_weights_from_counts`)."""
  return event_weights_from_counts(
      {e: float(np.sum(np.asarray(columns[e]) > 0.5)) for e in events})


@tf.autograph.experimental.do_not_convert  # see shards.parsed_blocks
def count_events(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
                 events: Sequence[str], bad_records: str = validation.FAIL
                 ) -> Dict[str, float]:
  """Records with each event label column set (> 0.5), in one streaming pass
  that keeps only the counts (not the data, as `reader.read_columns` would).

  Args:
    file_pattern: glob(s) of training-layout shards.
    schema: the schema they were written with.
    events: label columns to count.
    bad_records: what to do with bad records (see `reader.make_dataset`).

  Returns:
    event column -> records with it set.
  """
  files = shards.list_files(file_pattern)
  shards.detect_compression(files)
  columns = [schema.labels.index(e) for e in events]
  ds = shards.parsed_blocks(files, schema, 8192, bad_records, None, check_values=False,
                            shuffle=False)
  ds = ds.map(lambda packed: tf.reduce_sum(tf.cast(
      tf.gather(packed[schema_lib.PACKED_LABELS], columns, axis=1) > 0.5, tf.int64), axis=0))
  totals = ds.reduce(tf.zeros([len(events)], tf.int64), lambda total, block: total + block)
  return {e: float(n) for e, n in zip(events, totals.numpy())}


def event_weights_from_counts(counts: Dict[str, float]) -> Dict[str, float]:
  """Event weights from event counts: the deepest event (the rarest) weighs 1
  and every other event the ratio of their counts, e.g. conversions / clicks, so
  each event type adds up to the same total weight."""
  rarest = min(counts.values())
  if rarest == 0:
    raise ValueError(f"event columns {[e for e, n in counts.items() if n == 0]} are never 1; "
                     "they cannot weigh examples.")
  return {e: rarest / n for e, n in counts.items()}
