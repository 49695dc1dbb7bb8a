"""The true probabilities behind a generated log, kept beside its shards, never
in them: what a perfect model would predict, to measure models against.

A generating source writes one file per split, `<data_dir>/oracle-<split>.npz`
(numpy's npz, no pickled objects), with one row per impression:

  request_id, position     the join key: a record's request id and its slot
  item_id                  the impression's item (per-item analysis)
  p_<label>                for each label of the funnel, P(label = 1) over all
                           impressions: p_click (position included) and
                           p_conversion (= P(click and conversion))
  p_<label>_given_<mask>   P(label = 1 | mask = 1), e.g. p_conversion_given_click
  p_click_without_position P(click) had the item been examined for sure: the
                           relevance a server should rank by (optional;
                           `position_free_name` of the funnel's first label)
  meta                     JSON: {"format_version", "key", "funnel"}; `funnel`
                           lists the label columns shallowest first, each event
                           implying the one before (a conversion needs a click)

`task_probabilities` turns the funnel into the oracle's prediction for any task
over those labels (conditional on its mask, or "any of its events").
"""

import dataclasses
import io
import json
import posixpath
import re
import zipfile
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from pipelines import files
from pipelines import schema as schema_lib
from pipelines import shards

FORMAT_VERSION = 1
KEY = ("request_id", "position")
# <split>-NNNNN-of-NNNNN.tfrecord[.gz]: the writer's shard names.
_SHARD_NAME = re.compile(r"^(.+)-\d{5}-of-\d{5}\.tfrecord(\.gz)?$")


def position_free_name(label: str) -> str:
  """The column of P(label) had the item been examined for sure."""
  return probability_name(label) + "_without_position"


def filename(split: str) -> str:
  """The oracle file's name for a split, in the dataset directory."""
  return f"oracle-{split}.npz"


def probability_name(label: str, given: Optional[str] = None) -> str:
  """The array holding P(label = 1) (or P(label = 1 | given = 1))."""
  return f"p_{label}" + (f"_given_{given}" if given else "")


