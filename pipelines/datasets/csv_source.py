"""A generic CSV file (with a header row) plus a user-written schema -> TFRecords.

The schema file is the ordinary schema.json format with two conveniences for
raw CSV data:
  * a categorical feature without `vocab_size` holds strings; its vocabulary is
    built from the first split (most frequent first) and written into the
    output schema, and unseen strings map to the OOV row;
  * a categorical feature with `vocab_size` holds integer ids;
  * categorical_list cells hold values separated by `list_separator` ("|").
Numeric statistics are computed from the first split. Label columns hold numbers.
"""

import csv
import json
from typing import Dict, Iterator, List, Sequence, TextIO, Tuple

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib


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


def vocabulary_tokens(kind: str, cells: Sequence[str], list_separator: str) -> List[str]:
  """The strings a feature's cells contribute to its vocabulary."""
  if kind == schema_lib.CATEGORICAL_LIST:
    return [v for cell in cells for v in cell.split(list_separator) if v]
  return [str(cell) for cell in cells]


def schema_with_vocabularies(template: dict,
                             vocabularies: Dict[str, List[str]]) -> schema_lib.Schema:
  """The template as a Schema, its string features sized by their vocabularies
  (numeric statistics still to be filled)."""
  features = [dict(f) for f in template.get("features", [])]
  for f in features:
    if f["name"] in vocabularies:
      f.update(vocab_size=max(1, len(vocabularies[f["name"]])),
               vocabulary=vocabularies[f["name"]])
  return schema_lib.Schema.from_dict({**template, "features": features})


def csv_rows(f: TextIO, path: str, needed: Sequence[str]) -> Iterator[List[str]]:
  """The needed cells of each row of an open CSV file with a header row."""
  rows = csv.DictReader(f)
  header = rows.fieldnames or []
  missing = [c for c in needed if c not in header]
  if missing:
    raise schema_lib.SchemaError(
        f"{path}: columns {missing} named in the schema are not in the CSV header "
        f"{header}.")
  for row in rows:
    yield [row[c] for c in needed]


def read_csv(path: str, needed: Sequence[str]) -> Dict[str, np.ndarray]:
  """Reads the needed columns of a CSV file with a header row, as strings."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      data = {c: [] for c in needed}
      for row in csv_rows(f, path, needed):
        for c, value in zip(needed, row):
          data[c].append(value)
  except FileNotFoundError:
    raise FileNotFoundError(f"CSV file {path} does not exist.") from None
  return {c: np.array(v, dtype=object) for c, v in data.items()}


def parse_numbers(values: Sequence[str], column: str, path: str,
                  first_row: int = 2) -> np.ndarray:
  """CSV cells -> float64, empty cells NaN; `first_row` numbers the first cell's row
  (the header is row 1) for error messages."""
  out = np.empty(len(values), np.float64)
  for i, v in enumerate(values):
    try:
      out[i] = float(v) if v != "" else np.nan
    except ValueError:
      raise ValueError(f"{path}, row {first_row + i}: column {column!r} must be a number, "
                       f"got {v!r}.") from None
  return out


def encode_columns(schema: schema_lib.Schema, data: Dict[str, Sequence[str]],
                   vocabularies: Dict[str, List[str]], path: str, list_separator: str = "|",
                   first_row: int = 2) -> Dict[str, object]:
  """CSV cells (column -> strings) -> the columns `Schema.training_examples` writes."""
  columns = {}
  for f in schema.features:
    values = data[f.name]
    if f.kind == schema_lib.NUMERIC:
      columns[f.name] = parse_numbers(values, f.name, path, first_row)
    elif f.kind == schema_lib.CATEGORICAL:
      columns[f.name] = (writer_lib.encode_vocabulary(values, vocabularies[f.name])[0]
                         if f.name in vocabularies
                         else parse_numbers(values, f.name, path, first_row).astype(np.int64))
    else:
      lists = [[v for v in cell.split(list_separator) if v] for cell in values]
      if f.name in vocabularies:
        index = {v: i for i, v in enumerate(vocabularies[f.name])}
        columns[f.name] = [[index.get(v, -1) for v in cell] for cell in lists]
      else:
        columns[f.name] = [[int(v) for v in cell] for cell in lists]
  for c in schema.labels:
    columns[c] = parse_numbers(data[c], c, path, first_row).astype(np.float32)
  if schema.request_id:
    columns[schema.request_id] = parse_numbers(data[schema.request_id], schema.request_id,
                                               path, first_row).astype(np.int64)
  return columns


def convert(template: dict, splits: Sequence[Tuple[str, str]], out_dir: str,
            list_separator: str = "|", num_shards: int = 1, compression=None,
            overwrite: bool = False) -> schema_lib.Schema:
  """Writes each (split name, csv path) as TFRecords with the completed schema."""
  if not splits:
    raise ValueError("give at least one split, e.g. train:data/train.csv.")
  raw = [(name, path, read_csv(path, needed_columns(template))) for name, path in splits]
  first = raw[0][2]
  vocabularies = {
      name: writer_lib.encode_vocabulary(vocabulary_tokens(kind, first[name],
                                                           list_separator))[1]
      for name, kind in vocabulary_features(template).items()}
  schema = schema_with_vocabularies(template, vocabularies)
  columns_by_split = [(name, encode_columns(schema, data, vocabularies, path, list_separator))
                      for name, path, data in raw]
  schema = writer_lib.with_numeric_statistics(schema, columns_by_split[0][1])
  with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite) as w:
    for i, (name, columns) in enumerate(columns_by_split):
      w.write_split(name, columns, num_shards if i == 0 else 1)
  return schema


def load_template(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"schema template {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise schema_lib.SchemaError(f"{path} is not valid JSON: {e}") from None
