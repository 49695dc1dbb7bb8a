"""Training-layout tf.train.Example records and their TFRecord framing, encoded
with numpy for a whole chunk of rows at once.

Building one `tf.train.Example` proto per row in Python caps a converter at
~35k rows/s. The training layout is a handful of packed lists per record (see
`schema.py`), so its protobuf wire format is simple enough to write directly:
every piece of every record is laid out in one padded byte matrix (one row per
record, each piece in a fixed column range, a mask marking the bytes in use),
and one boolean-mask compaction turns it into the concatenated records. The
TFRecord framing (length, masked CRC32C of the length, data, masked CRC32C of
the data) is computed the same way, column by column over all records, so a
chunk becomes one byte string written with one call.

The records are what `Schema.training_examples` writes, entry for entry: the
same map entries with the same values, serialized as protobuf's deterministic
mode does (map keys in byte order), tested byte for byte in
tests/test_pipelines.py.
"""

from typing import Dict, List, Tuple

import numpy as np

# Wire-format tags: field number << 3 | wire type (2: length-delimited).
_FIELD_1 = 0x0A  # Example.features, Features.feature (map entry), entry key, packed list
_FIELD_2 = 0x12  # map entry value, Feature.float_list
_FIELD_3 = 0x1A  # Feature.int64_list

_MAX_VARINT_BYTES = 10


def varint_lengths(values: np.ndarray) -> np.ndarray:
  """Bytes of each value's base-128 varint (1 to 10; negative int64 take 10, as
  protobuf encodes them as their two's complement), same shape as `values`."""
  v = np.asarray(values).astype(np.uint64, copy=False)
  n = np.ones(v.shape, np.int64)
  largest = int(v.max()) if v.size else 0
  for k in range(1, _MAX_VARINT_BYTES):
    if largest < 1 << (7 * k):
      break
    n += v >= np.uint64(1 << (7 * k))
  return n


def varint_bytes(values: np.ndarray, width: int) -> np.ndarray:
  """Values [...] -> their varints, left-aligned in `width` bytes [..., width];
  the bytes past a varint's length are zero. `width` must be at least the
  longest varint's length."""
  v = np.asarray(values).astype(np.uint64)
  if width == 1:  # every value below 128: the varint is the value
    return v.astype(np.uint8)[..., None]
  out = np.empty(v.shape + (width,), np.uint8)
  for k in range(width):
    rest = v >> np.uint64(7)
    out[..., k] = (v & np.uint64(0x7F)) | ((rest != 0).astype(np.uint64) << np.uint64(7))
    v = rest
  return out


class _Layout:
  """The pieces of each record in a padded byte matrix [rows, width]: each
  piece in a column range of its own, left-aligned in it; a mask marks the
  bytes in use where a piece's length varies from row to row."""

  def __init__(self, rows: int):
    self.rows = rows
    self.blocks: List[Tuple[np.ndarray, np.ndarray]] = []  # (bytes [n, w], mask or None)

  def constant(self, data: bytes) -> None:
    self.blocks.append((np.broadcast_to(np.frombuffer(data, np.uint8),
                                        (self.rows, len(data))), None))

  def fixed(self, data: np.ndarray) -> None:
    """Bytes [rows, w], all in use."""
    self.blocks.append((data, None))

  def varints(self, values: np.ndarray) -> None:
    """One varint per row of `values` [rows] or several [rows, k]."""
    values = values.reshape(self.rows, -1)
    lengths = varint_lengths(values)
    width = int(lengths.max()) if lengths.size else 1
    data = varint_bytes(values, width).reshape(self.rows, -1)
    if (lengths == width).all():
      self.blocks.append((data, None))
    else:
      mask = np.arange(width)[None, None, :] < lengths[..., None]
      self.blocks.append((data, mask.reshape(self.rows, -1)))

  def matrix(self) -> Tuple[np.ndarray, np.ndarray]:
    """(bytes [rows, width], mask [rows, width] or None where all are in use)."""
    width = sum(d.shape[1] for d, _ in self.blocks)
    data = np.empty((self.rows, width), np.uint8)
    mask = None
    column = 0
    for block, block_mask in self.blocks:
      end = column + block.shape[1]
      data[:, column:end] = block
      if block_mask is not None:
        if mask is None:
          mask = np.ones((self.rows, width), bool)
        mask[:, column:end] = block_mask
      column = end
    return data, mask


def _example_layout(packed: Dict[str, np.ndarray], layout: "_Layout") -> np.ndarray:
  """Appends the pieces of each row's serialized tf.Example to `layout`;
  returns the examples' lengths, int64 [rows]."""
  rows = layout.rows
  # Per key, sorted by bytes as protobuf's deterministic mode sorts map keys:
  # (key bytes, Feature tag, payload length [rows], values [rows, k]).
  entries = []
  for key in sorted(packed, key=lambda k: k.encode("utf-8")):
    values = np.asarray(packed[key]).reshape(rows, -1)
    if values.shape[1] == 0:
      raise ValueError(f"packed feature {key!r} has no values per record; the training "
                       "layout writes at least one.")
    if values.dtype == np.float32:
      entries.append((key.encode("utf-8"), _FIELD_2,
                      np.full(rows, 4 * values.shape[1], np.int64), values))
    elif values.dtype == np.int64:
      entries.append((key.encode("utf-8"), _FIELD_3, varint_lengths(values).sum(axis=1),
                      values))
    else:
      raise TypeError(f"packed feature {key!r} must be float32 or int64, got {values.dtype}.")
  # Lengths, innermost first: packed list (tag, length, payload), Feature (tag,
  # length, list), map entry (key field, value field), then the Features map.
  sizes = []
  features_length = np.zeros(rows, np.int64)
  for key, _, payload, _ in entries:
    list_length = 1 + varint_lengths(payload) + payload
    feature_length = 1 + varint_lengths(list_length) + list_length
    entry_length = (1 + len(_varint(len(key))) + len(key)
                    + 1 + varint_lengths(feature_length) + feature_length)
    features_length += 1 + varint_lengths(entry_length) + entry_length
    sizes.append((entry_length, feature_length, list_length))
  layout.constant(bytes([_FIELD_1]))
  layout.varints(features_length)
  for (key, tag, payload, values), (entry, feature, listed) in zip(entries, sizes):
    layout.constant(bytes([_FIELD_1]))
    layout.varints(entry)
    layout.constant(bytes([_FIELD_1]) + _varint(len(key)) + key + bytes([_FIELD_2]))
    layout.varints(feature)
    layout.constant(bytes([tag]))
    layout.varints(listed)
    layout.constant(bytes([_FIELD_1]))
    layout.varints(payload)
    if tag == _FIELD_2:
      layout.fixed(np.ascontiguousarray(values, "<f4").view(np.uint8))
    else:
      layout.varints(values)
  return 1 + varint_lengths(features_length) + features_length


