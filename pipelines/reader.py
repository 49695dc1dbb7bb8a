"""TFRecords (training layout) -> tf.data of (features, labels, sample weights).

Shards are read as blocks of parsed records (`shards.parsed_blocks`: framing
checked before reading unless the converter's manifest vouches for a shard,
one batched parse per block); labels become per-task targets
(`targets.split_for_tasks`). Bad records -- damaged, unparsable, or with
values the schema forbids -- stop reading with an error that names the file
and the record (`first_unparsable` for the one record TensorFlow's batched
parse does not name), or with `bad_records="skip"` are left out one by one and
counted (`validation.SkippedRecords`).
"""

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from google.protobuf import message

from pipelines import integrity
from pipelines import schema as schema_lib
from pipelines import shards
from pipelines import targets
from pipelines import tfdata
from pipelines import validation

# Parsed blocks held for shuffling: all of them for datasets up to ~500k examples.
BLOCK_SHUFFLE_BUFFER = 64
# Key of the padding mask of request lists (see `group_by_request`).
LIST_MASK = "__list_mask__"


@tf.autograph.experimental.do_not_convert  # see shards.parsed_blocks
def make_dataset(file_pattern: Union[str, Sequence[str]],
                 schema: schema_lib.Schema,
                 batch_size: int,
                 shuffle: bool = True,
                 shuffle_block: int = 8192,
                 seed: Optional[int] = None,
                 cache: Union[bool, str] = True,
                 check_values: bool = True,
                 duplicate_task: Optional[str] = None,
                 group_lists: Optional[bool] = None,
                 shard: Optional[Tuple[int, Union[int, tf.Tensor]]] = None,
                 deterministic: Optional[bool] = None,
                 bad_records: str = validation.FAIL,
                 skipped: Optional[validation.SkippedRecords] = None,
                 list_overflow: Optional[validation.ListOverflow] = None,
                 negative_sampling: Optional[Tuple[Sequence[str], float]] = None
                 ) -> tf.data.Dataset:
  """A dataset of `(features, labels, sample_weights)` batches for Keras `fit`.

  Records are read and parsed in blocks of `shuffle_block` examples (one batched
  parse per block, in parallel), cached as parsed blocks, and shuffled at block
  granularity: each epoch visits the blocks in a new order and permutes the
  examples inside each block before cutting batches. No step costs anything per
  example after the first epoch, which is what keeps the input pipeline far
  ahead of training on a 2-core CPU. The price: examples from different blocks
  never share a batch, so data whose on-disk order is meaningful (sorted by
  time or label) should be shuffled when it is written.

  Before anything is read, every shard's framing is checked (one fast pass
  without parsing, `integrity.scan_shards`), except the shards the converter's
  manifest vouches for under "fail" and those already scanned in this process
  (by `count_records`), unchanged since (see `shards`): a file that is not a
  TFRecord file, or is compressed other than its name says, raises
  validation.BadRecordError at once.

  Args:
    file_pattern: glob(s) of training-layout TFRecord shards.
    schema: the schema the shards were written with.
    batch_size: examples per batch.
    shuffle: shuffle shard order, block order and examples within blocks.
    shuffle_block: examples parsed, cached and shuffled together.
    seed: seed for every shuffle (None: fresh each run).
    cache: True caches parsed blocks in memory during the first epoch; a string
      caches to that file prefix; False reads and parses every epoch.
    check_values: check every record against `validation.ValueRules` (labels, masks,
      numeric values; once per block, before the cache).
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
      a request's examples together (the converters do). Examples past
      `list_size` are left out; `list_overflow` counts them.
    shard: (num_shards, index): read only every num_shards-th file from the
      index-th on (sorted order), so distributed workers read disjoint files.
      The index may be a tensor, e.g. a parameter-server worker's index.
    deterministic: the same order in every run with the same seed. Default:
      when a seed is given or nothing is shuffled. False takes blocks as they
      finish (the order then differs between runs; on census no faster, as
      measured in BUILD_NOTES.md). A resumed run needs it to see the batches
      the interrupted one would have.
    bad_records: "fail": a damaged shard raises validation.BadRecordError here,
      naming file, record and damage (a shard the manifest vouches for is not
      scanned: damaged in place after conversion, it fails as it is read); a
      record with a value the schema forbids stops reading with an
      InvalidArgumentError naming file, record, column and value; one
      that does not parse, with TensorFlow's error naming the file and the
      block ("from record <first>"), and `first_unparsable` names the record.
      "skip": such records are left out one by one, never the good records
      around them, and counted into `skipped`; the first pass over the data
      then costs ~30% more (blocks are parsed in nested datasets that can fall
      back to parsing record by record).
    skipped: with "skip", receives what was left out (None: nothing is counted,
      e.g. where no variable may be created, as in a parameter-server
      dataset_fn).
    list_overflow: with request lists, counts the examples left out past
      `list_size` (None: not counted).
    negative_sampling: (label columns, rate): keep every record where any of
      these label columns is set (> 0.5) and a fraction `rate` of the others,
      chosen by a hash of the record's content keyed by `seed` (0 if None):
      the same records in every epoch, run, shard order and reader, before the
      cache. For training only; eval data must see every negative.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  validation.check_policy(bad_records)
  list_size = schema.list_size if group_lists is None or group_lists else None
  if group_lists and not list_size:
    raise ValueError(f"group_lists needs a ranking task (with list_size) in schema "
                     f"{schema.name!r}; its tasks are {schema.task_names}.")
  files = shards.list_files(file_pattern)
  shards.detect_compression(files)  # one kind per dataset
  if deterministic is None:
    deterministic = seed is not None or not shuffle
  if shard and isinstance(shard[1], int):  # only this reader's files are checked and read
    files, shard = files[shard[1]::shard[0]], None
  block = max(shuffle_block, batch_size)
  ds = shards.parsed_blocks(files, schema, block, bad_records, skipped, check_values,
                            shuffle=shuffle, seed=seed, deterministic=deterministic,
                            shard=shard)
  if negative_sampling:
    ds = ds.map(_negative_sampler(schema, *negative_sampling, seed or 0),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if duplicate_task:
    ds = ds.map(_duplicator(schema, duplicate_task), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic)
  if list_size:
    ds = ds.map(lambda block: group_by_request(block, list_size, list_overflow),
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
    labels, weights = targets.split_for_tasks(schema, columns)
    if duplicate_task:
      weights[duplicate_task] = tf.ones_like(weights[duplicate_task])
    if list_mask is not None:
      weights = {task: w * list_mask for task, w in weights.items()}
    return features, labels, weights

  ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return ds.prefetch(tf.data.AUTOTUNE)


# Hash buckets of the negative-sampling draw: rates resolve to 2^-24.
_SAMPLING_BUCKETS = 1 << 24


def _negative_sampler(schema: schema_lib.Schema, labels: Sequence[str], rate: float,
                      seed: int):
  """A block map keeping the records with any of `labels` set and a fraction
  `rate` of the others, decided per record by a keyed hash of its packed
  values (floats by their bits), so the draw depends on nothing but the record
  and the seed."""
  if not 0 < rate <= 1:
    raise ValueError(f"negative sampling rate must be in (0, 1], got {rate}.")
  unknown = [label for label in labels if label not in schema.labels]
  if unknown or not labels:
    raise ValueError(f"negative sampling labels {list(labels)} must be label columns of "
                     f"{schema.labels}.")
  columns = [schema.labels.index(label) for label in labels]
  threshold = int(rate * _SAMPLING_BUCKETS)
  # SipHash's 128-bit key: the seed (non-negative) and a fixed second half.
  hash_key = [seed & 0x7FFFFFFFFFFFFFFF, 0x6e5]

  def sample(block):
    parts = []
    for key in sorted(block):
      value = block[key]
      if value.dtype == tf.float32:
        value = tf.bitcast(value, tf.int32)
      parts.append(tf.reshape(tf.cast(value, tf.int64), [tf.shape(value)[0], -1]))
    text = tf.strings.reduce_join(tf.strings.as_string(tf.concat(parts, 1)), axis=1,
                                  separator=",")
    draw = tf.strings.to_hash_bucket_strong(text, _SAMPLING_BUCKETS, key=hash_key)
    positive = tf.reduce_any(
        tf.gather(block[schema_lib.PACKED_LABELS], columns, axis=1) > 0.5, axis=1)
    keep = positive | (draw < threshold)
    return {key: tf.boolean_mask(value, keep) for key, value in block.items()}

  return sample


def _duplicator(schema: schema_lib.Schema, task_name: str):
  """A block map repeating each example by its sample-weighting copies."""
  task = schema.task(task_name)
  if not task.events:
    raise ValueError(f"duplicate_task {task_name!r} has no 'events' weights to turn into "
                     "copies; declare them in the schema.")
  unit = min(list(task.events.values()) + [task.base_weight])

  def duplicate(block):
    _, weight = targets.event_target_and_weight(task, schema.split_packed(block)[1])
    copies = tf.cast(tf.round(weight / unit), tf.int32)
    return {k: tf.repeat(v, copies, axis=0) for k, v in block.items()}

  return duplicate


def group_by_request(block: Dict[str, tf.Tensor], list_size: int,
                     overflow: Optional[validation.ListOverflow] = None
                     ) -> Dict[str, tf.Tensor]:
  """Packed examples [n, ...] -> request lists [requests, list_size, ...], plus
  LIST_MASK [requests, list_size] (1 for real examples, 0 for padding).

  Requests keep their examples' order; examples past `list_size` are dropped
  (and counted into `overflow`).
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
  if overflow is None:
    return lists
  with tf.control_dependencies([overflow.add(count - tf.size(source))]):
    return {key: tf.identity(values) for key, values in lists.items()}


