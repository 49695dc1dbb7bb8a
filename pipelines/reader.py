"""TFRecords (training layout) -> tf.data of (features, labels, sample weights)."""

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from pipelines import schema as schema_lib

# Parsed blocks held for shuffling: all of them for datasets up to ~500k examples.
BLOCK_SHUFFLE_BUFFER = 64
# Key of the padding mask of request lists (see `group_by_request`).
LIST_MASK = "__list_mask__"


def list_files(file_pattern: Union[str, Sequence[str]]) -> list:
  """Expands one or several globs (comma-separated in a string) into sorted paths."""
  patterns = file_pattern.split(",") if isinstance(file_pattern, str) else file_pattern
  files = []
  for pattern in patterns:
    pattern = pattern.strip()
    matched = tf.io.gfile.glob(pattern)
    if not matched:
      raise FileNotFoundError(
          f"no files match {pattern!r}; check the path, or write the data first with "
          "`python -m pipelines.convert`.")
    files.extend(matched)
  return sorted(set(files))


def detect_compression(files: Sequence[str]) -> Optional[str]:
  """GZIP when every file ends in .gz, none when none does; mixed is an error."""
  gz = [f.endswith(".gz") for f in files]
  if all(gz):
    return "GZIP"
  if any(gz):
    raise ValueError("some input files end in .gz and some do not; pass one kind at a "
                     "time or set the compression explicitly.")
  return None


def split_for_tasks(schema: schema_lib.Schema, columns: Dict[str, tf.Tensor],
                    check_labels: bool = True) -> Tuple[Dict[str, tf.Tensor],
                                                        Dict[str, tf.Tensor]]:
  """Label columns -> per-task labels [batch, 1] and sample weights [batch].

  A task's sample weight is its mask column (1 where the loss counts), or ones.
  With `check_labels`, binary labels and masks outside {0, 1} fail the step with
  a message naming the column.
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
    if check_labels and task.type == schema_lib.BINARY:
      label = _checked_binary(label, f"label column {task.label} of binary task {task.name}")
    labels[task.name] = label[:, None]
    if task.mask:
      mask = columns[task.mask]
      if check_labels:
        mask = _checked_binary(mask, f"mask column {task.mask} of task {task.name}")
      weights[task.name] = mask
    else:
      weights[task.name] = tf.ones_like(label)
  return labels, weights


def event_target_and_weight(task: schema_lib.Task, columns: Dict[str, tf.Tensor]
                            ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Sample weighting: target 1 when any event happened ([batch, 1]); weight of
  the deepest (highest-weight) event present, else the task's base weight."""
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
  """Event weights from the data: the deepest event (the rarest) weighs 1 and
  every other event the ratio of their counts, e.g. conversions / clicks, so
  each event type adds up to the same total weight."""
  counts = {e: float(np.sum(np.asarray(columns[e]) > 0.5)) for e in events}
  rarest = min(counts.values())
  if rarest == 0:
    raise ValueError(f"event columns {[e for e, n in counts.items() if n == 0]} are never 1; "
                     "they cannot weigh examples.")
  return {e: rarest / n for e, n in counts.items()}


def _checked_binary(values: tf.Tensor, what: str) -> tf.Tensor:
  ok = tf.reduce_all(tf.logical_or(tf.equal(values, 0.0), tf.equal(values, 1.0)))
  check = tf.debugging.Assert(
      ok, [f"{what} must be 0 or 1; fix the data, or declare the task as a "
           "regression in the schema. Offending batch min and max:",
           tf.reduce_min(values), tf.reduce_max(values)])
  with tf.control_dependencies([check]):
    return tf.identity(values)


