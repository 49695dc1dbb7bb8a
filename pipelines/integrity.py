"""Checks TFRecord shards before they are read: framing, checksums, compression.

TensorFlow's TFRecord reader gives up on the rest of a shard at its first
corrupt record, names neither the file nor the record, and takes a shard that
was cut inside a record header for a complete one. So every shard is scanned
first -- one pass in C++ that reads the framing and no tf.Example -- and only a
damaged shard is scanned again record by record, to say which record is damaged
and where the readable records resume after it.

Only a checksum or framing failure makes a record bad. Reading a shard can also
fail for a passing reason (a network file system's hiccup): such I/O errors are
retried READ_ATTEMPTS times with a short backoff, then reported as a
ShardReadError naming the file -- never as damage that `--bad_records=skip`
would drop good records for. TensorFlow's reader reports every framing or
checksum failure as DataLossError; any other error is I/O.
"""

import dataclasses
import gzip
import struct
import time
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pipelines import records as records_lib
from pipelines import tfdata
from pipelines import validation

# A record: uint64 length, masked CRC32C of the length, the data, masked CRC32C
# of the data.
HEADER_BYTES = 12
FOOTER_BYTES = 4
GZIP_MAGIC = b"\x1f\x8b"

# A read that fails for I/O is tried this many times in all, waiting
# RETRY_BACKOFF_S, then twice that, ... in between (0.2 + 0.4 + 0.8 s).
READ_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.2
# What the data itself causes: never retried. (gzip.BadGzipFile is an OSError.)
_DATA_ERRORS = (tf.errors.DataLossError, gzip.BadGzipFile, EOFError, zlib.error)


class ShardReadError(tf.errors.UnavailableError):
  """A shard could not be read after READ_ATTEMPTS tries (I/O, not its data);
  the message names the file. An OpError, so readers' callers report it as
  the other reading errors."""

  def __init__(self, message: str):
    super().__init__(None, None, message)


def retrying(path: str, what: str, read):
  """`read()`, tried again on I/O errors (not on the data's own faults).

  Args:
    path: the shard read, for the message.
    what: what is read, for the message (e.g. "its size").
    read: a function of no arguments.

  Returns:
    What `read` returns.

  Raises:
    ShardReadError: READ_ATTEMPTS tries failed for I/O.
    The data errors (DataLossError, GZIP errors) of `read`, at once.
  """
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except _DATA_ERRORS:
      raise
    except (tf.errors.OpError, OSError) as e:
      if attempt == READ_ATTEMPTS - 1:
        message = getattr(e, "message", None) or str(e)
        raise ShardReadError(
            f"reading {path} ({what}) failed {READ_ATTEMPTS} times, the last with "
            f"{type(e).__name__}: {message.strip()[-300:]}. This is an I/O error, not "
            "damaged data: check that the file is reachable and readable, then rerun."
        ) from None
      time.sleep(RETRY_BACKOFF_S * 2 ** attempt)


@dataclasses.dataclass(frozen=True)
class Damage:
  """One damaged place in a shard; the records before it read fine.

  Attributes:
    path: the shard.
    record: index of the damaged record in the shard.
    offset: its byte offset (in the uncompressed stream).
    problem: what is wrong, for people.
    records_lost: 1 when reading resumes after this record; None when the rest
      of the shard cannot be read (its records cannot be located or counted).
  """

  path: str
  record: int
  offset: int
  problem: str
  records_lost: Optional[int]

  def __str__(self) -> str:
    return f"{self.path}: record {self.record} (byte {self.offset}): {self.problem}"


@dataclasses.dataclass
class ShardScan:
  """A shard's readable records: `segments` of (byte offset, records, index of
  the first record), in order, and the damage between and after them."""

  path: str
  compression: Optional[str]
  records: int
  segments: List[Tuple[int, int, int]]
  damage: List[Damage]

  @classmethod
  def whole(cls, path: str, records: int) -> "ShardScan":
    """The scan of an undamaged shard of `records` records."""
    return cls(path, compression_of(path), records, [(0, records, 0)] if records else [], [])


def compression_of(path: str) -> Optional[str]:
  return "GZIP" if path.endswith(".gz") else None


