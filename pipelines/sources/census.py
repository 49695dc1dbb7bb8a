"""UCI Census-Income (KDD), set up as in the MMoE paper (Ma et al., KDD 2018, 6.3).

Group 1: income > 50K and marital status "Never married".
Group 2: education "at least college" and "Never married".
Education and marital status are removed from the inputs (and the income label,
the instance weight, are never inputs). The test file is split 1:1 at random
(seeded) into validation and test. Vocabularies and numeric statistics come from
the training file alone; categories unseen in training map to the OOV row.

"At least college" counts a completed college degree: associates, bachelors,
masters, professional school or doctorate ("Some college but no degree" does not).

Streamed like the CSV source (whose reader it uses): a first pass counts the
training file's vocabularies and both files' rows; a second encodes and writes.
The held-out half that goes to validation is drawn from the seed as a whole
(the same rows for the same seed); both halves keep the test file's order.
"""

import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf

from pipelines import files
from pipelines import progress as progress_lib
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import base
from pipelines.sources import csv_reading

COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race",
    "hisp_origin", "sex", "union_member", "unemp_reason", "full_or_part_emp",
    "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same",
    "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father", "country_mother",
    "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income_50k"]
NUMERIC = {"age": "none", "wage_per_hour": "log1p", "capital_gains": "log1p",
           "capital_losses": "log1p", "stock_dividends": "log1p", "num_emp": "none",
           "weeks_worked": "none"}
NOT_INPUTS = {"education", "marital_stat", "instance_weight", "income_50k"}
CATEGORICAL = [c for c in COLUMNS if c not in NUMERIC and c not in NOT_INPUTS]
COLLEGE_DEGREES = ("Associates degree", "Bachelors degree", "Masters degree",
                   "Prof school degree", "Doctorate degree")
TRAIN_FILE = "census-income.data.gz"
TEST_FILE = "census-income.test.gz"
GROUP_TASKS = {1: ("income", "marital"), 2: ("education", "marital")}
TASK_LABELS = {"income": "income_50k", "marital": "never_married",
               "education": "college"}
EMBEDDING_DIM = 4


def _trimmed(batch: pa.RecordBatch) -> Dict[str, pa.Array]:
  """A block's columns with the space after each comma removed."""
  return {name: pc.utf8_ltrim_whitespace(batch.column(i))
          for i, name in enumerate(batch.schema.names)}