def _rows_of(packed: Dict[str, np.ndarray]) -> int:
  if not packed:
    raise ValueError("a training-layout record holds at least its labels; got no arrays.")
  return len(next(iter(packed.values())))


def encode_examples(packed: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """Training-layout arrays (`Schema.pack_columns`) -> serialized tf.Examples.

  Args:
    packed: packed key -> float32 or int64 array [rows] or [rows, k], k >= 1.

  Returns:
    (data, lengths): the records concatenated, uint8 [total bytes], and each
    record's length, int64 [rows].
  """
  layout = _Layout(_rows_of(packed))
  lengths = _example_layout(packed, layout)
  data, mask = layout.matrix()
  return (data.ravel() if mask is None else data[mask]), lengths


def tfrecords(packed: Dict[str, np.ndarray]) -> bytes:
  """Training-layout arrays -> the bytes of a TFRecord file holding one
  serialized tf.Example per row: per record its length (uint64), the length's
  masked CRC32C, the example and the example's masked CRC32C, little-endian.

  Args:
    packed: as `encode_examples` takes.

  Returns:
    The framed records, to append to a TFRecord file (uncompressed).
  """
  rows = _rows_of(packed)
  body = _Layout(rows)
  lengths = _example_layout(packed, body)
  length_bytes = lengths.astype("<u8").view(np.uint8).reshape(rows, 8)
  distinct, which = np.unique(lengths, return_inverse=True)  # a few hundred at most
  length_crc = masked_crc32c(distinct.astype("<u8").view(np.uint8),
                             np.full(len(distinct), 8, np.int64))[which]
  layout = _Layout(rows)
  layout.fixed(length_bytes)
  layout.fixed(length_crc.astype("<u4").view(np.uint8).reshape(rows, 4))
  layout.blocks += body.blocks
  layout.fixed(np.zeros((rows, 4), np.uint8))  # the example's checksum, filled below
  data, mask = layout.matrix()
  if mask is None:
    examples = data[:, 12:-4].ravel()
  else:
    examples = data[:, 12:-4][mask[:, 12:-4]]
  data[:, -4:] = masked_crc32c(examples, lengths).astype("<u4").view(np.uint8).reshape(rows, 4)
  return (data if mask is None else data[mask]).tobytes()


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _crc32c_tables() -> np.ndarray:
  """Slicing-by-4 tables of CRC32C (Castagnoli, reflected): row 0 is the
  byte-at-a-time table, row s advances a byte's effect by s more bytes."""
  table = np.zeros((4, 256), np.uint32)
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table[0, byte] = crc
  for s in range(1, 4):
    table[s] = (table[s - 1] >> 8) ^ table[0][table[s - 1] & 0xFF]
  return table


_CRC_TABLES = _crc32c_tables()


def _initial_register_effect(longest: int) -> np.ndarray:
  """[m]: the CRC register after m zero bytes from the initial 0xFFFFFFFF."""
  effect = np.empty(longest + 1, np.uint32)
  crc = 0xFFFFFFFF
  for m in range(longest + 1):
    effect[m] = crc
    crc = int(_CRC_TABLES[0][crc & 0xFF]) ^ (crc >> 8)
  return effect


def masked_crc32c(data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The TFRecord checksum of each of many byte strings at once.

  The CRC register's update is linear in (register, byte), so a string's CRC is
  the CRC of its bytes from a zero register (which leading zero bytes leave at
  zero) XOR the effect of the initial register over its length. The strings
  are right-aligned in one zero-padded matrix and advanced together, four
  bytes a step.

  Args:
    data: the strings concatenated, uint8 [total].
    lengths: each string's length, int64 [n].

  Returns:
    uint32 [n]: CRC32C of each string, rotated and offset ("masked").
  """
  n = len(lengths)
  if n == 0:
    return np.zeros(0, np.uint32)
  width = -(-int(lengths.max()) // 4) * 4
  aligned = np.zeros((n, width), np.uint8)
  aligned[np.arange(width)[None, :] >= (width - lengths)[:, None]] = data
  words = np.ascontiguousarray(aligned.view("<u4").T)
  t0, t1, t2, t3 = _CRC_TABLES
  crc = np.zeros(n, np.uint32)
  for word in words:
    word = word ^ crc
    crc = t3[word & 0xFF] ^ t2[(word >> 8) & 0xFF] ^ t1[(word >> 16) & 0xFF] ^ t0[word >> 24]
  crc ^= _initial_register_effect(int(lengths.max()))[lengths] ^ np.uint32(0xFFFFFFFF)
  return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