def make_dataset(file_pattern: Union[str, Sequence[str]],
                 schema: schema_lib.Schema,
                 batch_size: int,
                 shuffle: bool = True,
                 shuffle_block: int = 8192,
                 seed: Optional[int] = None,
                 cache: Union[bool, str] = True,
                 check_labels: bool = True,
                 duplicate_task: Optional[str] = None,
                 group_lists: Optional[bool] = None,
                 shard: Optional[Tuple[int, Union[int, tf.Tensor]]] = None,
                 deterministic: Optional[bool] = None) -> tf.data.Dataset:
  """A dataset of `(features, labels, sample_weights)` batches for Keras `fit`.

  Records are read and parsed in blocks of `shuffle_block` examples (one batched
  parse per block, in parallel), cached as parsed blocks, and shuffled at block
  granularity: each epoch visits the blocks in a new order and permutes the
  examples inside each block before cutting batches. No step costs anything per
  example after the first epoch, which is what keeps the input pipeline far
  ahead of training on a 2-core CPU. The price: examples from different blocks
  never share a batch, so data whose on-disk order is meaningful (sorted by
  time or label) should be shuffled when it is written.

  Args:
    file_pattern: glob(s) of training-layout TFRecord shards.
    schema: the schema the shards were written with.
    batch_size: examples per batch.
    shuffle: shuffle shard order, block order and examples within blocks.
    shuffle_block: examples parsed, cached and shuffled together.
    seed: seed for every shuffle (None: fresh each run).
    cache: True caches parsed blocks in memory during the first epoch; a string
      caches to that file prefix; False reads and parses every epoch.
    check_labels: fail if a binary label or a mask is not 0 or 1 (cheap, per batch).
    duplicate_task: a sample-weighted task (with `events`) whose weights become
      copies instead: each example is repeated round(weight / smallest weight)
      times and weighs 1.
    group_lists: batch whole requests for ranking losses (default: when a task
      is a ranking task). Each block's examples are grouped by request id into
      lists of the schema's `list_size` (a request's first `list_size` examples
      in file order; shorter lists are zero-padded) and every batch holds
      `batch_size // list_size` lists, flattened to [lists * list_size, ...]
      so the model scores examples as usual; padding weighs 0 for every task.
      A request whose examples fall in two blocks becomes two lists, so write
      a request's examples together (the converters do).
    shard: (num_shards, index): read only every num_shards-th file from the
      index-th on (sorted order), so distributed workers read disjoint files.
      The index may be a tensor, e.g. a parameter-server worker's index.
    deterministic: the same order in every run with the same seed. Default:
      only without shuffling; shuffled reads then take blocks as they finish
      (faster, but the order differs between runs). A resumed run needs it to
      see the batches the interrupted one would have.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  list_size = schema.list_size if group_lists is None or group_lists else None
  if group_lists and not list_size:
    raise ValueError(f"group_lists needs a ranking task (with list_size) in schema "
                     f"{schema.name!r}; its tasks are {schema.task_names}.")
  files = list_files(file_pattern)
  compression = detect_compression(files)  # GZIP shards end in .gz
  if deterministic is None:
    deterministic = not shuffle
  ds = tf.data.Dataset.from_tensor_slices(files)
  if shard:
    ds = ds.shard(*shard)
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed)
  # Blocks are cut inside each shard, then shards are interleaved block by block:
  # interleaving single records costs ~5x more than parsing them.
  block = max(shuffle_block, batch_size)
  ds = ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type=compression or "").batch(block),
      cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=deterministic)
  ds = ds.map(lambda s: tf.io.parse_example(s, schema.training_parse_spec()),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if duplicate_task:
    ds = ds.map(_duplicator(schema, duplicate_task), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic)
  if list_size:
    ds = ds.map(lambda block: group_by_request(block, list_size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if cache:
    ds = ds.cache(cache if isinstance(cache, str) else "")
  if shuffle:
    ds = ds.shuffle(BLOCK_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda block: _permute_block(block, seed))
  if list_size:
    ds = ds.rebatch(max(1, batch_size // list_size)).map(_flatten_lists)
  else:
    ds = ds.rebatch(batch_size)

  def split(packed):
    list_mask = packed.pop(LIST_MASK, None)
    features, columns = schema.split_packed(packed)
    labels, weights = split_for_tasks(schema, columns, check_labels)
    if duplicate_task:
      weights[duplicate_task] = tf.ones_like(weights[duplicate_task])
    if list_mask is not None:
      weights = {task: w * list_mask for task, w in weights.items()}
    return features, labels, weights

  ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return ds.prefetch(tf.data.AUTOTUNE)


def _duplicator(schema: schema_lib.Schema, task_name: str):
  """A block map repeating each example by its sample-weighting copies."""
  task = schema.task(task_name)
  if not task.events:
    raise ValueError(f"duplicate_task {task_name!r} has no 'events' weights to turn into "
                     "copies; declare them in the schema.")
  unit = min(list(task.events.values()) + [task.base_weight])

  def duplicate(block):
    _, weight = event_target_and_weight(task, schema.split_packed(block)[1])
    copies = tf.cast(tf.round(weight / unit), tf.int32)
    return {k: tf.repeat(v, copies, axis=0) for k, v in block.items()}

  return duplicate


def group_by_request(block: Dict[str, tf.Tensor], list_size: int) -> Dict[str, tf.Tensor]:
  """Packed examples [n, ...] -> request lists [requests, list_size, ...], plus
  LIST_MASK [requests, list_size] (1 for real examples, 0 for padding).

  Requests keep their examples' order; examples past `list_size` are dropped.
  """
  request_ids = block[schema_lib.PACKED_REQUEST_ID]
  order = tf.argsort(request_ids, stable=True)
  _, group = tf.unique(tf.gather(request_ids, order))
  count = tf.size(order)
  num_lists = tf.reduce_max(group) + 1
  starts = tf.math.unsorted_segment_min(tf.range(count), group, num_lists)
  position = tf.range(count) - tf.gather(starts, group)
  kept = position < list_size
  slots = tf.boolean_mask(group * list_size + position, kept)[:, None]
  source = tf.boolean_mask(order, kept)

  def to_lists(values):
    tail = tf.shape(values)[1:]
    padded = tf.scatter_nd(slots, tf.gather(values, source),
                           tf.concat([[num_lists * list_size], tail], 0))
    return tf.reshape(padded, tf.concat([[num_lists, list_size], tail], 0))

  lists = {key: to_lists(values) for key, values in block.items()}
  lists[LIST_MASK] = to_lists(tf.ones_like(order, tf.float32))
  return lists


def _flatten_lists(lists: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  return {key: tf.reshape(values, tf.concat([[-1], tf.shape(values)[2:]], 0))
          for key, values in lists.items()}


def _permute_block(block: Dict[str, tf.Tensor], seed: Optional[int]) -> Dict[str, tf.Tensor]:
  size = tf.shape(next(iter(block.values())))[0]
  order = tf.random.shuffle(tf.range(size), seed=seed)
  return {k: tf.gather(v, order) for k, v in block.items()}


def count_records(file_pattern: Union[str, Sequence[str]]) -> int:
  """Counts records in the shards (one fast pass, no parsing)."""
  files = list_files(file_pattern)
  ds = tf.data.TFRecordDataset(files, compression_type=detect_compression(files) or "")
  return int(ds.batch(65536).reduce(tf.constant(0, tf.int64),
                                    lambda n, b: n + tf.cast(tf.size(b), tf.int64)))


def read_columns(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
                 batch_size: int = 8192, limit: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Reads shards back into numpy columns (features and label columns), in file
  order, the first `limit` records or all. For evaluation, tests and small data;
  not a training path."""
  files = list_files(file_pattern)
  ds = tf.data.TFRecordDataset(files, compression_type=detect_compression(files) or "")
  if limit is not None:
    ds = ds.take(limit)
  ds = ds.batch(batch_size).map(schema.parse_training_examples)
  parts = {}
  for features, columns in ds:
    for name, value in {**features, **columns}.items():
      parts.setdefault(name, []).append(value.numpy())
  return {name: np.concatenate(chunks) for name, chunks in parts.items()}
