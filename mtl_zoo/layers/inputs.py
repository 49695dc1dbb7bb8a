"""From schema feature tensors to one dense vector per example."""

from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from mtl_zoo._keras import Layer, keras
from pipelines import schema as schema_lib

# Z-scores are clipped here: far beyond real data (10,000 standard deviations),
# far below where float32 activations overflow.
NUMERIC_Z_LIMIT = 1e4


def _local_ids(ids: tf.Tensor, vocab_sizes: Sequence[int], hashed: Sequence[bool]
               ) -> tf.Tensor:
  """Row of each id inside its feature's table (the last axis of `ids` runs over
  features, or `ids` holds one feature): hashed ids fold into the buckets, except
  the missing id (-1), which gets the extra row at index vocab_size, never a
  real id's bucket; other features' ids outside [0, vocab_size) go to that row
  as out-of-vocabulary."""
  sizes = vocab_sizes if len(vocab_sizes) > 1 else vocab_sizes[0]
  # One unsigned minimum does the range check: a negative id reads as a huge
  # unsigned one. Four int64 ops (two compares, and, select) cost ~4x as much.
  rows = tf.bitcast(tf.minimum(tf.bitcast(ids, tf.uint64), tf.constant(sizes, tf.uint64)),
                    tf.int64)
  if any(hashed):  # int64 floormod is slow on CPU: only pay it when a feature hashes
    sizes_t = tf.constant(sizes, tf.int64)
    folded = tf.where(ids == schema_lib.MISSING_ID, sizes_t, tf.math.floormod(ids, sizes_t))
    rows = folded if all(hashed) else tf.where(
        tf.constant(hashed if len(hashed) > 1 else hashed[0]), folded, rows)
  return rows


def _lookup(table, rows: tf.Tensor) -> tf.Tensor:
  """Rows of `table` for ids of any shape, flattened. A table split across
  parameter servers (a ShardedVariable) takes only 1-D ids, and only
  `embedding_lookup` returns its rows in the ids' order: TF 2.21's `tf.gather`
  on it returns them grouped by shard."""
  return tf.nn.embedding_lookup(table, tf.reshape(rows, [-1]))


