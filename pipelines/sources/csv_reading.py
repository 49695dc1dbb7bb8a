"""Reading CSV files with pyarrow and turning their cells into the columns
the writer takes: shared by the CSV source (csv.py), its Beam pipeline
(csv_beam.py) and the census source, so every converter writes the same records.

Files are read block by block (pyarrow's streaming CSV reader: parsing and
conversions vectorised in C++), only the columns needed; a cell that is not a
number where one is needed is named by file, row (the header is row 1) and
column. Strings become ids through vocabularies counted in bounded memory
(`TokenCounts`) and looked up block by block (`Encoder`).
"""

import io
import json
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import tensorflow as tf

from pipelines import files
from pipelines import schema as schema_lib

# Bytes pyarrow parses at once. Its streaming reader reads up to 32 such blocks
# ahead of the parser (a whole smaller file), so this bounds memory.
READ_BYTES = 1 << 20
# Bytes of parsed columns handed on at once: large enough that per-block costs
# (the vocabulary lookup's hash table among them) vanish.
BLOCK_BYTES = 16 << 20
# Value counts held before they are merged: bounds the first pass's memory
# by the vocabularies' size.
MERGE_COUNTS = 1 << 21

Cells = Union[pa.Array, pa.ChunkedArray, Sequence[Optional[str]]]


def needed_columns(template: dict) -> List[str]:
  """The CSV columns a schema template reads: features, labels, request id."""
  return ([f["name"] for f in template.get("features", [])]
          + list(template.get("labels", []))
          + ([template["request_id"]] if template.get("request_id") else []))


def vocabulary_features(template: dict) -> Dict[str, str]:
  """Name -> kind of the categorical features whose cells are strings, so whose
  vocabulary the converter builds."""
  return {f["name"]: f["kind"] for f in template.get("features", [])
          if f.get("kind") in (schema_lib.CATEGORICAL, schema_lib.CATEGORICAL_LIST)
          and "vocab_size" not in f}


def schema_with_vocabularies(template: dict,
                             vocabularies: Mapping[str, List[str]]) -> schema_lib.Schema:
  """The template as a Schema, its string features sized by their vocabularies
  (numeric statistics still to be filled)."""
  features = [dict(f) for f in template.get("features", [])]
  for f in features:
    if f["name"] in vocabularies:
      f.update(vocab_size=max(1, len(vocabularies[f["name"]])),
               vocabulary=list(vocabularies[f["name"]]))
  return schema_lib.Schema.from_dict({**template, "features": features})