def read_blocks(path: str, columns: List[str]) -> Iterator[Dict[str, pa.Array]]:
  """The given columns of one census file (.gz or plain), block by block, as
  trimmed strings (null where empty).

  Raises:
    FileNotFoundError: the file is missing (names the files needed).
    ValueError: the file is not a census file (a row of another length).
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"census file {path} not found; pass the folder holding {TRAIN_FILE} and "
        f"{TEST_FILE} (UCI Census-Income (KDD)).")
  try:
    for batch in csv_reading.read_blocks(path, columns, column_names=COLUMNS):
      yield _trimmed(batch)
  except ValueError as e:
    raise ValueError(f"{e}; is this a Census-Income (KDD) file?") from None


def label_columns(raw: Dict[str, pa.Array]) -> Dict[str, np.ndarray]:
  """The three label columns of a block of raw columns."""
  def flags(array: pa.Array) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(np.float32)

  college = pc.match_substring_regex(
      raw["education"], "^(" + "|".join(map(re.escape, COLLEGE_DEGREES)) + ")")
  return {
      "income_50k": flags(pc.match_substring(raw["income_50k"], "50000+")),
      "never_married": flags(pc.equal(raw["marital_stat"], "Never married")),
      "college": flags(college),
  }


def make_schema(group: int, vocabularies: Dict[str, List[str]]) -> schema_lib.Schema:
  """The schema of one group (1 or 2), its categorical features sized by
  `vocabularies` (numeric statistics still to be filled)."""
  if group not in GROUP_TASKS:
    raise ValueError(f"census group must be 1 or 2, got {group!r}.")
  features = [schema_lib.Feature(c, "categorical", vocab_size=len(vocabularies[c]),
                                 embedding_dim=EMBEDDING_DIM, vocabulary=vocabularies[c])
              for c in CATEGORICAL]
  features += [schema_lib.Feature(c, "numeric", transform=t) for c, t in NUMERIC.items()]
  tasks = [schema_lib.Task(name, TASK_LABELS[name]) for name in GROUP_TASKS[group]]
  return schema_lib.Schema(features, list(TASK_LABELS.values()), tasks,
                           name=f"census_income_group{group}")


class CensusSource(base.Source):
  """UCI Census-Income (KDD) as in the MMoE paper: train, validation, test."""

  name = "census"
  description = ("UCI Census-Income (KDD) as in the MMoE paper; group 1 (income, never "
                 "married) or 2 (education, never married)")
  options = (
      base.Option("census_dir", "../shared/data/census-income", str, "census: folder with "
                  "census-income.data.gz and census-income.test.gz."),
      base.Option("census_group", 1, int, "census: 1 (income, marital) or 2 (education, "
                  "marital), as in the MMoE paper."),
  )

  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, census_dir: str,
              census_group: int) -> schema_lib.Schema:
    if census_group not in GROUP_TASKS:
      raise ValueError(f"census group must be 1 or 2, got {census_group!r}.")
    train_path = files.join(census_dir, TRAIN_FILE)
    test_path = files.join(census_dir, TEST_FILE)
    vocabularies, num_train = _vocabularies(train_path)
    num_test = sum(len(block["age"]) for block in read_blocks(test_path, ["age"]))
    # The held-out half for validation, drawn as a whole from the seed.
    order = np.random.default_rng(seed).permutation(num_test)
    validation = np.zeros(num_test, bool)
    validation[order[:num_test // 2]] = True
    schema = make_schema(census_group, vocabularies)
    encode = _encoder(vocabularies)
    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split="train", verbose=True) as w:
      w.write_chunks("train", (columns for columns, _ in _encoded(train_path, encode)),
                     num_train, num_shards)
      for split, wanted, rows in (("validation", True, num_test // 2),
                                  ("test", False, num_test - num_test // 2)):
        w.write_chunks(split, ({name: values[validation[rows_read] == wanted]
                                for name, values in columns.items()}
                               for columns, rows_read in _encoded(test_path, encode)), rows)
    return w.schema


def _vocabularies(train_path: str):
  """(feature -> vocabulary, rows) of the training file."""
  counts = {c: csv_reading.TokenCounts() for c in CATEGORICAL}
  progress = progress_lib.Progress("train: counted vocabularies of")
  for raw in read_blocks(train_path, CATEGORICAL):
    for c in CATEGORICAL:
      counts[c].add(pc.fill_null(raw[c], ""))
    progress.add(len(raw[CATEGORICAL[0]]))
  progress.done()
  return {c: counts[c].vocabulary() for c in CATEGORICAL}, progress.rows


def _encoder(vocabularies: Dict[str, List[str]]) -> Callable:
  """(raw columns of a block, file, its first row) -> the schema's columns."""
  lookups = {c: pa.array(vocabulary, pa.string()) for c, vocabulary in vocabularies.items()}

  def encode(raw: Dict[str, pa.Array], path: str, first_row: int) -> Dict[str, object]:
    columns = {}
    for c in CATEGORICAL:
      found = pc.index_in(pc.fill_null(raw[c], ""), value_set=lookups[c])
      columns[c] = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    for c in NUMERIC:
      columns[c] = csv_reading.numbers(raw[c], c, path, first_row)
    columns.update(label_columns(raw))
    return columns

  return encode


def _encoded(path: str, encode: Callable) -> Iterator[Tuple[Dict[str, object], np.ndarray]]:
  """Each block of a census file, encoded, with the indices of its rows."""
  first = 0
  for raw in read_blocks(path, COLUMNS):
    n = len(raw["age"])
    yield encode(raw, path, first + 1), np.arange(first, first + n)
    first += n