@keras.utils.register_keras_serializable(package="mtl_zoo")
class FeatureEmbedding(Layer):
  """Embeds categorical features, pools categorical lists, normalises numerics.

  Scalar categorical features that share an embedding width live in one fused
  table and are looked up with a single gather (one offset per feature), which
  is several times faster on CPU than one Embedding layer per feature. A missing
  id (-1) of a hashed feature has its own row, apart from the buckets real ids
  hash into. Lists are pooled ("mean" or "sum") over their non-padding ids.
  Numeric features are transformed and z-scored with the statistics stored in
  the schema, so serving callers send raw values. A NaN numeric value means
  "missing" (the CSV converter writes empty cells so) and becomes the training
  mean (z = 0); infinite and absurd values are clipped to +-NUMERIC_Z_LIMIT
  standard deviations, so no input can overflow the network into NaN.

  Input: dict of feature name -> tensor, as `Schema.feature_signature()`.
  Output: [batch, output_dim] float32.

  Args:
    features: feature dicts (`pipelines.schema.Feature` fields, as
      `Feature.to_dict()` writes them); numeric ones need `mean` and `std`.
    embeddings_l2: L2 penalty on every embedding table (whole tables, not only
      the rows a batch reads); 0 adds none.
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).

  Call args:
    inputs: dict feature name -> tensor: categorical [batch] int ids,
      categorical_list [batch, max_len] int ids padded with
      `schema.LIST_PADDING_ID` (-1), numeric [batch] float raw values. Extra
      keys are ignored.

  Returns:
    [batch, output_dim] float32: first the scalar categorical embeddings,
    grouped by embedding width (widths in order of first appearance, features
    in schema order within a width), then the pooled lists, then the z-scored
    numerics, each in schema order. `output_dim` is the sum of the categorical
    embedding widths plus the number of numeric features.

  Raises:
    ValueError: no features, or a numeric feature without mean/std.
  """

  def __init__(self, features: Sequence[dict], embeddings_l2: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.features_config = [dict(f) for f in features]
    self.embeddings_l2 = embeddings_l2
    specs = [schema_lib.Feature(**f) for f in self.features_config]
    groups: Dict[int, List[schema_lib.Feature]] = {}
    for f in specs:
      if f.kind == schema_lib.CATEGORICAL:
        groups.setdefault(f.embedding_dim, []).append(f)
    # Tuples, not dicts or lists: Keras would track mutable containers as state.
    self._scalar_groups = tuple((dim, tuple(g)) for dim, g in groups.items())
    self._lists = tuple(f for f in specs if f.kind == schema_lib.CATEGORICAL_LIST)
    self._numeric = tuple(f for f in specs if f.kind == schema_lib.NUMERIC)
    for f in self._numeric:
      if f.mean is None or f.std is None:
        raise ValueError(f"numeric feature {f.name!r} has no mean/std; write the data "
                         "with a pipelines converter, which computes them.")
    if not specs:
      raise ValueError("FeatureEmbedding needs at least one feature.")

  @property
  def output_dim(self) -> int:
    """Width of the output: categorical embedding widths plus one per numeric."""
    return (sum(dim * len(g) for dim, g in self._scalar_groups)
            + sum(f.embedding_dim for f in self._lists) + len(self._numeric))

  def _regularizer(self):
    return keras.regularizers.l2(self.embeddings_l2) if self.embeddings_l2 else None

  def build(self, input_shape):
    def init():
      return keras.initializers.RandomUniform(-0.05, 0.05)

    self._tables = [
        self.add_weight(name=f"embeddings_dim{dim}",
                        shape=[sum(f.num_embedding_rows for f in group), dim],
                        initializer=init(), regularizer=self._regularizer())
        for dim, group in self._scalar_groups]
    self._list_tables = [
        self.add_weight(name=f"embeddings_{f.name}", shape=[f.num_embedding_rows, f.embedding_dim],
                        initializer=init(), regularizer=self._regularizer())
        for f in self._lists]
    super().build(input_shape)

  def call(self, inputs: Dict[str, tf.Tensor]) -> tf.Tensor:
    parts = []
    for (dim, group), table in zip(self._scalar_groups, self._tables):
      offsets = tf.constant(
          np.cumsum([0] + [f.num_embedding_rows for f in group[:-1]]), tf.int64)
      ids = tf.stack([tf.cast(inputs[f.name], tf.int64) for f in group], axis=1)
      rows = _local_ids(ids, [f.vocab_size for f in group],
                        [f.hashed for f in group]) + offsets
      parts.append(tf.reshape(_lookup(table, rows), [-1, len(group) * dim]))
    for f, table in zip(self._lists, self._list_tables):
      ids = tf.cast(inputs[f.name], tf.int64)
      present = tf.cast(ids != schema_lib.LIST_PADDING_ID, tf.float32)[..., None]
      rows = _local_ids(ids, [f.vocab_size], [f.hashed])
      vectors = tf.reshape(_lookup(table, rows), [-1, tf.shape(rows)[1], f.embedding_dim])
      pooled = tf.reduce_sum(vectors * present, axis=1)
      if f.combiner == "mean":
        pooled /= tf.maximum(tf.reduce_sum(present, axis=1), 1.0)
      parts.append(pooled)
    if self._numeric:
      values = tf.stack([tf.cast(inputs[f.name], tf.float32) for f in self._numeric], 1)
      log1p = tf.constant([f.transform == "log1p" for f in self._numeric])
      values = tf.where(log1p, tf.sign(values) * tf.math.log1p(tf.abs(values)), values)
      mean = tf.constant([f.mean for f in self._numeric], tf.float32)
      std = tf.constant([f.std for f in self._numeric], tf.float32)
      z = tf.clip_by_value((values - mean) / std, -NUMERIC_Z_LIMIT, NUMERIC_Z_LIMIT)
      parts.append(tf.where(tf.math.is_nan(z), tf.zeros_like(z), z))
    return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

  def compute_output_shape(self, input_shape):
    return tf.TensorShape([None, self.output_dim])

  def get_config(self):
    return {**super().get_config(), "features": self.features_config,
            "embeddings_l2": self.embeddings_l2}


def schema_inputs(schema: schema_lib.Schema) -> Dict[str, keras.Input]:
  """One Keras input per serving feature (train-only ones are left out), shaped
  and typed as the parse produces.

  Args:
    schema: the dataset schema.

  Returns:
    dict feature name -> `keras.Input` named after the feature, as
    `schema.feature_signature()`: categorical [batch] int64, categorical_list
    [batch, max_len] int64, numeric [batch] float32.
  """
  return {name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name)
          for name, spec in schema.feature_signature().items()}


def feature_embedding(schema: schema_lib.Schema, embeddings_l2: float = 0.0,
                      name: str = "feature_embedding") -> FeatureEmbedding:
  """The FeatureEmbedding for every serving feature of `schema` (train-only
  features feed the bias tower, `layers.BiasTower`, instead).

  Args:
    schema: the dataset schema; its numeric features need mean/std.
    embeddings_l2: L2 penalty on the embedding tables.
    name: the layer's name.

  Returns:
    An unbuilt `FeatureEmbedding`; call it on `schema_inputs(schema)` (or the
    parsed feature tensors) to get [batch, output_dim].

  Raises:
    pipelines.schema.SchemaError: a numeric feature has no mean/std.
  """
  schema.require_statistics()
  return FeatureEmbedding([f.to_dict() for f in schema.serving_features], embeddings_l2,
                          name=name)
