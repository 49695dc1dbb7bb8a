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
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib


def read_csv(path: str, needed: Sequence[str]) -> Dict[str, np.ndarray]:
  """Reads the needed columns of a CSV file with a header row, as strings."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = csv.DictReader(f)
      header = rows.fieldnames or []
      missing = [c for c in needed if c not in header]
      if missing:
        raise schema_lib.SchemaError(
            f"{path}: columns {missing} named in the schema are not in the CSV header "
            f"{header}.")
      data = {c: [] for c in needed}
      for row in rows:
        for c in needed:
          data[c].append(row[c])
  except FileNotFoundError:
    raise FileNotFoundError(f"CSV file {path} does not exist.") from None
  return {c: np.array(v, dtype=object) for c, v in data.items()}


def _numbers(values: np.ndarray, column: str, path: str) -> np.ndarray:
  out = np.empty(len(values), np.float64)
  for i, v in enumerate(values):
    try:
      out[i] = float(v) if v != "" else np.nan
    except ValueError:
      raise ValueError(f"{path}, row {i + 2}: column {column!r} must be a number, got "
                       f"{v!r}.") from None
  return out


def convert(template: dict, splits: Sequence[Tuple[str, str]], out_dir: str,
            list_separator: str = "|", num_shards: int = 1, compression=None,
            overwrite: bool = False) -> schema_lib.Schema:
  """Writes each (split name, csv path) as TFRecords with the completed schema."""
  if not splits:
    raise ValueError("give at least one split, e.g. train:data/train.csv.")
  features = [dict(f) for f in template.get("features", [])]
  needed = ([f["name"] for f in features] + list(template.get("labels", []))
            + ([template["request_id"]] if template.get("request_id") else []))
  raw = [(name, path, read_csv(path, needed)) for name, path in splits]
  first = raw[0][2]
  vocabularies: Dict[str, List[str]] = {}
  for f in features:
    if f.get("kind") in (schema_lib.CATEGORICAL, schema_lib.CATEGORICAL_LIST) \
        and "vocab_size" not in f:
      values = first[f["name"]]
      if f["kind"] == schema_lib.CATEGORICAL_LIST:
        values = [v for cell in values for v in cell.split(list_separator) if v]
      _, vocabularies[f["name"]] = writer_lib.encode_vocabulary(values)
      f.update(vocab_size=max(1, len(vocabularies[f["name"]])),
               vocabulary=vocabularies[f["name"]])
  schema = schema_lib.Schema.from_dict({**template, "features": features})

  columns_by_split = []
  for name, path, data in raw:
    columns = {}
    for f in schema.features:
      values = data[f.name]
      if f.kind == schema_lib.NUMERIC:
        columns[f.name] = _numbers(values, f.name, path)
      elif f.kind == schema_lib.CATEGORICAL:
        columns[f.name] = (writer_lib.encode_vocabulary(values, vocabularies[f.name])[0]
                           if f.name in vocabularies
                           else _numbers(values, f.name, path).astype(np.int64))
      else:
        lists = [[v for v in cell.split(list_separator) if v] for cell in values]
        if f.name in vocabularies:
          index = {v: i for i, v in enumerate(vocabularies[f.name])}
          columns[f.name] = [[index.get(v, -1) for v in cell] for cell in lists]
        else:
          columns[f.name] = [[int(v) for v in cell] for cell in lists]
    for c in schema.labels:
      columns[c] = _numbers(data[c], c, path).astype(np.float32)
    if schema.request_id:
      columns[schema.request_id] = _numbers(data[schema.request_id], schema.request_id,
                                            path).astype(np.int64)
    columns_by_split.append((name, columns))
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