def scan_shards(files: Sequence[str]) -> List[ShardScan]:
  """Scans every shard's framing (one pass over each, all in parallel).

  Args:
    files: the shards.

  Returns:
    One ShardScan per shard, in order.

  Raises:
    validation.BadRecordError: a file is not a TFRecord file at all, or is
      compressed other than its name says (.gz).
  """
  if not files:
    return []
  counts = _count_all(files)
  scans = []
  for path, count in zip(files, counts):
    compression = compression_of(path)
    if count is not None:
      records, payload = count
      end = payload + records * (HEADER_BYTES + FOOTER_BYTES)
      # TensorFlow ends a shard quietly where a record header would begin: the
      # bytes read must be the whole file (or, GZIP, the size in its trailer).
      size = retrying(path, "its size", lambda: (
          _gzip_size(path) if compression else tf.io.gfile.stat(path).length))
      if (end % 2**32 if compression else end) == size:
        scans.append(ShardScan.whole(path, records))
        continue
    scans.append(_scan_damaged(path, compression))
  return scans


def _gzip_size(path: str) -> Optional[int]:
  """The uncompressed size a GZIP file's trailer states (modulo 2**32), which a
  truncated file lacks; None for a file too short to have one."""
  size = tf.io.gfile.stat(path).length
  if size < 4:
    return None
  with tf.io.gfile.GFile(path, "rb") as f:
    f.seek(size - 4)
    return struct.unpack("<I", f.read(4))[0]


# The scan's reads are traced once per process (tf.function with fixed input
# signatures, AutoGraph off): building their tf.data pipelines anew for every shard or run cost
# more than reading a small shard.
_PATH = tf.TensorSpec([], tf.string)
_PATHS = tf.TensorSpec([None], tf.string)


def count_records(path: str, compression: str) -> Tuple[int, int]:
  """(records, payload bytes) of one shard, read to its end; raises its
  reading error."""
  n, payload = _count(tf.constant(path), tf.constant(compression))
  return int(n), int(payload)


