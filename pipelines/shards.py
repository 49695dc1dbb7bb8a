"""A dataset's TFRecord shards: which files, how many records, and blocks of
parsed training-layout records checked per the bad-record policy.

The layer under `reader` (training datasets) and `targets` (event counts): both
read shards through `parsed_blocks`.

Before a shard is read its framing is checked (`integrity.scan_shards`: one
pass over the shard in C++, no parsing), except where that work is already
done: a shard the converter's manifest vouches for (`manifest.vouched_counts`:
listed with the size it has now) is taken as whole under the "fail" policy,
and a shard scanned earlier in this process, unchanged since (same size and
modification time), is not scanned again -- so counting the records and then
reading them costs one pass, not two. TensorFlow's reader still checks every
record's checksum as it reads; a shard damaged in place after conversion then
fails there (a DataLossError) instead of before reading. Under "skip" every
shard not scanned before is scanned, since only the scan can locate damaged
records to step over.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from pipelines import integrity
from pipelines import manifest
from pipelines import schema as schema_lib
from pipelines import tfdata
from pipelines import validation

# path -> (size, modification time, records) of shards found whole by a scan in
# this process.
_SCANNED: Dict[str, Tuple[int, int, int]] = {}


def list_files(file_pattern: Union[str, Sequence[str]]) -> List[str]:
  """Expands one or several globs (comma-separated in a string) into sorted paths.

  Args:
    file_pattern: a glob, comma-separated globs, or a sequence of globs.

  Returns:
    The matching paths, sorted, each once.

  Raises:
    FileNotFoundError: a glob matches nothing.
  """
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
  """GZIP when every file ends in .gz, None when none does; mixed is a ValueError."""
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


def scan(files: Sequence[str], trust_manifest: bool = True) -> List[integrity.ShardScan]:
  """The framing check of each shard, reading only the shards nobody vouches for.

  Args:
    files: the shards.
    trust_manifest: take the shards the manifest vouches for as whole, unread.

  Returns:
    One ShardScan per shard, in order (damage included: callers apply their
    policy).
  """
  known = manifest.vouched_counts(files) if trust_manifest else {}
  stats = {}
  for path in files:
    if path not in known and path in _SCANNED:
      stat = tf.io.gfile.stat(path)
      size, mtime, records = _SCANNED[path]
      if (stat.length, stat.mtime_nsec) == (size, mtime):
        known[path] = records
      stats[path] = stat
  rest = [path for path in files if path not in known]
  scanned = dict(zip(rest, integrity.scan_shards(rest))) if rest else {}
  for path, result in scanned.items():
    if not result.damage:
      stat = stats.get(path) or tf.io.gfile.stat(path)
      _SCANNED[path] = (stat.length, stat.mtime_nsec, result.records)
  return [scanned[path] if path in scanned else integrity.ShardScan.whole(path, known[path])
          for path in files]


# The functions of every pipeline here are written with TensorFlow ops and no
# Python control flow on tensors: built with AutoGraph off, which saves the
# ~2 s a process spends rewriting their source (what AutoGraph does first).
# Off for everything traced inside a decorated builder, tf.functions included.
@tf.autograph.experimental.do_not_convert
def parsed_blocks(files: Sequence[str], schema: schema_lib.Schema, block: int,
                  bad_records: str, skipped: Optional[validation.SkippedRecords],
                  check_values: bool, shuffle: bool, seed: Optional[int] = None,
                  deterministic: bool = True, cycle_length: Optional[int] = None,
                  shard: Optional[Tuple[int, tf.Tensor]] = None) -> tf.data.Dataset:
  """Blocks of parsed training-layout records, checked per `bad_records`.

  Each shard is cut into blocks, the shards are interleaved block by block
  (interleaving single records costs ~5x more than parsing them), and each
  block is parsed with one `parse_example` call in parallel.

  Args:
    files: the shards.
    schema: the schema they were written with.
    block: records per block (the last of a shard may hold fewer).
    bad_records: validation.FAIL or validation.SKIP (see `reader.make_dataset`).
    skipped: with SKIP, receives the records left out (None: not counted).
    check_values: check each block against the schema's `validation.ValueRules`.
    shuffle: read the shards in a shuffled order.
    seed: seed of that order.
    deterministic: keep the order of blocks the same from run to run.
    cycle_length: shards read at once (default: up to 8).
    shard: (num_shards, index tensor): read only the files i with
      i mod num_shards == index.

  Returns:
    A dataset of dicts of packed tensors (the training parse spec's keys),
    missing labels read as 0 where their gate is 0 (`validation.label_filler`),
    with `tfdata.dataset_options()` (they hold for datasets built from it).

  Raises:
    validation.BadRecordError: under FAIL, a shard is damaged (found by the
      framing check); under both policies, a file is not a TFRecord file.
  """
  with tf.init_scope():  # eagerly, also when the dataset is built in a tf.function
    scans = scan(files, trust_manifest=bad_records == validation.FAIL)
  damage = [d for s in scans for d in s.damage]
  if damage and bad_records == validation.FAIL:
    raise validation.damaged_error(damage)
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
  sources = sources.map(lambda i, *run: run).with_options(tfdata.dataset_options())
  if shuffle:
    sources = sources.shuffle(max(len(runs), 1), seed=seed)
  ds = sources.interleave(blocks_of, cycle_length=cycle_length or min(max(len(runs), 1), 8),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

  if bad_records == validation.FAIL:
    # A parse error names the block ("Name: <file> from record <first>"; its
    # "Index" is the record's place in it). Naming each record costs as much as
    # the parse; reader.first_unparsable() finds the exact one after a failure.
    def parse(path, first, serialized):
      name = tf.strings.join([path, " from record ", tf.strings.as_string(first)])
      return path, first, tf.io.parse_example(
          serialized, spec, example_names=tf.fill(tf.shape(serialized), name))

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  else:
    ds = ds.interleave(_salvaging_parser(spec, skipped), cycle_length=8,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  fill = validation.label_filler(schema)
  if fill:
    ds = ds.map(lambda path, first, packed: (path, first, fill(packed)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if not check_values:
    return ds.map(lambda path, first, packed: packed)
  checker = (validation.failing_checker(schema) if bad_records == validation.FAIL
             else validation.filtering_checker(schema, skipped))
  return ds.map(checker, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _salvaging_parser(spec: dict, skipped: Optional[validation.SkippedRecords]):
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
