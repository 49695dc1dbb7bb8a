"""UCI Census-Income (KDD), set up as in the MMoE paper (Ma et al., KDD 2018, 6.3).

Group 1: income > 50K and marital status "Never married".
Group 2: education "at least college" and "Never married".
Education and marital status are removed from the inputs (and the income label,
the instance weight, are never inputs). The test file is split 1:1 at random
(seeded) into validation and test. Vocabularies and numeric statistics come from
the training file alone; categories unseen in training map to the OOV row.

"At least college" counts a completed college degree: associates, bachelors,
masters, professional school or doctorate ("Some college but no degree" does not).
"""

import csv
import gzip
import os
from typing import Dict, List

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib

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


def read_raw(path: str) -> Dict[str, np.ndarray]:
  """One census file (.gz or plain) -> string columns, spaces stripped."""
  opener = gzip.open if path.endswith(".gz") else open
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"census file {path} not found; pass the folder holding {TRAIN_FILE} and "
        f"{TEST_FILE} (UCI Census-Income (KDD)).")
  with opener(path, "rt", newline="") as f:
    rows = [r for r in csv.reader(f, skipinitialspace=True) if r]
  bad = next((i for i, r in enumerate(rows) if len(r) != len(COLUMNS)), None)
  if bad is not None:
    raise ValueError(f"{path}, line {bad + 1}: expected {len(COLUMNS)} fields, found "
                     f"{len(rows[bad])}; is this a Census-Income (KDD) file?")
  table = np.array(rows, dtype=object)
  return {name: table[:, i] for i, name in enumerate(COLUMNS)}


def label_columns(raw: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return {
      "income_50k": np.array(["50000+" in v for v in raw["income_50k"]], np.float32),
      "never_married": (raw["marital_stat"] == "Never married").astype(np.float32),
      "college": np.array([v.startswith(COLLEGE_DEGREES) for v in raw["education"]],
                          np.float32),
  }


def make_schema(group: int, vocabularies: Dict[str, List[str]]) -> schema_lib.Schema:
  if group not in GROUP_TASKS:
    raise ValueError(f"census group must be 1 or 2, got {group!r}.")
  features = [schema_lib.Feature(c, "categorical", vocab_size=len(vocabularies[c]),
                                 embedding_dim=EMBEDDING_DIM, vocabulary=vocabularies[c])
              for c in CATEGORICAL]
  features += [schema_lib.Feature(c, "numeric", transform=t) for c, t in NUMERIC.items()]
  tasks = [schema_lib.Task(name, TASK_LABELS[name]) for name in GROUP_TASKS[group]]
  return schema_lib.Schema(features, list(TASK_LABELS.values()), tasks,
                           name=f"census_income_group{group}")


def write(data_dir: str, out_dir: str, group: int = 1, seed: int = 0,
          num_shards: int = 4, compression=None, overwrite: bool = False
          ) -> schema_lib.Schema:
  """Converts the two census files to train/validation/test TFRecords + schema."""
  train_raw = read_raw(os.path.join(data_dir, TRAIN_FILE))
  test_raw = read_raw(os.path.join(data_dir, TEST_FILE))
  vocabularies, splits = {}, {"train": {}, "heldout": {}}
  for c in CATEGORICAL:
    splits["train"][c], vocabularies[c] = writer_lib.encode_vocabulary(train_raw[c])
    splits["heldout"][c], _ = writer_lib.encode_vocabulary(test_raw[c], vocabularies[c])
  for split, raw in (("train", train_raw), ("heldout", test_raw)):
    for c in NUMERIC:
      splits[split][c] = raw[c].astype(np.float64)
    splits[split].update(label_columns(raw))
  schema = writer_lib.with_numeric_statistics(make_schema(group, vocabularies),
                                              splits["train"])
  heldout = splits.pop("heldout")
  order = np.random.default_rng(seed).permutation(len(test_raw["age"]))
  half = len(order) // 2
  splits["validation"] = {k: v[order[:half]] for k, v in heldout.items()}
  splits["test"] = {k: v[order[half:]] for k, v in heldout.items()}
  with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite) as w:
    w.write_split("train", splits["train"], num_shards)
    w.write_split("validation", splits["validation"], 1)
    w.write_split("test", splits["test"], 1)
  return schema


def write_if_missing(data_dir: str, out_dir: str, group: int = 1) -> schema_lib.Schema:
  """Converts once; later calls reuse the TFRecords already in `out_dir`."""
  if not os.path.exists(os.path.join(out_dir, schema_lib.SCHEMA_FILENAME)):
    print(f"Converting {data_dir} -> {out_dir}", flush=True)
    return write(data_dir, out_dir, group=group)
  return schema_lib.Schema.load(out_dir)
