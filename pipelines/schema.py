"""The data contract: features, labels and tasks, and everything derived from them.

One `Schema` object produces the TFRecord layout the writer uses, the parse spec the
training reader uses, the per-feature parse spec and tensor signature the serving
signatures use, and (through `mtl_zoo`) the Keras inputs. Nothing else describes
the data, so training and serving cannot drift apart.

Two record layouts are derived from the schema:

* training layout ("packed"): every scalar categorical id in one int64 list,
  every numeric value in one float list, every label in one float list, plus one
  padded int64 list per variable-length feature. Batched parsing of a few
  fixed-length lists is ~8x faster than one feature per column, so the input
  pipeline never limits training.
* serving layout: an ordinary tf.Example with one named feature per schema
  feature and no labels -- what a caller of TF Serving writes by hand. Train-only
  features (`Feature.train_only`, e.g. the logged position) are in the training
  layout only: a server does not know them when it scores.

Feature values seen by models (both layouts parse to the same tensors):
  categorical       int64 [batch]            ids; out-of-range ids hit the OOV row;
                                             missing ones are MISSING_ID (-1)
  categorical_list  int64 [batch, max_len]   ids padded with -1
  numeric           float32 [batch]          raw values; models normalise with
                                             the mean/std stored here
"""

import dataclasses
import json
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pipelines import files

FORMAT_VERSION = 1
SCHEMA_FILENAME = "schema.json"

CATEGORICAL = "categorical"
CATEGORICAL_LIST = "categorical_list"
NUMERIC = "numeric"
FEATURE_KINDS = (CATEGORICAL, CATEGORICAL_LIST, NUMERIC)

BINARY = "binary"
REGRESSION = "regression"
RANKING = "ranking"
TASK_TYPES = (BINARY, REGRESSION, RANKING)
RANKING_LOSSES = ("listwise", "pairwise")

# Packed (training-layout) record keys. Leading underscores keep them apart from
# user feature names, which may not start with "__".
PACKED_CATEGORICAL = "__categorical__"
PACKED_NUMERIC = "__numeric__"
PACKED_LABELS = "__labels__"
PACKED_REQUEST_ID = "__request_id__"

LIST_PADDING_ID = -1
# A missing categorical id, in both layouts (serving parse default, packed
# default): the OOV row of a vocabulary feature, the missing row of a hashed one.
MISSING_ID = -1


class SchemaError(ValueError):
  """The schema file or object is malformed; the message names the field."""