def load_template(path: str) -> dict:
  """The schema template (JSON) at `path`, on any filesystem."""
  try:
    return files.read_json(path)
  except tf.errors.NotFoundError:
    raise FileNotFoundError(f"schema template {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise schema_lib.SchemaError(f"{path} is not valid JSON: {e}") from None


def parse_splits(items: Sequence[str]) -> List[Tuple[str, str]]:
  """['train:data/train-*.csv', ...] -> [(split, file pattern), ...]."""
  splits = []
  for item in items:
    name, sep, pattern = item.partition(":")
    if not sep or not name or not pattern:
      raise ValueError(f"--csv entries look like train:data/train-*.csv, got {item!r}.")
    splits.append((name, pattern))
  if not splits:
    raise ValueError("give at least one split, e.g. --csv=train:data/train.csv.")
  if len({name for name, _ in splits}) < len(splits):
    raise ValueError(f"--csv names a split twice: {[name for name, _ in splits]}.")
  return splits


def match_files(split: str, pattern: str) -> List[str]:
  """The files of one split, sorted; FileNotFoundError when there are none."""
  matched = sorted(tf.io.gfile.glob(pattern))
  if not matched:
    raise FileNotFoundError(f"split {split!r}: no CSV file matches {pattern}.")
  return matched


# ------------------------------------------------------------------- reading

class _GFileReader(io.RawIOBase):
  """A file on any TensorFlow filesystem (local, gs://, ...) as the raw binary
  stream that pyarrow reads through Python."""

  def __init__(self, path: str):
    super().__init__()
    self._file = tf.io.gfile.GFile(path, "rb")

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._file.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._file.close()
    super().close()


def _input(path: str):
  """What pyarrow reads `path` from: a stream read through Python, one block at
  a time. (Given a path or a native file, pyarrow reads the whole file ahead of
  the parser, so memory would grow with the file.)"""
  stream = pa.PythonFile(_GFileReader(path), mode="r")
  return pa.CompressedInputStream(stream, "gzip") if path.endswith(".gz") else stream


def read_blocks(path: str, columns: Sequence[str], column_names: Optional[Sequence[str]] = None,
                source=None) -> Iterator[pa.RecordBatch]:
  """The given columns of a CSV file, as strings, block by block (of about
  BLOCK_BYTES of parsed columns; memory stays bounded whatever the file's size).

  Empty cells are null. Quoted cells may hold the delimiter and newlines.

  Args:
    path: the file (local or any TensorFlow filesystem; .gz is decompressed).
    columns: the columns to read (others are skipped without conversion).
    column_names: the columns of a file without a header row (None: the
      first row is the header).
    source: an open binary file to read instead of opening `path`.

  Yields:
    RecordBatches of string columns, in `columns` order.

  Raises:
    SchemaError: a column is not in the header.
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a CSV file pyarrow can parse (named).
  """
  read_options = pa_csv.ReadOptions(block_size=READ_BYTES,
                                    column_names=list(column_names) if column_names else None)
  parse_options = pa_csv.ParseOptions(newlines_in_values=True)
  convert_options = pa_csv.ConvertOptions(
      include_columns=list(columns), column_types={c: pa.string() for c in columns},
      strings_can_be_null=True, null_values=[""])
  if source is None and not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"CSV file {path} does not exist.")
  try:
    reader = pa_csv.open_csv(source if source is not None else _input(path), read_options,
                             parse_options, convert_options)
  except pa.ArrowKeyError:
    header = pa_csv.open_csv(_input(path), pa_csv.ReadOptions(block_size=1 << 16),
                             parse_options).schema.names
    missing = [c for c in columns if c not in header]
    raise schema_lib.SchemaError(
        f"{path}: columns {missing} named in the schema are not in the CSV header "
        f"{header}.") from None
  except pa.ArrowInvalid as e:
    raise ValueError(f"{path} cannot be read as CSV: {e}") from None
  pending, size = [], 0
  while True:
    try:
      batch = reader.read_next_batch()
    except StopIteration:
      break
    except pa.ArrowInvalid as e:
      raise ValueError(f"{path} cannot be read as CSV: {e}") from None
    pending.append(batch)  # its columns in `columns` order, as include_columns gives them
    size += batch.nbytes
    if size >= BLOCK_BYTES:
      yield _joined(pending)
      pending, size = [], 0
  if pending:
    yield _joined(pending)


def _joined(batches: List[pa.RecordBatch]) -> pa.RecordBatch:
  if len(batches) == 1:
    return batches[0]
  return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


# -------------------------------------------------------- cells -> columns

def _array(cells: Cells) -> pa.Array:
  if isinstance(cells, pa.ChunkedArray):
    return cells.combine_chunks()
  return cells if isinstance(cells, pa.Array) else pa.array(cells, pa.string())


def numbers(cells: Cells, column: str, path: str, first_row: int) -> np.ndarray:
  """CSV cells -> float64, empty cells NaN.

  Args:
    cells: the cells (strings; null where empty).
    column: their column, for errors.
    path: their file, for errors.
    first_row: the row number of the first cell (the header is row 1).

  Raises:
    ValueError: a cell is not a number; names file, row, column and cell.
  """
  cells = _array(cells)
  try:
    return pc.cast(cells, pa.float64()).to_numpy(zero_copy_only=False)
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    pass
  # What pyarrow rejects, Python may take (" 12 "); else the cell is named.
  out = np.empty(len(cells), np.float64)
  for i, value in enumerate(cells.to_pylist()):
    try:
      out[i] = np.nan if value is None else float(value)
    except ValueError:
      raise ValueError(f"{path}, row {first_row + i}: column {column!r} must be a number, "
                       f"got {value!r}.") from None
  return out


def tokens(cells: Cells, kind: str, list_separator: str) -> Tuple[pa.Array, np.ndarray]:
  """The strings a categorical feature's cells hold, and the row of each.

  A categorical cell is one string (an empty cell is ""); a categorical_list
  cell holds strings separated by `list_separator`, empty ones dropped.

  Returns:
    (strings, row index of each string) in row order.
  """
  cells = pc.fill_null(_array(cells), "")
  if kind != schema_lib.CATEGORICAL_LIST:
    return cells, np.arange(len(cells))
  lists = pc.split_pattern(cells, pattern=list_separator)
  flat = pc.list_flatten(lists)
  rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
  kept = pc.not_equal(flat, "")
  return flat.filter(kept), rows[kept.to_numpy(zero_copy_only=False)]


