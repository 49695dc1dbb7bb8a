"""TFRecords (training layout) -> tf.data of (features, labels, sample weights).

Hostile input: every shard's framing is checked before it is read (one fast
pass, no parsing, `integrity.scan_shards`). Damaged records, records that do not
parse as the schema's training layout and records with values the schema
forbids (`ValueRules`) stop reading with an error that names the file and the
record (`first_unparsable` for the one record TensorFlow's batched parse does
not name), or with `bad_records="skip"` are left out one by one and counted
(`SkippedRecords`).
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from google.protobuf import message

from pipelines import integrity
from pipelines import schema as schema_lib
from pipelines.integrity import BadRecordError  # noqa: F401  (part of this module's API)

# Parsed blocks held for shuffling: all of them for datasets up to ~500k examples.
BLOCK_SHUFFLE_BUFFER = 64
# Key of the padding mask of request lists (see `group_by_request`).
LIST_MASK = "__list_mask__"

FAIL = "fail"
SKIP = "skip"
BAD_RECORD_POLICIES = (FAIL, SKIP)


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
    plain = next(f for f, z in zip(files, gz) if not z)
    compressed = next(f for f, z in zip(files, gz) if z)
    raise ValueError(f"input files mix GZIP ({compressed}) and uncompressed ({plain}) "
                     "TFRecords; compression follows the .gz suffix and one dataset reads "
                     "one kind, so convert or select the files of one kind.")
  return None


def split_for_tasks(schema: schema_lib.Schema, columns: Dict[str, tf.Tensor]
                    ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
  """Label columns -> per-task labels [batch, 1] and sample weights [batch].

  A task's sample weight is its mask column (1 where the loss counts), or ones.
  Where the mask is 0 the label is set to 0: it may be missing there (NaN, e.g.
  no conversion label without a click), and a NaN times a zero weight would
  still make the loss NaN.
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
  """Event weights from label columns in memory (see `event_weights_from_counts`)."""
  return event_weights_from_counts(
      {e: float(np.sum(np.asarray(columns[e]) > 0.5)) for e in events})


def count_events(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
                 events: Sequence[str], bad_records: str = FAIL) -> Dict[str, float]:
  """Records with each event label column set (> 0.5), in one streaming pass
  that keeps only the counts (not the data, as `read_columns` would)."""
  files = list_files(file_pattern)
  detect_compression(files)
  columns = [schema.labels.index(e) for e in events]
  ds = _parsed_blocks(files, schema, 8192, bad_records, None, check_values=False,
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


class SkippedRecords:
  """What `make_dataset(..., bad_records="skip")` left out, by reason.

  corrupt: records whose bytes are damaged (found by the framing scan before
    reading; `damage` says where).
  unparsable: records that are not training-layout tf.Examples of the schema
    (missing or extra-long packed features, wrong types, not a tf.Example).
  invalid: records with values the schema forbids (see `ValueRules`).
  Unparsable and invalid records are counted as they are read, so once per
  pass over the data that is not cached (with the default cache: the first).
  """

  def __init__(self):
    self.damage: List[integrity.Damage] = []
    with tf.init_scope():  # a plain CPU variable, also when built inside a function
      self._counts = tf.Variable(tf.zeros([2], tf.int64), trainable=False,
                                 name="skipped_records")

  def add(self, unparsable: tf.Tensor, invalid: tf.Tensor) -> tf.Operation:
    return self._counts.assign_add(tf.stack([tf.cast(unparsable, tf.int64),
                                             tf.cast(invalid, tf.int64)]))

  def counts(self) -> Dict[str, int]:
    """Records left out by reason, their total, and `unreadable_tails`: shards
    whose rest could not be read at all (records uncounted; see `damage`)."""
    unparsable, invalid = (int(c) for c in self._counts.numpy())
    corrupt = sum(d.records_lost or 0 for d in self.damage)
    return {"corrupt": corrupt, "unparsable": unparsable, "invalid": invalid,
            "total": corrupt + unparsable + invalid,
            "unreadable_tails": sum(d.records_lost is None for d in self.damage)}

  def summary(self, counts: Optional[Dict[str, int]] = None) -> str:
    """One line of counts (`counts()`, or a snapshot of it), then the damage."""
    counts = counts or self.counts()
    lines = [f"skipped {counts['total']} bad records ({counts['corrupt']} corrupt, "
             f"{counts['unparsable']} unparsable, {counts['invalid']} with invalid values)"
             + (f"; the rest of {counts['unreadable_tails']} shard(s) was unreadable"
                if counts["unreadable_tails"] else "")]
    lines += [f"  {d}" for d in self.damage]
    return "\n".join(lines)


class ListOverflow:
  """Examples that `make_dataset` left out of request lists because their request
  already had `list_size` examples in the block; counted once per pass over the
  data that is not cached."""

  def __init__(self):
    with tf.init_scope():  # a plain CPU variable, also when built inside a function
      self._count = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                name="list_overflow")

  def add(self, examples: tf.Tensor) -> tf.Operation:
    return self._count.assign_add(tf.cast(examples, tf.int64))

  @property
  def count(self) -> int:
    return int(self._count.numpy())