@dataclasses.dataclass
class Feature:
  """One model input.

  Attributes:
    name: feature name; the tf.Example key in the serving layout.
    kind: "categorical", "categorical_list" or "numeric".
    vocab_size: categorical kinds: ids are expected in [0, vocab_size). Ids
      outside that range are looked up in one extra out-of-vocabulary row, or,
      with `hashed`, folded into vocab_size buckets.
    hashed: categorical kinds: ids are arbitrary int64 (e.g. raw user ids) and
      are hashed (modulo) into vocab_size buckets instead of using an OOV row;
      the missing id (MISSING_ID, -1) has its own extra row, apart from every
      bucket of real ids.
    embedding_dim: categorical kinds: width of the embedding.
    max_len: categorical_list: ids kept per example (longer lists truncated).
    combiner: categorical_list: "mean" or "sum" pooling over the list.
    vocabulary: optional strings for ids 0..n-1, filled by converters that map
      raw strings; lets clients send strings through the schema.
    mean, std: numeric: normalisation statistics computed when data is written.
    transform: numeric: "none" or "log1p" (applied to sign(x)*log1p(|x|)
      before normalisation; for heavy-tailed counts and money).
    train_only: categorical or numeric: known when the log is written but not
      when a server scores candidates (e.g. the position an item was shown at).
      It is in the training layout and feeds only a training-time bias tower
      (`mtl_zoo.models.with_bias_tower`) whose logit is added to the tasks it
      biases; the serving layout, signatures and model leave it out.
    bias_labels: train_only: the label columns whose observation it biases
      (e.g. ["click"] for position). The tower adds a logit to every unmasked
      binary or ranking task whose label or events include one of them. Label
      columns, not task names, because strategies and ESMM rename and replace
      tasks while the labels stay. None: every unmasked binary or ranking task
      (the engagement tasks; a masked task such as cvr is conditional on the
      biased event and never gets a bias).
  """

  name: str
  kind: str
  vocab_size: Optional[int] = None
  hashed: bool = False
  embedding_dim: Optional[int] = None
  max_len: Optional[int] = None
  combiner: str = "mean"
  vocabulary: Optional[List[str]] = None
  mean: Optional[float] = None
  std: Optional[float] = None
  transform: str = "none"
  train_only: bool = False
  bias_labels: Optional[List[str]] = None

  @property
  def is_categorical(self) -> bool:
    return self.kind in (CATEGORICAL, CATEGORICAL_LIST)

  @property
  def num_embedding_rows(self) -> int:
    """Rows of the embedding table: the vocabulary (or hash buckets) plus one
    row at index vocab_size: out-of-vocabulary ids, or, hashed, missing ones."""
    return self.vocab_size + 1

  def to_dict(self) -> dict:
    out = {"name": self.name, "kind": self.kind}
    if self.is_categorical:
      out.update(vocab_size=self.vocab_size, embedding_dim=self.embedding_dim)
      if self.hashed:
        out["hashed"] = True
      if self.kind == CATEGORICAL_LIST:
        out.update(max_len=self.max_len, combiner=self.combiner)
      if self.vocabulary is not None:
        out["vocabulary"] = list(self.vocabulary)
    else:
      out.update(mean=self.mean, std=self.std)
      if self.transform != "none":
        out["transform"] = self.transform
    if self.train_only:
      out["train_only"] = True
    if self.bias_labels is not None:
      out["bias_labels"] = list(self.bias_labels)
    return out


@dataclasses.dataclass
class Task:
  """One training objective.

  Attributes:
    name: task name; names the model output and the serving output.
    label: the label column this task learns.
    type: "binary" (sigmoid, log-loss), "regression" (linear, MSE) or
      "ranking" (linear score, a listwise or pairwise loss over the examples of
      one request; needs the schema's request_id).
    loss_weight: fixed weight of this task's loss in the total.
    mask: optional label column; the loss counts only examples where it is 1
      (e.g. CVR learned on clicked impressions only).
    events: sample weighting (binary tasks): label column -> weight, e.g.
      {"conversion": 1.0, "click": 0.2}. The target is 1 when any of these
      columns is 1, and the example weighs as its deepest (highest-weight)
      event; `label` must be one of them.
    negative_weight: with `events`, the weight of examples with no event
      (default: the smallest event weight).
    For ranking tasks `events` are relevance grades instead, e.g. {"purchase": 3,
    "cart": 2, "click": 1}: an example's relevance is the grade of its
    highest-graded event, 0 without any. Training groups each request's
    examples into lists of `list_size` (longer requests are cut, shorter ones
    padded) and applies `ranking_loss` ("listwise" softmax cross-entropy or
    "pairwise" logistic) inside each list.
  """

  name: str
  label: str
  type: str = BINARY
  loss_weight: float = 1.0
  mask: Optional[str] = None
  events: Optional[Dict[str, float]] = None
  negative_weight: Optional[float] = None
  list_size: Optional[int] = None
  ranking_loss: Optional[str] = None

  @property
  def base_weight(self) -> float:
    """Weight of an example without any event (sample-weighted tasks)."""
    if self.negative_weight is not None:
      return float(self.negative_weight)
    return float(min(self.events.values()))

  def to_dict(self) -> dict:
    out = {"name": self.name, "label": self.label, "type": self.type,
           "loss_weight": self.loss_weight}
    if self.mask:
      out["mask"] = self.mask
    if self.events:
      out["events"] = dict(self.events)
      if self.negative_weight is not None:
        out["negative_weight"] = self.negative_weight
    if self.type == RANKING:
      out["list_size"] = self.list_size
      out["ranking_loss"] = self.ranking_loss
    return out