def pad_lists(ids: np.ndarray, rows: np.ndarray, num_rows: int, max_len: int) -> np.ndarray:
  """Ids with their (ascending) rows -> int64 [num_rows, max_len]: each row's
  first max_len ids, padded with -1."""
  counts = np.bincount(rows, minlength=num_rows)
  position = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
  kept = position < max_len
  padded = np.full((num_rows, max_len), schema_lib.LIST_PADDING_ID, np.int64)
  padded[rows[kept], position[kept]] = ids[kept]
  return padded


class TokenCounts:
  """How often each string occurs, counted block by block in bounded memory
  (the strings' counts, merged whenever MERGE_COUNTS pile up)."""

  def __init__(self):
    self._parts: List[pa.Table] = []
    self._pending = 0

  def add(self, strings: pa.Array) -> None:
    """Counts `strings`."""
    counted = pc.value_counts(strings)
    self._parts.append(pa.table({"value": counted.field("values"),
                                 "count": counted.field("counts")}))
    self._pending += len(counted)
    if self._pending > MERGE_COUNTS:
      self._merge()

  def _merge(self) -> pa.Table:
    if not self._parts:
      return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    table = pa.concat_tables(self._parts).group_by("value").aggregate([("count", "sum")])
    table = table.rename_columns(["value", "count"] if table.column_names[0] == "value"
                                 else ["count", "value"]).select(["value", "count"])
    self._parts, self._pending = [table], len(table)
    return table

  def vocabulary(self) -> List[str]:
    """The strings, most frequent first, ties in string order (as
    `writer.vocabulary_from_counts`)."""
    table = self._merge()
    order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("value", "ascending")])
    return table.column("value").take(order).to_pylist()


class Encoder:
  """CSV cells of the schema's columns -> the columns `Schema.pack_columns` takes.

  Args:
    schema: the schema (with the vocabularies of its string features).
    vocabularies: string feature -> its vocabulary; features not here hold ids.
    list_separator: what separates the values of a categorical_list cell.
  """

  def __init__(self, schema: schema_lib.Schema, vocabularies: Mapping[str, List[str]],
               list_separator: str = "|"):
    self.schema = schema
    self.list_separator = list_separator
    # A lookup builds a hash table of its vocabulary: built once per block,
    # which large blocks make cheap.
    self._vocabularies = {name: pa.array(v, pa.string()) for name, v in vocabularies.items()}

  def encode(self, data: Mapping[str, Cells], path: str, first_row: int) -> Dict[str, object]:
    """One block of cells (column -> cells) -> feature and label columns.

    Args:
      data: column -> cells (strings, null or None where empty).
      path: the file they come from, for errors.
      first_row: the row number of the block's first row (the header is row 1).

    Returns:
      Columns for `Schema.pack_columns`.
    """
    columns = {}
    for f in self.schema.features:
      cells = _array(data[f.name])
      if f.kind == schema_lib.NUMERIC:
        columns[f.name] = numbers(cells, f.name, path, first_row)
      elif f.kind == schema_lib.CATEGORICAL:
        columns[f.name] = (self._lookup(f.name, tokens(cells, f.kind, "")[0])
                           if f.name in self._vocabularies
                           else numbers(cells, f.name, path, first_row).astype(np.int64))
      else:
        values, rows = tokens(cells, f.kind, self.list_separator)
        ids = (self._lookup(f.name, values) if f.name in self._vocabularies
               else self._integers(values, rows, cells, f.name, path, first_row))
        columns[f.name] = pad_lists(ids, rows, len(cells), f.max_len)
    for c in self.schema.labels:
      columns[c] = numbers(data[c], c, path, first_row).astype(np.float32)
    if self.schema.request_id:
      columns[self.schema.request_id] = numbers(data[self.schema.request_id],
                                                self.schema.request_id, path,
                                                first_row).astype(np.int64)
    return columns

  def _lookup(self, name: str, values: pa.Array) -> np.ndarray:
    found = pc.index_in(values, value_set=self._vocabularies[name])
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

  def _integers(self, values: pa.Array, rows: np.ndarray, cells: pa.Array, column: str,
                path: str, first_row: int) -> np.ndarray:
    try:
      return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      pass
    out = np.empty(len(values), np.int64)
    for i, value in enumerate(values.to_pylist()):
      try:
        out[i] = int(value)
      except ValueError:
        raise ValueError(
            f"{path}, row {first_row + rows[i]}: column {column!r} must hold integers "
            f"separated by {self.list_separator!r}, got {cells[rows[i]].as_py()!r}.") from None
    return out