@tf.function(input_signature=[_PATH, _PATH], autograph=False)
def _count(path: tf.Tensor, compression: tf.Tensor):
  records = tf.data.TFRecordDataset(path, compression).batch(4096)
  return records.with_options(tfdata.dataset_options()).reduce(
      (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
      lambda total, batch: (total[0] + tf.size(batch, tf.int64),
                            total[1] + tf.reduce_sum(tf.cast(tf.strings.length(batch),
                                                             tf.int64))))


def count_in_parallel(files: Sequence[str], compressions: Sequence[str]) -> list:
  """`count_records` of every shard at once; raises the first reading error."""
  if not files:
    return []
  counts = _count_each(tf.constant(list(files)), tf.constant(list(compressions)))
  return [(int(n), int(b)) for n, b in zip(*(c.numpy() for c in counts))]


@tf.function(input_signature=[_PATHS, _PATHS], autograph=False)
def _count_each(files: tf.Tensor, compressions: tf.Tensor):
  ds = tf.data.Dataset.from_tensor_slices((files, compressions)).map(
      _count, num_parallel_calls=tf.data.AUTOTUNE).with_options(tfdata.dataset_options())
  return ds.batch(tf.size(files, out_type=tf.int64)).get_single_element()


def _count_all(files: Sequence[str]) -> list:
  """(records, payload bytes) of each shard, or None for a shard whose data
  fails (framing, checksum, compression); I/O errors are retried."""
  compressions = [compression_of(f) or "" for f in files]
  try:  # every shard at once, in parallel; almost always nothing is wrong
    return count_in_parallel(files, compressions)
  except tf.errors.OpError:
    pass
  results = []
  for path, compression in zip(files, compressions):
    try:
      results.append(retrying(path, "counting its records",
                              lambda: count_records(path, compression)))
    except tf.errors.DataLossError:
      results.append(None)
  return results


def _readable_run(path: str, compression: Optional[str], offset: int) -> Tuple[int, int]:
  """(records, payload bytes) readable from `offset` up to the first damage."""
  n, payload = _run_length(tf.constant(path), tf.constant(compression or ""),
                           tf.constant(offset, tf.int64))
  return int(n), int(payload)


@tf.function(input_signature=[_PATH, _PATH, tf.TensorSpec([], tf.int64)],
             autograph=False)
def _run_length(path: tf.Tensor, compression: tf.Tensor, offset: tf.Tensor):
  # The reader ends a file at its first error; ignore_errors() turns that into
  # the end of the run.
  run = tf.data.Dataset.from_tensors(path).interleave(
      lambda p: record_dataset(p, compression, offset, -1)).ignore_errors()
  run = run.with_options(tfdata.dataset_options())
  return run.reduce(
      (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
      lambda total, r: (total[0] + 1,
                        total[1] + tf.cast(tf.strings.length(r), tf.int64)))


def record_dataset(path: tf.Tensor, compression: tf.Tensor, offset: tf.Tensor,
                   count: tf.Tensor) -> tf.data.Dataset:
  """`count` records of a shard from byte `offset` on (inside tf.data functions:
  TensorFlow cannot serialize this reader outside one)."""
  dataset = tf.raw_ops.TFRecordDatasetV2(
      filenames=tf.reshape(path, [1]), compression_type=compression,
      buffer_size=256 * 1024, byte_offsets=tf.reshape(tf.cast(offset, tf.int64), [1]))
  return tf.data.experimental.from_variant(
      dataset, tf.TensorSpec([], tf.string)).take(count)


def _scan_damaged(path: str, compression: Optional[str]) -> ShardScan:
  """Reads a shard run by run, stepping over each record whose data fails its
  checksum (its header still gives its length) until the end, or until the
  records can no longer be located. Where a run stops at an intact record (the
  reader failed for I/O), it is read again from there, READ_ATTEMPTS times at
  most."""
  magic = retrying(path, "its first bytes", lambda: _read_at(path, None, 0, 2))
  if compression and magic != GZIP_MAGIC:
    raise validation.BadRecordError(
        f"{path} ends in .gz but is not GZIP-compressed; rename it without .gz "
        "(compression follows the file name).")
  segments, damage = [], []
  offset = index = stalls = 0
  while True:
    n, payload = _readable_run(path, compression, offset)
    if n:
      segments.append((offset, n, index))
      stalls = 0
    index += n
    start = offset + payload + n * (HEADER_BYTES + FOOTER_BYTES)

    def lost(problem, records_lost=None):
      damage.append(Damage(path, index, start, problem, records_lost))

    try:
      header = retrying(path, f"the record header at byte {start}",
                        lambda: _read_at(path, compression, start, HEADER_BYTES))
      if not header:
        break
      if len(header) < HEADER_BYTES:
        if index == 0:
          _not_a_tfrecord(path, magic, f"it is {len(header)} bytes long")
        lost("the shard ends inside this record's header: it was truncated", 1)
        break
      length, = struct.unpack("<Q", header[:8])
      if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
        if index == 0:
          _not_a_tfrecord(path, magic, "its first record header fails its checksum")
        lost("the record header fails its checksum, so the records after it cannot "
             "be located; the rest of the shard is unreadable")
        break
      body = retrying(path, f"the record at byte {start}", lambda: _read_at(
          path, compression, start + HEADER_BYTES, length + FOOTER_BYTES))
    except _DATA_ERRORS as e:  # GZIP streams
      lost(f"the GZIP stream is corrupt here ({e}); the rest of the shard is unreadable")
      break
    if len(body) < length + FOOTER_BYTES:
      lost("the shard ends inside this record: it was truncated", 1)
      break
    if masked_crc32c(body[:length]) == struct.unpack("<I", body[length:])[0]:
      # The record is intact: the reader stopped here for I/O. Read on from it.
      stalls += 1
      if stalls == READ_ATTEMPTS:
        raise ShardReadError(
            f"reading {path} stopped {READ_ATTEMPTS} times at record {index} (byte "
            f"{start}), which is intact: an I/O error, not damaged data. Check that the "
            "file is reachable and readable, then rerun.")
      time.sleep(RETRY_BACKOFF_S * 2 ** (stalls - 1))
      offset = start
      continue
    lost("the record's data fails its checksum (corrupted)", 1)
    index += 1
    offset = start + HEADER_BYTES + length + FOOTER_BYTES
  return ShardScan(path, compression, sum(n for _, n, _ in segments), segments, damage)


def _read_at(path: str, compression: Optional[str], offset: int, size: int) -> bytes:
  """`size` bytes from `offset` of the (uncompressed) stream; fewer at its end."""
  with _open_stream(path, compression) as stream:
    stream.seek(offset)
    return stream.read(size)


def _open_stream(path: str, compression: Optional[str]):
  raw = tf.io.gfile.GFile(path, "rb")
  return gzip.GzipFile(fileobj=raw, mode="rb") if compression else raw


def _not_a_tfrecord(path: str, magic: bytes, why: str) -> None:
  if magic == GZIP_MAGIC:
    raise validation.BadRecordError(
        f"{path} is GZIP-compressed but its name does not end in .gz; rename it to "
        "end in .gz (compression follows the file name).")
  raise validation.BadRecordError(
      f"{path} is not a TFRecord file ({why}). Convert raw data (CSV, ...) with "
      "`python -m pipelines.convert`; a TFRecord file that fails here is damaged from "
      "its start and must be rewritten.")


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum of `data`: CRC32C, rotated and offset ("masked")."""
  return int(records_lib.masked_crc32c(np.frombuffer(data, np.uint8),
                                       np.array([len(data)], np.int64))[0])