def _flatten_lists(lists: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  return {key: tf.reshape(values, tf.concat([[-1], tf.shape(values)[2:]], 0))
          for key, values in lists.items()}


def _permute_block(block: Dict[str, tf.Tensor], seed: Optional[int]) -> Dict[str, tf.Tensor]:
  size = tf.shape(next(iter(block.values())))[0]
  order = tf.random.shuffle(tf.range(size), seed=seed)
  return {k: tf.gather(v, order) for k, v in block.items()}


def first_unparsable(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema
                     ) -> Optional[Tuple[str, int, str]]:
  """(file, record index, why) of the first record that does not parse as the
  schema's training layout, or None. Slow (eager, record by record where a
  block fails): for naming the record after `make_dataset` failed. Damaged
  shards raise BadRecordError, as in `make_dataset`."""
  spec = schema.training_parse_spec()
  for scan in integrity.scan_shards(shards.list_files(file_pattern)):
    if scan.damage:
      raise validation.BadRecordError("; ".join(str(d) for d in scan.damage))
    records = tf.data.TFRecordDataset(scan.path, scan.compression or "").batch(4096)
    records = records.with_options(tfdata.dataset_options())
    for start, batch in enumerate(records.as_numpy_iterator()):
      # TensorFlow's error for bytes that are not a tf.Example quotes them, which
      # fails to decode when they are not text: hence UnicodeDecodeError, and
      # protobuf asked first below.
      try:
        tf.io.parse_example(batch, spec)
        continue
      except (tf.errors.InvalidArgumentError, UnicodeDecodeError):
        pass
      for i, record in enumerate(batch):
        try:
          tf.train.Example.FromString(record)
        except message.DecodeError:
          return scan.path, start * 4096 + i, "it is not a serialized tf.Example"
        try:
          tf.io.parse_example([record], spec)
        except tf.errors.InvalidArgumentError as e:
          return scan.path, start * 4096 + i, e.message.splitlines()[0].strip()
  return None


def count_records(file_pattern: Union[str, Sequence[str]]) -> int:
  """The number of records in the shards.

  A shard the converter's manifest vouches for (listed with the size it has
  now) counts as listed, unread; the others are counted by the framing scan
  (one fast pass, no parsing), which also checks them, and whose result
  `make_dataset` reuses: counting and then reading scans each shard once.

  Args:
    file_pattern: glob(s) of TFRecord shards.

  Returns:
    The total record count.

  Raises:
    validation.BadRecordError: a scanned shard is damaged (as in `make_dataset`).
  """
  scans = shards.scan(shards.list_files(file_pattern))
  damage = [d for scan in scans for d in scan.damage]
  if damage:
    raise validation.damaged_error(damage)
  return sum(scan.records for scan in scans)


def has_records(file_pattern: Union[str, Sequence[str]]) -> bool:
  """Whether the shards hold any record, reading at most one (where counting
  them all would read every shard).

  Args:
    file_pattern: glob(s) of TFRecord shards.

  Returns:
    True as soon as one record is read.

  Raises:
    tf.errors.OpError: the first shard with a record cannot be read (e.g. a
      damaged header).
  """
  files = shards.list_files(file_pattern)
  records = tf.data.TFRecordDataset(files, shards.detect_compression(files) or "")
  return any(True for _ in records.take(1).with_options(tfdata.dataset_options()))


@tf.autograph.experimental.do_not_convert
def count_ids(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
              feature: str, bad_records: str = validation.FAIL) -> np.ndarray:
  """Records per id of one categorical feature (e.g. impressions per item), in
  one streaming pass that keeps only the counts.

  Args:
    file_pattern: glob(s) of training-layout shards.
    schema: the schema they were written with.
    feature: a categorical feature of the schema.
    bad_records: what to do with bad records (see `make_dataset`); with
      "skip", they are not counted.

  Returns:
    int64 [vocab_size + 1] counts by embedding row: ids outside the vocabulary
    in the last (OOV) one; for a hashed feature [vocab_size], ids folded.
  """
  files = shards.list_files(file_pattern)
  shards.detect_compression(files)
  f = schema.feature(feature)
  column = [c.name for c in schema.categorical].index(f.name)
  rows = f.num_embedding_rows
  ds = shards.parsed_blocks(files, schema, 8192, bad_records, None,
                            check_values=bad_records == validation.SKIP, shuffle=False)

  def count(packed):
    ids = packed[schema_lib.PACKED_CATEGORICAL][:, column]
    ids = (tf.math.floormod(ids, f.vocab_size) if f.hashed else
           tf.where((ids >= 0) & (ids < f.vocab_size), ids, f.vocab_size))
    return tf.math.bincount(tf.cast(ids, tf.int32), minlength=rows, maxlength=rows,
                            dtype=tf.int64)

  totals = ds.map(count).reduce(tf.zeros([rows], tf.int64), lambda total, n: total + n)
  return totals.numpy()


def read_columns(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
                 batch_size: int = 8192, limit: Optional[int] = None,
                 bad_records: str = validation.FAIL,
                 skipped: Optional[validation.SkippedRecords] = None
                 ) -> Dict[str, np.ndarray]:
  """Reads shards back into numpy columns (features and label columns), in file
  order, the first `limit` records or all; damaged and unparsable records fail
  or are skipped as `make_dataset`'s `bad_records` says. Under "skip" records
  with values the schema forbids are left out too (reports then see the records
  training saw); under "fail" values are not checked. For evaluation, tests and
  small data; not a training path."""
  files = shards.list_files(file_pattern)
  shards.detect_compression(files)
  ds = shards.parsed_blocks(files, schema, batch_size, bad_records, skipped,
                            check_values=bad_records == validation.SKIP, shuffle=False,
                            cycle_length=1)
  parts, count = {}, 0
  for packed in ds:
    features, columns = schema.split_packed(packed)
    for name, value in {**features, **columns}.items():
      parts.setdefault(name, []).append(value.numpy())
    count += len(packed[schema_lib.PACKED_LABELS])
    if limit is not None and count >= limit:
      break
  return {name: np.concatenate(chunks)[:limit] for name, chunks in parts.items()}