class Schema:
  """Features, label columns and tasks, with the parse specs derived from them.

  Args:
    features: the model inputs.
    labels: the label columns, in record order.
    tasks: the training objectives.
    request_id: optional int64 column grouping the impressions of one request
      (ranking tasks, per-request metrics).
    name: the dataset's name.
    label_masks: label column -> the label column that gates it, e.g.
      {"conversion": "click"}: where the gate is 0 the label is not observed and
      may be missing (NaN; a blank CSV cell), and readers read it as 0, for every
      task that uses the column (ESMM's entire-space task, sample-weighting
      events, relevance grades). Default: each masked task's label -> its mask.
    item_id: optional categorical feature naming the ranked item (for the
      catalog coverage and novelty of the ranking report).
    item_category: optional categorical feature naming the item's category
      (for the ranking report's intra-list diversity).
  """

  def __init__(self, features: Sequence[Feature], labels: Sequence[str],
               tasks: Sequence[Task], request_id: Optional[str] = None,
               name: str = "dataset", label_masks: Optional[Dict[str, str]] = None,
               item_id: Optional[str] = None, item_category: Optional[str] = None):
    self.features = list(features)
    self.labels = list(labels)
    self.tasks = list(tasks)
    self.request_id = request_id
    self.name = name
    self.label_masks = (dict(label_masks) if label_masks is not None
                        else self._default_label_masks())
    self.item_id = item_id
    self.item_category = item_category
    self.validate()

  def _default_label_masks(self) -> Dict[str, str]:
    return {t.label: t.mask for t in self.tasks if t.mask}

  def replace(self, **changes) -> "Schema":
    """A copy with some constructor arguments changed (e.g. `tasks=[...]`); the
    rest, label_masks included, carried over."""
    args = dict(features=self.features, labels=self.labels, tasks=self.tasks,
                request_id=self.request_id, name=self.name, label_masks=self.label_masks,
                item_id=self.item_id, item_category=self.item_category)
    return Schema(**{**args, **changes})

  def gated_labels(self) -> List[Tuple[str, str]]:
    """(label column, its gate) from `label_masks`, each gate before the labels
    it gates (click before conversion before a deeper event), so that filling
    in order reads a whole funnel."""
    order: List[Tuple[str, str]] = []

    def visit(label):
      if label in self.label_masks and (label, self.label_masks[label]) not in order:
        visit(self.label_masks[label])
        order.append((label, self.label_masks[label]))

    for label in self.label_masks:
      visit(label)
    return order

  # ---------------------------------------------------------------- grouping
  @property
  def categorical(self) -> List[Feature]:
    return [f for f in self.features if f.kind == CATEGORICAL]

  @property
  def categorical_lists(self) -> List[Feature]:
    return [f for f in self.features if f.kind == CATEGORICAL_LIST]

  @property
  def numeric(self) -> List[Feature]:
    return [f for f in self.features if f.kind == NUMERIC]

  @property
  def feature_names(self) -> List[str]:
    return [f.name for f in self.features]

  @property
  def serving_features(self) -> List[Feature]:
    """The features a server sends: every feature but the train-only ones."""
    return [f for f in self.features if not f.train_only]

  @property
  def train_only_features(self) -> List[Feature]:
    return [f for f in self.features if f.train_only]

  def biased_tasks(self, feature: Feature) -> List[Task]:
    """The tasks a train-only feature biases (see `Feature.bias_labels`).

    Args:
      feature: one of this schema's train-only features.

    Returns:
      The unmasked binary and ranking tasks, in schema order; with
      `bias_labels`, only those whose label or events include one of them.
    """
    tasks = []
    for t in self.tasks:
      if t.mask or t.type not in (BINARY, RANKING):
        continue
      learned = {t.label, *(t.events or {})}
      if feature.bias_labels is None or learned & set(feature.bias_labels):
        tasks.append(t)
    return tasks

  @property
  def task_names(self) -> List[str]:
    return [t.name for t in self.tasks]

  @property
  def list_size(self) -> Optional[int]:
    """Examples per request list when a task ranks (training groups by request)."""
    sizes = {t.list_size for t in self.tasks if t.type == RANKING}
    return sizes.pop() if sizes else None

  def feature(self, name: str) -> Feature:
    for f in self.features:
      if f.name == name:
        return f
    raise SchemaError(
        f"feature {name!r} is not in schema {self.name!r}; its features are "
        f"{self.feature_names}. Add it to the schema file or drop it from the input.")

  def task(self, name: str) -> Task:
    for t in self.tasks:
      if t.name == name:
        return t
    raise SchemaError(f"task {name!r} is not in schema {self.name!r}; its tasks are "
                      f"{self.task_names}.")

  def with_tasks(self, task_names: Sequence[str]) -> "Schema":
    """A copy of this schema that keeps only the named tasks (same data layout)."""
    return self.replace(tasks=[self.task(n) for n in task_names])

  # -------------------------------------------------------------- validation
  def validate(self) -> None:
    seen = set()
    for f in self.features:
      where = f"feature {f.name!r}"
      if not f.name or f.name.startswith("__"):
        raise SchemaError(f"{where}: names must be non-empty and not start with '__'.")
      if f.name in seen:
        raise SchemaError(f"{where} is declared twice; feature names must be unique.")
      seen.add(f.name)
      if f.kind not in FEATURE_KINDS:
        raise SchemaError(f"{where}: unknown kind {f.kind!r}; use one of {FEATURE_KINDS}.")
      if f.is_categorical:
        if not isinstance(f.vocab_size, int) or f.vocab_size < 1:
          raise SchemaError(f"{where}: vocab_size must be a positive integer, got "
                            f"{f.vocab_size!r}.")
        if not isinstance(f.embedding_dim, int) or f.embedding_dim < 1:
          raise SchemaError(f"{where}: embedding_dim must be a positive integer, got "
                            f"{f.embedding_dim!r}.")
        if f.vocabulary is not None and len(f.vocabulary) > f.vocab_size:
          raise SchemaError(f"{where}: vocabulary has {len(f.vocabulary)} entries but "
                            f"vocab_size is {f.vocab_size}.")
      if f.kind == CATEGORICAL_LIST:
        if not isinstance(f.max_len, int) or f.max_len < 1:
          raise SchemaError(f"{where}: max_len must be a positive integer.")
        if f.combiner not in ("mean", "sum"):
          raise SchemaError(f"{where}: combiner must be 'mean' or 'sum'.")
      if f.train_only and f.kind == CATEGORICAL_LIST:
        raise SchemaError(f"{where}: a train_only feature must be categorical or numeric "
                          "(one id or value per example, e.g. the position).")
      if f.bias_labels is not None:
        if not f.train_only:
          raise SchemaError(f"{where}: bias_labels belong to train_only features; set "
                            "train_only: true or drop bias_labels.")
        unknown = [c for c in f.bias_labels if c not in self.labels]
        if not f.bias_labels or unknown:
          raise SchemaError(f"{where}: bias_labels must name label columns {self.labels}, "
                            f"got {f.bias_labels}.")
      if f.kind == NUMERIC:
        if f.transform not in ("none", "log1p"):
          raise SchemaError(f"{where}: transform must be 'none' or 'log1p'.")
        if f.std is not None and not (f.std > 0 and math.isfinite(f.std)):
          raise SchemaError(f"{where}: std must be a positive finite number.")
        if f.mean is not None and not math.isfinite(f.mean):
          raise SchemaError(f"{where}: mean must be a finite number.")
    if self.features and not self.serving_features:
      raise SchemaError("every feature is train_only; a server needs at least one feature "
                        "to score with.")
    if len(set(self.labels)) != len(self.labels):
      raise SchemaError(f"label columns must be unique, got {self.labels}.")
    overlap = seen & set(self.labels)
    if overlap:
      raise SchemaError(f"{sorted(overlap)} are both features and labels; a label is "
                        "never a model input.")
    if self.request_id and self.request_id in seen | set(self.labels):
      raise SchemaError(f"request_id {self.request_id!r} is also a feature or label name; "
                        "it must be its own column.")
    if not self.tasks:
      raise SchemaError("the schema declares no tasks; add at least one to 'tasks'.")
    task_names = set()
    for t in self.tasks:
      where = f"task {t.name!r}"
      if t.name in task_names:
        raise SchemaError(f"{where} is declared twice.")
      task_names.add(t.name)
      if t.type not in TASK_TYPES:
        raise SchemaError(f"{where}: unknown type {t.type!r}; use one of {TASK_TYPES}.")
      for column, role in ((t.label, "label"), (t.mask, "mask")):
        if column is not None and column not in self.labels:
          raise SchemaError(f"{where}: its {role} {column!r} is not a label column; "
                            f"label columns are {self.labels}.")
      if not (t.loss_weight >= 0 and math.isfinite(t.loss_weight)):
        raise SchemaError(f"{where}: loss_weight must be a finite number >= 0.")
      if t.type == RANKING:
        self._validate_ranking_task(t, where)
        if t.list_size != next(u for u in self.tasks if u.type == RANKING).list_size:
          raise SchemaError(f"{where}: all ranking tasks must share one list_size.")
      elif t.list_size is not None or t.ranking_loss is not None:
        raise SchemaError(f"{where}: list_size and ranking_loss belong to ranking tasks.")
      elif t.events is not None:
        unknown = [c for c in t.events if c not in self.labels]
        if t.type != BINARY or t.label not in t.events or unknown or not all(
            w > 0 and math.isfinite(w) for w in t.events.values()):
          raise SchemaError(
              f"{where}: events must map label columns to positive weights, include the "
              f"task's label, and belong to a binary task; got {t.events} "
              f"(label columns: {self.labels}).")
        if t.negative_weight is not None and not t.negative_weight > 0:
          raise SchemaError(f"{where}: negative_weight must be > 0.")
    self._validate_label_masks()
    for role in ("item_id", "item_category"):
      name = getattr(self, role)
      if name is not None and not any(f.name == name and f.kind == CATEGORICAL
                                       for f in self.features):
        raise SchemaError(f"{role} {name!r} must name a categorical feature; the "
                          f"categorical features are {[f.name for f in self.categorical]}.")

  def _validate_label_masks(self) -> None:
    if not isinstance(self.label_masks, dict):
      raise SchemaError(f"label_masks maps label columns to label columns, e.g. "
                        f"{{\"conversion\": \"click\"}}; got {self.label_masks!r}.")
    for label, gate in self.label_masks.items():
      if label not in self.labels or gate not in self.labels or label == gate:
        raise SchemaError(f"label_masks entry {label!r}: {gate!r} must map a label column "
                          f"to another label column; label columns are {self.labels}.")
    for label in self.label_masks:
      seen = [label]
      while seen[-1] in self.label_masks:
        seen.append(self.label_masks[seen[-1]])
        if seen[-1] in seen[:-1]:
          raise SchemaError(f"label_masks form a cycle {' -> '.join(seen)}; each label "
                            "column is gated by an earlier event.")

  def _validate_ranking_task(self, t: "Task", where: str) -> None:
    if not self.request_id:
      raise SchemaError(f"{where}: ranking tasks rank the examples of one request; "
                        "declare the schema's request_id column.")
    if not t.events or t.label not in t.events or any(
        c not in self.labels for c in t.events) or not all(
            g > 0 and math.isfinite(g) for g in t.events.values()):
      raise SchemaError(
          f"{where}: a ranking task's events must map label columns to positive grades "
          f"and include the task's label, e.g. {{\"conversion\": 2, \"click\": 1}}; got "
          f"{t.events} (label columns: {self.labels}).")
    if not isinstance(t.list_size, int) or t.list_size < 2:
      raise SchemaError(f"{where}: list_size must be an integer >= 2 (examples per "
                        f"request list), got {t.list_size!r}.")
    if t.ranking_loss not in RANKING_LOSSES:
      raise SchemaError(f"{where}: ranking_loss must be one of {RANKING_LOSSES}, got "
                        f"{t.ranking_loss!r}.")
    if t.mask is not None or t.negative_weight is not None:
      raise SchemaError(f"{where}: ranking tasks take no mask or negative_weight; every "
                        "example of a request is ranked.")

  def require_statistics(self) -> None:
    """Models need numeric mean/std; converters fill them when writing data."""
    for f in self.numeric:
      if f.mean is None or f.std is None:
        raise SchemaError(
            f"numeric feature {f.name!r} has no mean/std in the schema; write the data "
            "with a pipelines converter (it computes them) or fill them in by hand.")

  # ---------------------------------------------------------------- json i/o
  def to_dict(self) -> dict:
    out = {"format_version": FORMAT_VERSION, "name": self.name,
           "features": [f.to_dict() for f in self.features],
           "labels": list(self.labels),
           "tasks": [t.to_dict() for t in self.tasks]}
    if self.request_id:
      out["request_id"] = self.request_id
    if self.label_masks != self._default_label_masks():
      out["label_masks"] = dict(self.label_masks)
    for role in ("item_id", "item_category"):
      if getattr(self, role) is not None:
        out[role] = getattr(self, role)
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: dict) -> "Schema":
    if not isinstance(d, dict):
      raise SchemaError("a schema is a JSON object with 'features', 'labels', 'tasks'.")
    version = d.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
      raise SchemaError(f"schema format_version {version} is not supported; this "
                        f"version of pipelines reads format_version {FORMAT_VERSION}.")
    for key in ("features", "labels", "tasks"):
      if not isinstance(d.get(key), list):
        raise SchemaError(f"schema needs a list under {key!r}.")
    features = [_build(Feature, f, "feature") for f in d["features"]]
    tasks = [_build(Task, t, "task") for t in d["tasks"]]
    return cls(features, d["labels"], tasks, d.get("request_id"), d.get("name", "dataset"),
               d.get("label_masks"), d.get("item_id"), d.get("item_category"))

  @classmethod
  def from_json(cls, text: str) -> "Schema":
    try:
      return cls.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
      raise SchemaError(f"schema is not valid JSON: {e}") from None

  def save(self, path: str) -> None:
    """Writes the schema to `path` atomically (`files.write_text`): a crash never
    leaves a half-written file."""
    files.write_text(path, self.to_json() + "\n")

  @classmethod
  def load(cls, path: str) -> "Schema":
    if tf.io.gfile.isdir(path):
      path = files.join(path, SCHEMA_FILENAME)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(
          f"schema file {path} does not exist; converters write {SCHEMA_FILENAME} next "
          "to the TFRecords (python -m pipelines.convert), or pass --schema.")
    with tf.io.gfile.GFile(path) as f:
      try:
        return cls.from_json(f.read())
      except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None

  def __eq__(self, other) -> bool:
    return isinstance(other, Schema) and self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (f"Schema({self.name!r}, features={self.feature_names}, labels={self.labels}, "
            f"tasks={self.task_names})")

  # ------------------------------------------------------------ tensor specs
  def feature_signature(self) -> Dict[str, tf.TensorSpec]:
    """The serving model's input tensors, one per feature but the train-only ones
    (also the raw serving signature)."""
    specs = {}
    for f in self.serving_features:
      if f.kind == CATEGORICAL:
        specs[f.name] = tf.TensorSpec([None], tf.int64, name=f.name)
      elif f.kind == CATEGORICAL_LIST:
        specs[f.name] = tf.TensorSpec([None, f.max_len], tf.int64, name=f.name)
      else:
        specs[f.name] = tf.TensorSpec([None], tf.float32, name=f.name)
    return specs

  def missing_numeric_value(self, f: Feature) -> float:
    """The raw value models see as the training mean: the stored mean is taken
    after the transform, so log1p features get its inverse."""
    if f.mean is None:
      return 0.0
    if f.transform == "log1p":
      return math.copysign(math.expm1(abs(f.mean)), f.mean)
    return float(f.mean)

  def serving_parse_spec(self) -> dict:
    """One named feature per serving feature (train-only ones are not sent);
    missing values get neutral defaults (OOV id, the training mean, an empty list)."""
    spec = {}
    for f in self.serving_features:
      if f.kind == CATEGORICAL:
        spec[f.name] = tf.io.FixedLenFeature([], tf.int64, default_value=MISSING_ID)
      elif f.kind == CATEGORICAL_LIST:
        spec[f.name] = tf.io.VarLenFeature(tf.int64)
      else:
        spec[f.name] = tf.io.FixedLenFeature(
            [], tf.float32, default_value=self.missing_numeric_value(f))
    return spec

  def parse_serving_examples(self, serialized: tf.Tensor,
                             extra_spec: Optional[dict] = None) -> Dict[str, tf.Tensor]:
    """Serialized serving-layout tf.Examples [batch] -> model feature tensors
    (plus the keys of `extra_spec`, parsed in the same pass)."""
    parsed = tf.io.parse_example(serialized, {**self.serving_parse_spec(),
                                              **(extra_spec or {})})
    for f in self.categorical_lists:  # never train-only
      dense = tf.sparse.to_dense(parsed[f.name], default_value=LIST_PADDING_ID)
      dense = dense[:, :f.max_len]
      pad = f.max_len - tf.shape(dense)[1]
      parsed[f.name] = tf.pad(dense, [[0, 0], [0, pad]], constant_values=LIST_PADDING_ID)
    return parsed

  def training_parse_spec(self) -> dict:
    spec = {}
    if self.categorical:
      spec[PACKED_CATEGORICAL] = tf.io.FixedLenFeature([len(self.categorical)], tf.int64)
    if self.numeric:
      spec[PACKED_NUMERIC] = tf.io.FixedLenFeature([len(self.numeric)], tf.float32)
    spec[PACKED_LABELS] = tf.io.FixedLenFeature([len(self.labels)], tf.float32)
    for f in self.categorical_lists:
      spec[f.name] = tf.io.FixedLenFeature([f.max_len], tf.int64)
    if self.request_id:
      spec[PACKED_REQUEST_ID] = tf.io.FixedLenFeature([], tf.int64)
    return spec

  def split_packed(self, parsed: Dict[str, tf.Tensor]
                   ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """Parsed training-layout tensors -> (features by name, label columns by name).

    The label dict holds every label column (and the request id under the
    schema's request_id name, when declared).
    """
    features = {}
    if self.categorical:
      ids = tf.unstack(parsed[PACKED_CATEGORICAL], num=len(self.categorical), axis=1)
      features.update(zip((f.name for f in self.categorical), ids))
    if self.numeric:
      values = tf.unstack(parsed[PACKED_NUMERIC], num=len(self.numeric), axis=1)
      features.update(zip((f.name for f in self.numeric), values))
    for f in self.categorical_lists:
      features[f.name] = parsed[f.name]
    columns = dict(zip(self.labels,
                       tf.unstack(parsed[PACKED_LABELS], num=len(self.labels), axis=1)))
    if self.request_id:
      columns[self.request_id] = parsed[PACKED_REQUEST_ID]
    return features, columns

  def parse_training_examples(
      self, serialized: tf.Tensor
  ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """Serialized training-layout records [batch] -> (features, label columns)."""
    return self.split_packed(tf.io.parse_example(serialized, self.training_parse_spec()))

  # ---------------------------------------------------------- example makers
  def check_columns(self, columns: dict, need_labels: bool) -> int:
    """Validates a columnar batch (name -> sequence); returns its length."""
    known = set(self.feature_names) | set(self.labels) | {self.request_id}
    unknown = set(columns) - known
    if unknown:
      raise SchemaError(f"data has fields {sorted(unknown)} that schema {self.name!r} "
                        f"does not declare; its features are {self.feature_names} and "
                        f"its labels {self.labels}.")
    required = list(self.labels) + ([self.request_id] if self.request_id else [])
    missing = [c for c in required if c not in columns] if need_labels else []
    if missing:
      raise SchemaError(f"data lacks label columns {missing} declared by schema "
                        f"{self.name!r}.")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
      raise SchemaError(f"columns have different lengths {sorted(lengths)}.")
    return lengths.pop() if lengths else 0

  def pack_columns(self, columns: dict) -> Dict[str, np.ndarray]:
    """Columnar data -> the training layout's arrays (one row per example).

    Missing features get the same neutral defaults as the serving parse:
    MISSING_ID, the training mean, an empty list. A list feature's column is a
    sequence of id lists, or an int array [rows, width] padded with -1.
    """
    n = self.check_columns(columns, need_labels=True)
    packed = {}
    if self.categorical:
      packed[PACKED_CATEGORICAL] = np.stack(
          [_column(columns, f.name, n, MISSING_ID, np.int64) for f in self.categorical],
          axis=1)
    if self.numeric:
      packed[PACKED_NUMERIC] = np.stack(
          [_column(columns, f.name, n, self.missing_numeric_value(f), np.float32)
           for f in self.numeric], axis=1)
    packed[PACKED_LABELS] = np.stack(
        [np.asarray(columns[c], np.float32) for c in self.labels], axis=1)
    for f in self.categorical_lists:
      lists = columns.get(f.name, [None] * n)
      if isinstance(lists, np.ndarray) and lists.ndim == 2:  # already padded with -1
        padded = np.full((n, f.max_len), LIST_PADDING_ID, np.int64)
        width = min(f.max_len, lists.shape[1])
        padded[:, :width] = lists[:, :width]
        packed[f.name] = padded
      else:
        packed[f.name] = np.array([_pad_ids(v, f.max_len) for v in lists], np.int64)
        packed[f.name] = packed[f.name].reshape(n, f.max_len)
    if self.request_id:
      packed[PACKED_REQUEST_ID] = np.asarray(columns[self.request_id], np.int64)
    return packed

  def training_examples(self, columns: dict) -> Iterator[bytes]:
    """Columnar data -> serialized training-layout records."""
    packed = self.pack_columns(columns)
    n = len(packed[PACKED_LABELS])
    makers = {key: (_float if arr.dtype == np.float32 else _int64)
              for key, arr in packed.items()}
    for i in range(n):
      feats = {}
      for key, arr in packed.items():
        row = arr[i]
        feats[key] = makers[key](row.tolist() if row.ndim else [row.item()])
      yield tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

  def training_example(self, record: dict) -> bytes:
    """One record (feature name / label column -> value), serialized for training."""
    return next(self.training_examples({k: [v] for k, v in record.items()}))

  def serving_examples(self, columns: dict) -> List[bytes]:
    """Columnar features (as `read_columns` gives them: lists padded with -1)
    -> serialized serving-layout tf.Examples, padding and train-only features
    dropped."""
    n = self.check_columns({k: v for k, v in columns.items() if k in self.feature_names},
                           need_labels=False)
    records = []
    for i in range(n):
      record = {}
      for f in self.serving_features:
        if f.name in columns:
          value = columns[f.name][i]
          record[f.name] = ([v for v in value if v != LIST_PADDING_ID]
                            if f.kind == CATEGORICAL_LIST else value)
      records.append(self.serving_example(record))
    return records

  def serving_example(self, record: dict) -> bytes:
    """One record, serialized in the serving layout: one named feature each; labels,
    train-only features and features absent from the record left out."""
    self.check_columns({k: [v] for k, v in record.items()}, need_labels=False)
    feats = {}
    for f in self.serving_features:
      value = record.get(f.name)
      if value is None:
        continue
      if f.kind == CATEGORICAL:
        feats[f.name] = _int64([int(value)])
      elif f.kind == CATEGORICAL_LIST:
        feats[f.name] = _int64([int(v) for v in value])
      else:
        feats[f.name] = _float([float(value)])
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _column(columns, name, n, default, dtype) -> np.ndarray:
  """A column with missing values (absent column, or None cells) set to `default`."""
  if name not in columns:
    return np.full([n], default, dtype)
  values = columns[name]
  if not (isinstance(values, np.ndarray) and values.dtype != object) and any(
      v is None for v in values):
    values = [default if v is None else v for v in values]
  return np.asarray(values, dtype)


def _pad_ids(ids, max_len) -> List[int]:
  ids = [int(v) for v in (ids if ids is not None else [])][:max_len]
  return ids + [LIST_PADDING_ID] * (max_len - len(ids))


def _int64(values) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float(values) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _build(cls, d, what):
  if not isinstance(d, dict):
    raise SchemaError(f"each {what} must be a JSON object, got {d!r}.")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise SchemaError(f"{what} {d.get('name')!r}: unknown fields {sorted(unknown)}; "
                      f"known fields are {sorted(known)}.")
  if "name" not in d:
    raise SchemaError(f"a {what} has no 'name': {d!r}.")
  try:
    return cls(**d)
  except TypeError as e:
    raise SchemaError(f"{what} {d.get('name')!r}: {e}") from None