@dataclasses.dataclass
class Oracle:
  """The true probabilities of one split (see the module docstring).

  Attributes:
    columns: array name -> [impressions] array.
    funnel: the label columns with a `p_<label>` array, shallowest first.
  """

  columns: Dict[str, np.ndarray]
  funnel: List[str]

  def __post_init__(self):
    missing = [name for name in (*KEY, *(probability_name(l) for l in self.funnel))
               if name not in self.columns]
    if missing:
      raise ValueError(f"an oracle needs the arrays {missing}; it has {sorted(self.columns)}.")
    lengths = {len(v) for v in self.columns.values()}
    if len(lengths) > 1:
      raise ValueError(f"oracle arrays have different lengths {sorted(lengths)}.")

  def __len__(self) -> int:
    return len(self.columns[KEY[0]])

  @classmethod
  def concatenate(cls, parts: Sequence["Oracle"]) -> "Oracle":
    """The oracle of consecutive parts (chunks) of one split."""
    return cls({name: np.concatenate([p.columns[name] for p in parts])
                for name in parts[0].columns}, list(parts[0].funnel))

  def save(self, path: str) -> None:
    """Writes the oracle to `path` (atomically, any filesystem)."""
    meta = json.dumps({"format_version": FORMAT_VERSION, "key": list(KEY),
                       "funnel": self.funnel})
    buffer = io.BytesIO()  # npz needs a seekable file; GFile may not be
    np.savez(buffer, meta=np.array(meta), **self.columns)
    with files.atomic_open(path, "wb") as f:
      f.write(buffer.getvalue())

  @classmethod
  def load(cls, path: str) -> "Oracle":
    """Reads an oracle file written by `save`.

    Raises:
      ValueError: the file is damaged or not an oracle of this format.
    """
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        arrays = {name: data[name] for name in data.files}
      meta = json.loads(str(arrays.pop("meta", "{}")))
      if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')}, not {FORMAT_VERSION}")
      return cls(arrays, list(meta["funnel"]))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, tf.errors.OpError) as e:
      raise ValueError(f"{path} is not a readable oracle ({e}); rewrite the data with "
                       "`python -m pipelines.convert --overwrite`.") from None

  def rows_of(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The oracle's row of each record, by (request id, position).

    Raises:
      KeyError: some records have no row in the oracle (naming the first).
    """
    keys = _keys(self.columns["request_id"], self.columns["position"])
    wanted = _keys(np.asarray(request_ids), np.asarray(positions))
    order = np.argsort(keys, kind="stable")
    found = np.clip(np.searchsorted(keys, wanted, sorter=order), 0, len(keys) - 1)
    rows = order[found]
    missing = np.flatnonzero(keys[rows] != wanted)
    if missing.size:
      i = missing[0]
      raise KeyError(f"{missing.size} of {len(wanted)} records have no oracle row, the "
                     f"first: request_id {request_ids[i]}, position {positions[i]}.")
    return rows

  def task_probabilities(self, task: schema_lib.Task, without_position: bool = False
                         ) -> Union[np.ndarray, str]:
    """The oracle's prediction for a task's target, or why there is none.

    Binary task with a mask: P(label | mask) (stored, or P(label) / P(mask));
    without: P(label). A task with
    events (sample weighting, ranking grades): P(any of its events), which in a
    funnel is the shallowest event's probability.

    Args:
      task: the task.
      without_position: the probability had the item been examined for sure
        (what a debiased model predicts): the position acts on the funnel's
        first event only, so P(first) is replaced by its position-free value;
        a target given that event is unchanged.

    Returns:
      [impressions] probabilities, or a string saying why the oracle has none.
    """
    found = self._task_probabilities(task)
    if not without_position or isinstance(found, str):
      return found
    first = self.funnel[0]
    if task.mask:  # given an event of the funnel: the position has done its work
      return found
    free = self.columns.get(position_free_name(first))
    if free is None:
      return f"the oracle has no {position_free_name(first)}"
    logged = self.columns[probability_name(first)]
    if found is logged:  # the first event itself: its stored position-free value
      return free
    return np.asarray(found, np.float64) * np.divide(
        free, logged, out=np.ones(len(free), np.float64), where=logged > 0)

  def _task_probabilities(self, task: schema_lib.Task) -> Union[np.ndarray, str]:
    """`task_probabilities` at the logged positions."""
    if task.type == schema_lib.REGRESSION:
      return "a regression target has no oracle probability"
    labels = list(task.events) if task.events else [task.label]
    unknown = [l for l in labels + ([task.mask] if task.mask else []) if l not in self.funnel]
    if unknown:
      return f"the oracle knows {self.funnel}, not {unknown}"
    if task.events:
      return self.columns[probability_name(min(labels, key=self.funnel.index))]
    if not task.mask:
      return self.columns[probability_name(task.label)]
    if self.funnel.index(task.mask) >= self.funnel.index(task.label):
      return f"{task.label} does not follow {task.mask} in the funnel {self.funnel}"
    if probability_name(task.label, task.mask) in self.columns:
      return self.columns[probability_name(task.label, task.mask)]
    joint, given = (self.columns[probability_name(l)] for l in (task.label, task.mask))
    return np.divide(joint, given, out=np.zeros(len(joint), np.float64),
                     where=given > 0)


def _keys(request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
  # Positions are slots of one page (< 2**16); request ids stay below 2**47.
  return request_ids.astype(np.int64) * 65536 + positions.astype(np.int64)


def splits_of(file_pattern: Union[str, Sequence[str]]) -> Dict[str, List[str]]:
  """Directory -> the splits whose shards a pattern matches (by shard name)."""
  found: Dict[str, List[str]] = {}
  for path in shards.list_files(file_pattern):
    match = _SHARD_NAME.match(posixpath.basename(path))
    split = match.group(1) if match else None
    splits = found.setdefault(posixpath.dirname(path), [])
    if split not in splits:
      splits.append(split)
  return found


def find(file_pattern: Union[str, Sequence[str]]) -> Optional[Oracle]:
  """The oracle of the data a pattern matches: the oracle files of its splits,
  beside their shards, together; None when any of them has none.

  Raises:
    FileNotFoundError: the pattern matches no file.
  """
  parts = []
  for directory, splits in splits_of(file_pattern).items():
    for split in splits:
      path = files.join(directory, filename(split)) if split else None
      if path is None or not tf.io.gfile.exists(path):
        return None
      parts.append(Oracle.load(path))
  return Oracle.concatenate(parts) if parts else None