_BINARY, _FINITE, _NOT_INFINITE = 0, 1, 2


class ValueRules:
  """The schema's rules for values, checked with a few vectorized ops per block.

  Binary labels are 0 or 1 and regression labels finite, except that a label
  may be missing (NaN) where the task's mask is 0; masks are 0 or 1; event
  columns are finite; numeric features are not infinite. NaN in a numeric
  feature means "missing" (CSV converters write empty cells so): models treat
  it as the training mean. Out-of-vocabulary ids are valid; models send them to
  the OOV row (or hash them).
  """

  def __init__(self, schema: schema_lib.Schema):
    label = {c: i for i, c in enumerate(schema.labels)}
    # (what must hold, packed key, column, kind, mask column or -1); numerics first.
    rules = [(f"numeric feature {f.name} must not be infinite", schema_lib.PACKED_NUMERIC,
              i, _NOT_INFINITE, -1) for i, f in enumerate(schema.numeric)]
    for task in schema.tasks:
      if task.events:
        rules += [(f"event column {c} of task {task.name} must be a finite number",
                   schema_lib.PACKED_LABELS, label[c], _FINITE, -1) for c in task.events]
        continue
      mask, where = -1, ""
      if task.mask:
        mask, where = label[task.mask], f" (or NaN, missing, where its mask {task.mask} is 0)"
        rules.append((f"mask column {task.mask} of task {task.name} must be 0 or 1",
                      schema_lib.PACKED_LABELS, mask, _BINARY, -1))
      if task.type == schema_lib.BINARY:
        rules.append((f"label column {task.label} of binary task {task.name} must be 0 or "
                      f"1{where} (or declare the task a regression)",
                      schema_lib.PACKED_LABELS, label[task.label], _BINARY, mask))
      else:
        rules.append((f"label column {task.label} of regression task {task.name} must be "
                      f"a finite number{where}", schema_lib.PACKED_LABELS, label[task.label],
                      _FINITE, mask))
    self.descriptions = [r[0] for r in rules]
    self._numeric = [r[2] for r in rules if r[1] == schema_lib.PACKED_NUMERIC]
    self._labels = [r[2] for r in rules if r[1] == schema_lib.PACKED_LABELS]
    self._kinds = [r[3] for r in rules]
    self._masks = [r[4] for r in rules]

  def evaluate(self, packed: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
    """(values [n, rules], ok [n, rules]) of a parsed block."""
    labels = packed[schema_lib.PACKED_LABELS]
    parts = [tf.gather(labels, self._labels, axis=1)]
    if self._numeric:
      parts.insert(0, tf.gather(packed[schema_lib.PACKED_NUMERIC], self._numeric, axis=1))
    values = tf.concat(parts, axis=1)
    kinds = tf.constant(self._kinds)[None, :]
    ok = tf.where(kinds == _BINARY, tf.logical_or(values == 0.0, values == 1.0),
                  tf.where(kinds == _FINITE, tf.math.is_finite(values),
                           tf.logical_not(tf.math.is_inf(values))))
    masks = tf.constant(self._masks)
    masked_out = tf.logical_and(masks[None, :] >= 0,
                                tf.gather(labels, tf.maximum(masks, 0), axis=1) == 0.0)
    return values, tf.logical_or(ok, tf.logical_and(masked_out, tf.math.is_nan(values)))


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
                 bad_records: str = FAIL,
                 skipped: Optional[SkippedRecords] = None,
                 list_overflow: Optional[ListOverflow] = None) -> tf.data.Dataset:
  """A dataset of `(features, labels, sample_weights)` batches for Keras `fit`.

  Records are read and parsed in blocks of `shuffle_block` examples (one batched
  parse per block, in parallel), cached as parsed blocks, and shuffled at block
  granularity: each epoch visits the blocks in a new order and permutes the
  examples inside each block before cutting batches. No step costs anything per
  example after the first epoch, which is what keeps the input pipeline far
  ahead of training on a 2-core CPU. The price: examples from different blocks
  never share a batch, so data whose on-disk order is meaningful (sorted by
  time or label) should be shuffled when it is written.

  Before anything is read, every shard's framing is scanned (one fast pass
  without parsing, `integrity.scan_shards`): a file that is not a TFRecord file,
  or is compressed other than its name says, raises BadRecordError at once.

  Args:
    file_pattern: glob(s) of training-layout TFRecord shards.
    schema: the schema the shards were written with.
    batch_size: examples per batch.
    shuffle: shuffle shard order, block order and examples within blocks.
    shuffle_block: examples parsed, cached and shuffled together.
    seed: seed for every shuffle (None: fresh each run).
    cache: True caches parsed blocks in memory during the first epoch; a string
      caches to that file prefix; False reads and parses every epoch.
    check_values: check every record against `ValueRules` (labels, masks,
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
      only without shuffling; shuffled reads then take blocks as they finish
      (faster, but the order differs between runs). A resumed run needs it to
      see the batches the interrupted one would have.
    bad_records: "fail": a damaged shard raises BadRecordError here, naming file,
      record and damage; a record with a value the schema forbids stops reading
      with an InvalidArgumentError naming file, record, column and value; one
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
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if bad_records not in BAD_RECORD_POLICIES:
    raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got "
                     f"{bad_records!r}.")
  list_size = schema.list_size if group_lists is None or group_lists else None
  if group_lists and not list_size:
    raise ValueError(f"group_lists needs a ranking task (with list_size) in schema "
                     f"{schema.name!r}; its tasks are {schema.task_names}.")
  files = list_files(file_pattern)
  detect_compression(files)  # one kind per dataset
  if deterministic is None:
    deterministic = not shuffle
  if shard and isinstance(shard[1], int):  # only this reader's files are checked and read
    files, shard = files[shard[1]::shard[0]], None
  block = max(shuffle_block, batch_size)
  ds = _parsed_blocks(files, schema, block, bad_records, skipped, check_values,
                      shuffle=shuffle, seed=seed, deterministic=deterministic, shard=shard)
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
    labels, weights = split_for_tasks(schema, columns)
    if duplicate_task:
      weights[duplicate_task] = tf.ones_like(weights[duplicate_task])
    if list_mask is not None:
      weights = {task: w * list_mask for task, w in weights.items()}
    return features, labels, weights

  ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return ds.prefetch(tf.data.AUTOTUNE)


def _parsed_blocks(files: Sequence[str], schema: schema_lib.Schema, block: int,
                   bad_records: str, skipped: Optional[SkippedRecords], check_values: bool,
                   shuffle: bool, seed: Optional[int] = None, deterministic: bool = True,
                   cycle_length: Optional[int] = None,
                   shard: Optional[Tuple[int, tf.Tensor]] = None) -> tf.data.Dataset:
  """Blocks of up to `block` parsed training-layout records, checked per
  `bad_records`; with `shard` (num_shards, index tensor), of the files i with
  i mod num_shards == index only.

  Each shard is cut into blocks, the shards are interleaved block by block
  (interleaving single records costs ~5x more than parsing them), and each
  block is parsed with one `parse_example` call in parallel.
  """
  with tf.init_scope():  # eagerly, also when the dataset is built in a tf.function
    scans = integrity.scan_shards(files)
  damage = [d for scan in scans for d in scan.damage]
  if damage and bad_records == FAIL:
    raise _damaged(damage)
  if skipped is not None:
    skipped.damage.extend(damage)
  spec = schema.training_parse_spec()

  def blocks_of(path, compression, offset, count, first):
    # Shards that are whole are read with the ordinary reader; a damaged one as
    # its runs of good records, each from its byte offset.
    records = (integrity.record_dataset(path, compression, offset, count) if damage
               else tf.data.TFRecordDataset(path, compression))
    return records.batch(block).enumerate().map(
        lambda i, serialized: (path, first + i * block, serialized))

  if damage:
    runs = [(i, s.path, s.compression or "", offset, count, first)
            for i, s in enumerate(scans) for offset, count, first in s.segments]
  else:
    runs = [(i, s.path, s.compression or "", 0, -1, 0) for i, s in enumerate(scans)]
  columns = list(zip(*runs)) or [()] * 6
  sources = tf.data.Dataset.from_tensor_slices(tuple(
      tf.constant(list(c), dtype) for c, dtype in zip(
          columns, (tf.int64, tf.string, tf.string, tf.int64, tf.int64, tf.int64))))
  if shard:
    num_shards, index = shard
    sources = sources.filter(lambda i, *_: tf.equal(i % num_shards, tf.cast(index, tf.int64)))
  sources = sources.map(lambda i, *run: run)
  if shuffle:
    sources = sources.shuffle(max(len(runs), 1), seed=seed)
  ds = sources.interleave(blocks_of, cycle_length=cycle_length or min(max(len(runs), 1), 8),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

  if bad_records == FAIL:
    # A parse error names the block ("Name: <file> from record <first>"; its
    # "Index" is the record's place in it). Naming each record costs as much as
    # the parse; first_unparsable() finds the exact one after a failure.
    def parse(path, first, serialized):
      name = tf.strings.join([path, " from record ", tf.strings.as_string(first)])
      return path, first, tf.io.parse_example(
          serialized, spec, example_names=tf.fill(tf.shape(serialized), name))

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  else:
    ds = ds.interleave(_salvaging_parser(spec, skipped), cycle_length=8,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if not check_values:
    return ds.map(lambda path, first, packed: packed)
  checker = (_failing_checker(schema) if bad_records == FAIL
             else _filtering_checker(schema, skipped))
  return ds.map(checker, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _damaged(damage: List[integrity.Damage]) -> integrity.BadRecordError:
  listed = "\n  ".join(str(d) for d in damage[:5])
  more = f"\n  ... and {len(damage) - 5} more" if len(damage) > 5 else ""
  return integrity.BadRecordError(
      f"damaged TFRecords:\n  {listed}{more}\nRewrite these shards (python -m "
      "pipelines.convert), or skip damaged records with bad_records='skip' "
      "(--bad_records=skip).")


def _salvaging_parser(spec: dict, skipped: Optional[SkippedRecords]):
  """Block -> a dataset of one parsed block without the records that do not
  parse, counting them: the block is parsed at once as usual, and only if that
  fails record by record."""
  empty = {key: tf.zeros([0] + list(feature.shape), feature.dtype)
           for key, feature in spec.items()}

  def parse(path, first, serialized):
    whole = tf.data.Dataset.from_tensors(serialized).map(
        lambda s: tf.io.parse_example(s, spec)).ignore_errors()
    one_by_one = tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: tf.io.parse_single_example(s, spec)).ignore_errors().batch(
            tf.size(serialized, tf.int64))
    # take(1) is lazy: the record-by-record parse only runs when the whole
    # block failed, and `empty` stands in when no record of it parses.
    parsed = whole.concatenate(one_by_one).concatenate(
        tf.data.Dataset.from_tensors(empty)).take(1)

    def count(packed):
      rows = tf.shape(packed[next(iter(spec))], out_type=tf.int64)[0]
      with tf.control_dependencies([skipped.add(tf.size(serialized, tf.int64) - rows, 0)]):
        return path, first, {k: tf.identity(v) for k, v in packed.items()}

    return parsed.map(count if skipped is not None else lambda packed: (path, first, packed))

  return parse


def _failing_checker(schema: schema_lib.Schema):
  rules = ValueRules(schema)

  def check(path, first, packed):
    values, ok = rules.evaluate(packed)

    def fail():  # the message is built only for a block that fails
      flat = tf.argmin(tf.cast(tf.reshape(ok, [-1]), tf.int32), output_type=tf.int64)
      row, rule = flat // len(rules.descriptions), flat % len(rules.descriptions)
      message = tf.strings.join([
          "bad record in ", path, ", record ", tf.strings.as_string(first + row), ": ",
          tf.gather(rules.descriptions, rule), ", got ",
          tf.strings.as_string(values[row, rule], shortest=True),
          ". Fix the data, or skip bad records with --bad_records=skip (bad_records=skip in "
          "make_dataset)."])
      return tf.debugging.Assert(False, [message])

    with tf.control_dependencies([tf.cond(tf.reduce_all(ok), tf.no_op, fail)]):
      return {k: tf.identity(v) for k, v in packed.items()}

  return check


def _filtering_checker(schema: schema_lib.Schema, skipped: Optional[SkippedRecords]):
  rules = ValueRules(schema)

  def check(path, first, packed):
    del path, first
    keep = tf.reduce_all(rules.evaluate(packed)[1], axis=1)
    kept = {k: tf.boolean_mask(v, keep) for k, v in packed.items()}
    if skipped is None:
      return kept
    invalid = tf.reduce_sum(tf.cast(tf.logical_not(keep), tf.int64))
    with tf.control_dependencies([skipped.add(0, invalid)]):
      return {k: tf.identity(v) for k, v in kept.items()}

  return check


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


def group_by_request(block: Dict[str, tf.Tensor], list_size: int,
                     overflow: Optional[ListOverflow] = None) -> Dict[str, tf.Tensor]:
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
  for scan in integrity.scan_shards(list_files(file_pattern)):
    if scan.damage:
      raise integrity.BadRecordError("; ".join(str(d) for d in scan.damage))
    records = tf.data.TFRecordDataset(scan.path, scan.compression or "").batch(4096)
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
  """Counts records in the shards: the framing scan (one fast pass, no parsing),
  so damaged shards raise BadRecordError, as in `make_dataset`."""
  scans = integrity.scan_shards(list_files(file_pattern))
  damage = [d for scan in scans for d in scan.damage]
  if damage:
    raise _damaged(damage)
  return sum(scan.records for scan in scans)


def read_columns(file_pattern: Union[str, Sequence[str]], schema: schema_lib.Schema,
                 batch_size: int = 8192, limit: Optional[int] = None,
                 bad_records: str = FAIL,
                 skipped: Optional[SkippedRecords] = None) -> Dict[str, np.ndarray]:
  """Reads shards back into numpy columns (features and label columns), in file
  order, the first `limit` records or all; damaged and unparsable records fail
  or are skipped as `make_dataset`'s `bad_records` says (values are not
  checked). For evaluation, tests and small data; not a training path."""
  files = list_files(file_pattern)
  detect_compression(files)
  ds = _parsed_blocks(files, schema, batch_size, bad_records, skipped, check_values=False,
                      shuffle=False, cycle_length=1)
  parts, count = {}, 0
  for packed in ds:
    features, columns = schema.split_packed(packed)
    for name, value in {**features, **columns}.items():
      parts.setdefault(name, []).append(value.numpy())
    count += len(packed[schema_lib.PACKED_LABELS])
    if limit is not None and count >= limit:
      break
  return {name: np.concatenate(chunks)[:limit] for name, chunks in parts.items()}
