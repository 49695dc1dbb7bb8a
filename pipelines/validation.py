"""Bad records: the policies, the schema's value rules, and what was left out.

A record is bad when its bytes are damaged (found by the framing scan,
`integrity`), when it does not parse as the schema's training layout, or when
it holds a value the schema forbids (`ValueRules`). Under the "fail" policy the
first one stops reading with an error naming the file, the record and the fix;
under "skip" each is left out -- never the good records around it -- and
counted (`SkippedRecords`).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from pipelines import schema as schema_lib

FAIL = "fail"
SKIP = "skip"
BAD_RECORD_POLICIES = (FAIL, SKIP)


class BadRecordError(ValueError):
  """Input files or records cannot be used as given; the message names the
  file, the record and how to fix it."""


def check_policy(bad_records: str) -> None:
  """Raises ValueError unless `bad_records` is one of BAD_RECORD_POLICIES."""
  if bad_records not in BAD_RECORD_POLICIES:
    raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got "
                     f"{bad_records!r}.")


def damaged_error(damage: Sequence) -> BadRecordError:
  """The error for damaged shards under "fail": the first five places (each an
  `integrity.Damage`), and the fix."""
  listed = "\n  ".join(str(d) for d in damage[:5])
  more = f"\n  ... and {len(damage) - 5} more" if len(damage) > 5 else ""
  return BadRecordError(
      f"damaged TFRecords:\n  {listed}{more}\nRewrite these shards (python -m "
      "pipelines.convert), or skip damaged records with bad_records='skip' "
      "(--bad_records=skip).")


class SkippedRecords:
  """What `reader.make_dataset(..., bad_records="skip")` left out, by reason.

  corrupt: records whose bytes are damaged (found by the framing scan before
    reading; `damage` says where).
  unparsable: records that are not training-layout tf.Examples of the schema
    (missing or extra-long packed features, wrong types, not a tf.Example).
  invalid: records with values the schema forbids (see `ValueRules`).
  Unparsable and invalid records are counted as they are read, so once per
  pass over the data that is not cached (with the default cache: the first).
  """

  def __init__(self):
    self.damage: List = []  # integrity.Damage (integrity imports this module)
    with tf.init_scope():  # a plain CPU variable, also when built inside a function
      self._counts = tf.Variable(tf.zeros([2], tf.int64), trainable=False,
                                 name="skipped_records")

  def add(self, unparsable: tf.Tensor, invalid: tf.Tensor) -> tf.Operation:
    """Counts records left out as they are read.

    Args:
      unparsable: records of a block that did not parse (scalar).
      invalid: records of a block with values the schema forbids (scalar).

    Returns:
      The update, for control dependencies.
    """
    return self._counts.assign_add(tf.stack([tf.cast(unparsable, tf.int64),
                                             tf.cast(invalid, tf.int64)]))

  def counts(self) -> Dict[str, int]:
    """Records left out by reason, their total, and `unreadable_tails`: shards
    whose rest could not be read at all (records uncounted; see `damage`)."""
    unparsable, invalid = (int(c) for c in self._counts.numpy())
    corrupt = sum(d.records_lost or 0 for d in self.damage)
    return {"corrupt": corrupt, "unparsable": unparsable, "invalid": invalid,
            "total": corrupt + unparsable + invalid,
            "unreadable_tails": sum(d.records_lost is None for d in self.damage)}

  def summary(self, counts: Optional[Dict[str, int]] = None) -> str:
    """One line of counts (`counts()`, or a snapshot of it), then the damage."""
    counts = counts or self.counts()
    lines = [f"skipped {counts['total']} bad records ({counts['corrupt']} corrupt, "
             f"{counts['unparsable']} unparsable, {counts['invalid']} with invalid values)"
             + (f"; the rest of {counts['unreadable_tails']} shard(s) was unreadable"
                if counts["unreadable_tails"] else "")]
    lines += [f"  {d}" for d in self.damage]
    return "\n".join(lines)


class ListOverflow:
  """Examples that `reader.make_dataset` left out of request lists because their
  request already had `list_size` examples in the block; counted once per pass
  over the data that is not cached. Not bad records, but left out all the same,
  so counted and reported beside them."""

  def __init__(self):
    with tf.init_scope():  # a plain CPU variable, also when built inside a function
      self._count = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                name="list_overflow")

  def add(self, examples: tf.Tensor) -> tf.Operation:
    """Counts `examples` (scalar) left out; returns the update."""
    return self._count.assign_add(tf.cast(examples, tf.int64))

  @property
  def count(self) -> int:
    return int(self._count.numpy())


_BINARY, _FINITE, _NOT_INFINITE = 0, 1, 2


class ValueRules:
  """The schema's rules for values, checked with a few vectorized ops per block.

  Binary labels are 0 or 1 and regression labels finite, except that a label
  may be missing (NaN) where the task's mask is 0, or where its gate in the
  schema's `label_masks` is 0 (conversion unlogged without a click); masks are
  0 or 1; event columns are finite, or missing where their gate is 0; numeric
  features are not infinite. NaN in a numeric
  feature means "missing" (CSV converters write empty cells so): models treat
  it as the training mean. Out-of-vocabulary ids are valid; models send them to
  the OOV row (or hash them).

  Args:
    schema: the schema whose features, labels and tasks give the rules.
  """

  def __init__(self, schema: schema_lib.Schema):
    label = {c: i for i, c in enumerate(schema.labels)}
    # (what must hold, packed key, column, kind, mask column or -1); numerics first.
    rules = [(f"numeric feature {f.name} must not be infinite", schema_lib.PACKED_NUMERIC,
              i, _NOT_INFINITE, -1) for i, f in enumerate(schema.numeric)]
    def gate(column):
      """(gate column index or -1, what the message says about missing values)."""
      if column not in schema.label_masks:
        return -1, ""
      gate = schema.label_masks[column]
      return label[gate], f" (or NaN, missing, where {gate} is 0)"

    for task in schema.tasks:
      if task.events:
        rules += [(f"event column {c} of task {task.name} must be a finite number"
                   f"{gate(c)[1]}", schema_lib.PACKED_LABELS, label[c], _FINITE, gate(c)[0])
                  for c in task.events]
        continue
      mask, where = gate(task.label)
      if task.mask:
        mask, where = label[task.mask], f" (or NaN, missing, where its mask {task.mask} is 0)"
        rules.append((f"mask column {task.mask} of task {task.name} must be 0 or 1",
                      schema_lib.PACKED_LABELS, mask, _BINARY, -1))
      if task.type == schema_lib.BINARY:
        rules.append((f"label column {task.label} of binary task {task.name} must be 0 or "
                      f"1{where} (or declare the task a regression)",
                      schema_lib.PACKED_LABELS, label[task.label], _BINARY, mask))
      else:
        rules.append((f"label column {task.label} of regression task {task.name} must be "
                      f"a finite number{where}", schema_lib.PACKED_LABELS, label[task.label],
                      _FINITE, mask))
    self.descriptions = [r[0] for r in rules]
    self._numeric = [r[2] for r in rules if r[1] == schema_lib.PACKED_NUMERIC]
    self._labels = [r[2] for r in rules if r[1] == schema_lib.PACKED_LABELS]
    self._kinds = [r[3] for r in rules]
    self._masks = [r[4] for r in rules]

  def evaluate(self, packed: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
    """Checks a parsed block.

    Args:
      packed: parsed training-layout tensors of n records.

    Returns:
      (values [n, rules], ok [n, rules]): each rule's value and whether it holds.
    """
    labels = packed[schema_lib.PACKED_LABELS]
    parts = [tf.gather(labels, self._labels, axis=1)]
    if self._numeric:
      parts.insert(0, tf.gather(packed[schema_lib.PACKED_NUMERIC], self._numeric, axis=1))
    values = tf.concat(parts, axis=1)
    kinds = tf.constant(self._kinds)[None, :]
    ok = tf.where(kinds == _BINARY, tf.logical_or(values == 0.0, values == 1.0),
                  tf.where(kinds == _FINITE, tf.math.is_finite(values),
                           tf.logical_not(tf.math.is_inf(values))))
    masks = tf.constant(self._masks)
    masked_out = tf.logical_and(masks[None, :] >= 0,
                                tf.gather(labels, tf.maximum(masks, 0), axis=1) == 0.0)
    return values, tf.logical_or(ok, tf.logical_and(masked_out, tf.math.is_nan(values)))


def label_filler(schema: schema_lib.Schema):
  """A function packed -> packed that reads a missing (NaN) label as 0 where its
  gate in `schema.label_masks` is 0 (no conversion logged without a click), or
  None when the schema gates no label. Gates are filled first, so a whole funnel
  reads (a purchase missing where the cart column is missing for want of a
  click). A NaN where the gate is 1 stays, for `ValueRules` to refuse."""
  order = [(schema.labels.index(c), schema.labels.index(g)) for c, g in schema.gated_labels()]
  if not order:
    return None

  def fill(packed):
    columns = tf.unstack(packed[schema_lib.PACKED_LABELS], num=len(schema.labels), axis=1)
    for column, gate in order:
      columns[column] = tf.where(tf.math.is_nan(columns[column]) & (columns[gate] == 0.0),
                                 0.0, columns[column])
    return {**packed, schema_lib.PACKED_LABELS: tf.stack(columns, axis=1)}

  return fill


def failing_checker(schema: schema_lib.Schema):
  """A block map (path, first record index, packed) -> packed that stops
  reading at the first record breaking a `ValueRules` rule, with a message
  naming the file, the record, the rule, the value and the fix (built only for
  a block that fails)."""
  rules = ValueRules(schema)

  def check(path, first, packed):
    values, ok = rules.evaluate(packed)

    def fail():
      flat = tf.argmin(tf.cast(tf.reshape(ok, [-1]), tf.int32), output_type=tf.int64)
      row, rule = flat // len(rules.descriptions), flat % len(rules.descriptions)
      message = tf.strings.join([
          "bad record in ", path, ", record ", tf.strings.as_string(first + row), ": ",
          tf.gather(rules.descriptions, rule), ", got ",
          tf.strings.as_string(values[row, rule], shortest=True),
          ". Fix the data, or skip bad records with --bad_records=skip (bad_records=skip in "
          "make_dataset)."])
      return tf.debugging.Assert(False, [message])

    with tf.control_dependencies([tf.cond(tf.reduce_all(ok), tf.no_op, fail)]):
      return {k: tf.identity(v) for k, v in packed.items()}

  return check


def filtering_checker(schema: schema_lib.Schema, skipped: Optional[SkippedRecords]):
  """A block map (path, first record index, packed) -> packed without the
  records breaking a `ValueRules` rule, counted into `skipped` (if given)."""
  rules = ValueRules(schema)

  def check(path, first, packed):
    del path, first
    keep = tf.reduce_all(rules.evaluate(packed)[1], axis=1)
    kept = {k: tf.boolean_mask(v, keep) for k, v in packed.items()}
    if skipped is None:
      return kept
    invalid = tf.reduce_sum(tf.cast(tf.logical_not(keep), tf.int64))
    with tf.control_dependencies([skipped.add(0, invalid)]):
      return {k: tf.identity(v) for k, v in kept.items()}

  return check
