"""Hostile and broken input: damaged shards, bad records, contradictory flags,
and fuzzing of the reader and the serving signature.

Every fault ends in an error that names the file, record, column or flag and the
fix, or in a documented handling checked here (BUILD_NOTES.md, "Hostile input",
lists them with these tests). Schema faults are in test_schema.py.
"""

import gzip
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import mtl_zoo
from conftest import mixed_columns, mixed_schema, run_cli_cases
from mtl_zoo import layers, serving as serving_lib
from pipelines import integrity, reader, validation
from pipelines import schema as schema_lib

SCHEMA = mixed_schema()
# Fuzzing: the hypothesis profile of conftest.py sets how many examples (100 per
# property in CI), reproducibly, with a deadline per example.


def _records(n: int, seed: int = 0) -> list:
  return list(SCHEMA.training_examples(mixed_columns(n, seed)))


def _record(seed: int = 0, **values) -> bytes:
  """One valid training-layout record with some values replaced."""
  row = {k: v[0] for k, v in mixed_columns(1, seed).items()}
  return SCHEMA.training_example({**row, **values})


def _replaced(record: bytes, key: str, feature) -> bytes:
  """The record with one packed feature replaced (None: removed)."""
  example = tf.train.Example.FromString(record)
  if feature is None:
    del example.features.feature[key]
  else:
    example.features.feature[key].CopyFrom(feature)
  return example.SerializeToString()


def _write(path, records, compression=None) -> str:
  with tf.io.TFRecordWriter(str(path), tf.io.TFRecordOptions(compression or "")) as w:
    for r in records:
      w.write(r)
  return str(path)


def _starts(data: bytes) -> list:
  """Byte offset of every record of an uncompressed shard."""
  starts, offset = [], 0
  while offset < len(data):
    starts.append(offset)
    offset += 16 + struct.unpack("<Q", data[offset:offset + 8])[0]
  return starts


# tf.data rewrites a pipeline's graph each time an iterator is made (~0.1 s
# here); the rewrites change speed, not what is read.
_NO_REWRITES = tf.data.Options()
_NO_REWRITES.experimental_optimization.apply_default_optimizations = False


def _one_pass(dataset: tf.data.Dataset) -> list:
  """A pass over a make_dataset dataset, as a list of one batch holding every
  example (none if nothing was read). `get_single_element` runs the pass in one
  op: iterating from Python costs ~0.25 s of CPU a pass (making the iterator),
  this ~0.01 s, which lets the fuzz properties run 100 examples in CI."""
  try:
    return [dataset.unbatch().batch(1 << 20).with_options(_NO_REWRITES)
            .get_single_element()]
  except tf.errors.InvalidArgumentError as e:
    if "Dataset was empty" not in str(e):
      raise
    return []  # every record left out


def _read(pattern, bad_records="fail", schema=SCHEMA, **kwargs):
  """(raw_id of every example read, in order, SkippedRecords)."""
  skipped = validation.SkippedRecords()
  ds = reader.make_dataset(pattern, schema, 16, shuffle=False, shuffle_block=16,
                           bad_records=bad_records, skipped=skipped, **kwargs)
  ids = [i for features, _, _ in _one_pass(ds) for i in features["raw_id"].numpy().tolist()]
  return ids, skipped


def _raw_ids(records) -> list:
  return [tf.train.Example.FromString(r).features.feature[schema_lib.PACKED_CATEGORICAL]
          .int64_list.value[1] for r in records]  # raw_id is the second categorical


# --------------------------------------------------------------- damaged shards

def _flip(data, starts, record, byte):
  out = bytearray(data)
  out[starts[record] + byte] ^= 0xFF
  return bytes(out)


DAMAGE = {  # name: (damage an uncompressed shard, record named, problem named)
    "data checksum": (lambda d, s: _flip(d, s, 7, 20), 7, "data fails its checksum"),
    "header checksum": (lambda d, s: _flip(d, s, 7, 2), 7, "header fails its checksum"),
    "truncated in a record": (lambda d, s: d[:-5], 29, "ends inside this record"),
    "truncated in a header": (lambda d, s: d[:s[-1] + 5], 29, "ends inside this record's header"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shard_fails_before_reading_naming_file_record_and_fix(damage, tmp_path):
  records = _records(30)
  data = open(_write(tmp_path / "a.tfrecord", records), "rb").read()
  hurt, record, problem = DAMAGE[damage]
  path = tmp_path / "train.tfrecord"
  path.write_bytes(hurt(data, _starts(data)))
  # TensorFlow alone ends a shard cut inside a header silently, as if complete.
  with pytest.raises(validation.BadRecordError,
                     match=f"(?s){re.escape(str(path))}: record {record} .*{problem}"
                           ".*Rewrite these shards.*--bad_records=skip"):
    reader.make_dataset(str(path), SCHEMA, 8)


def test_skip_steps_over_each_damaged_record_exactly(tmp_path):
  records = _records(40)
  data = open(_write(tmp_path / "a.tfrecord", records), "rb").read()
  starts = _starts(data)
  hurt = _flip(_flip(data, starts, 3, 30), starts, 20, 30)[:-3]  # and a truncated last one
  (tmp_path / "train.tfrecord").write_bytes(hurt)
  ids, skipped = _read(str(tmp_path / "train.tfrecord"), "skip")
  expected = [r for i, r in enumerate(_raw_ids(records)) if i not in (3, 20, 39)]
  assert ids == expected  # nothing else lost, in file order
  assert skipped.counts() == {"corrupt": 3, "unparsable": 0, "invalid": 0, "total": 3,
                              "unreadable_tails": 0}
  assert [d.record for d in skipped.damage] == [3, 20, 39]


def test_skip_reports_a_shard_whose_rest_cannot_be_located(tmp_path):
  records = _records(30)
  data = open(_write(tmp_path / "a.tfrecord", records), "rb").read()
  (tmp_path / "train.tfrecord").write_bytes(_flip(data, _starts(data), 12, 1))
  ids, skipped = _read(str(tmp_path / "train.tfrecord"), "skip")
  assert ids == _raw_ids(records)[:12]
  assert skipped.counts()["unreadable_tails"] == 1
  assert "the rest of 1 shard(s) was unreadable" in skipped.summary()
  assert "record 12 (byte" in skipped.summary()


def test_damaged_gzip_shard_is_named_and_its_readable_part_skipped_to(tmp_path):
  records = _records(30)
  data = open(_write(tmp_path / "a.tfrecord.gz", records, "GZIP"), "rb").read()
  path = tmp_path / "train.tfrecord.gz"
  # TensorFlow alone reads some truncated GZIP shards quietly as complete ones.
  for cut in range(20, len(data), len(data) // 12):
    path.write_bytes(data[:cut])
    assert integrity.scan_shards([str(path)])[0].damage, cut
  path.write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(validation.BadRecordError, match=f"{re.escape(str(path))}: record .*GZIP"):
    reader.make_dataset(str(path), SCHEMA, 8)
  ids, skipped = _read(str(path), "skip")
  assert 0 < len(ids) < 30 and ids == _raw_ids(records)[:len(ids)]
  assert skipped.counts()["unreadable_tails"] == 1


def _flaky(real, failures):
  """`real`, failing with an I/O error on its first `failures` calls (all with
  None); counts its calls."""
  def read(*args):
    read.calls += 1
    if failures is None or read.calls <= failures:
      raise tf.errors.UnavailableError(None, None, "connection reset by peer")
    return real(*args)
  read.calls = 0
  return read


def _parallel_pass_hiccups(*args):
  raise tf.errors.UnavailableError(None, None, "connection reset by peer")


def test_scan_retries_an_io_error_and_loses_no_record(tmp_path, monkeypatch):
  records = _records(30)
  path = _write(tmp_path / "train.tfrecord", records)
  monkeypatch.setattr(integrity, "RETRY_BACKOFF_S", 0.0)
  monkeypatch.setattr(integrity, "count_in_parallel", _parallel_pass_hiccups)
  flaky = _flaky(integrity.count_records, failures=2)
  monkeypatch.setattr(integrity, "count_records", flaky)
  ids, skipped = _read(path, "skip")
  assert flaky.calls == 3  # failed twice, read the third time
  assert ids == _raw_ids(records) and skipped.counts()["total"] == 0


def test_scan_fails_naming_the_file_when_io_errors_persist(tmp_path, monkeypatch):
  path = _write(tmp_path / "train.tfrecord", _records(30))
  monkeypatch.setattr(integrity, "RETRY_BACKOFF_S", 0.0)
  monkeypatch.setattr(integrity, "count_in_parallel", _parallel_pass_hiccups)
  broken = _flaky(integrity.count_records, failures=None)
  monkeypatch.setattr(integrity, "count_records", broken)
  for policy in ("fail", "skip"):  # never taken for damaged data and skipped
    with pytest.raises(integrity.ShardReadError,
                       match=f"reading {re.escape(path)} \\(counting its records\\) failed "
                             "4 times.*UnavailableError.*not damaged data"):
      _read(path, policy)
  assert broken.calls == 2 * integrity.READ_ATTEMPTS


def test_a_record_the_reader_stopped_at_for_io_is_read_again_not_called_corrupt(
    tmp_path, monkeypatch):
  records = _records(30)
  data = open(_write(tmp_path / "a.tfrecord", records), "rb").read()
  path = tmp_path / "train.tfrecord"
  path.write_bytes(_flip(data, _starts(data), 7, 20))  # record 7 really is corrupt
  real_run = integrity._readable_run
  stops = iter([True, True])  # the run from record 8 stops at once, twice (I/O)

  def run(p, compression, offset):
    return (0, 0) if offset > 0 and next(stops, False) else real_run(p, compression, offset)

  monkeypatch.setattr(integrity, "RETRY_BACKOFF_S", 0.0)
  monkeypatch.setattr(integrity, "_readable_run", run)
  scan, = integrity.scan_shards([str(path)])
  assert [(d.record, d.problem) for d in scan.damage] == [
      (7, "the record's data fails its checksum (corrupted)")]
  assert scan.records == 29
  monkeypatch.setattr(integrity, "_readable_run", lambda p, c, offset: (0, 0))
  with pytest.raises(integrity.ShardReadError,
                     match=f"reading {re.escape(str(path))} stopped 4 times at record 0 "
                           r"\(byte 0\), which is intact"):
    integrity.scan_shards([str(path)])


NOT_TFRECORDS = {  # name: (file name, content, message)
    "csv": ("train.tfrecord", b"user,price\n1,2.5\n" * 20, "is not a TFRecord file"),
    "a few stray bytes": ("train.tfrecord", b"abc", r"is not a TFRecord file \(it is 3 bytes"),
    "gzip without .gz": ("train.tfrecord", None, "GZIP-compressed but its name does not end"),
    ".gz that is not gzip": ("train.tfrecord.gz", b"", "ends in .gz but is not GZIP"),
}


@pytest.mark.parametrize("policy", validation.BAD_RECORD_POLICIES)
@pytest.mark.parametrize("kind", sorted(NOT_TFRECORDS))
def test_file_that_is_not_a_tfrecord_fails_under_both_policies(kind, policy, tmp_path):
  name, content, message = NOT_TFRECORDS[kind]
  plain = open(_write(tmp_path / "plain", _records(5)), "rb").read()
  content = gzip.compress(plain) if content is None else (content or plain)
  (tmp_path / name).write_bytes(content)
  # The wrong file is not a bad record: skipping it would hide a mistake.
  with pytest.raises(validation.BadRecordError, match=message):
    reader.make_dataset(str(tmp_path / name), SCHEMA, 8, bad_records=policy)


def test_empty_shards_hold_no_records(tmp_path):
  _write(tmp_path / "train-0.tfrecord", [])
  records = _records(20)
  _write(tmp_path / "train-1.tfrecord", records)
  ids, _ = _read(str(tmp_path / "train-*"))
  assert ids == _raw_ids(records)


def test_mixed_compression_names_one_file_of_each_kind(tmp_path):
  _write(tmp_path / "a.tfrecord", _records(2))
  _write(tmp_path / "b.tfrecord.gz", _records(2), "GZIP")
  with pytest.raises(ValueError, match="mix GZIP .*b.tfrecord.gz.* and uncompressed .*"
                                       "a.tfrecord"):
    reader.make_dataset(str(tmp_path / "*"), SCHEMA, 8)


# ------------------------------------------------------------------ bad records

_FLOATS = lambda *v: tf.train.Feature(float_list=tf.train.FloatList(value=v))  # noqa: E731
_INTS = lambda *v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))  # noqa: E731

UNPARSABLE = {  # name: (record, what the error names)
    "missing labels": (lambda r: _replaced(r, "__labels__", None),
                       "Feature: __labels__ .*is required"),
    "labels of the wrong type": (lambda r: _replaced(r, "__labels__", _INTS(1, 0)),
                                 "Key: __labels__.*Data types don't match"),
    "numerics of the wrong length": (lambda r: _replaced(r, "__numeric__", _FLOATS(1.0)),
                                     "Key: __numeric__.*Values size: 1 but output shape: \\[2\\]"),
    "a serving-layout example": (lambda r: SCHEMA.serving_example({"user": 1}),
                                 "Feature: __categorical__ .*is required"),
}


@pytest.mark.parametrize("kind", sorted(UNPARSABLE))
def test_record_not_in_the_training_layout_fails_naming_file_and_record(kind, tmp_path):
  make, message = UNPARSABLE[kind]
  records = _records(30)
  path = _write(tmp_path / "train.tfrecord", records[:18] + [make(records[0])] + records[18:])
  # The batched parse names the block of 16 records (and the place in it, when
  # TensorFlow says); first_unparsable() finds the record itself.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=f"Name: {re.escape(path)} from record 16, {message}"):
    _read(path)
  found = reader.first_unparsable(path, SCHEMA)
  assert found[:2] == (path, 18) and re.search(message, found[2])


def test_record_that_is_not_an_example_is_found(tmp_path):
  records = _records(10)
  path = _write(tmp_path / "train.tfrecord", records[:4] + [b"\x00\xffgarbage"] + records[4:])
  # TensorFlow's error names no record and quotes its bytes, which its Python
  # binding cannot decode when they are not text.
  with pytest.raises((tf.errors.InvalidArgumentError, UnicodeDecodeError)):
    _read(path)
  assert reader.first_unparsable(path, SCHEMA) == (path, 4, "it is not a serialized tf.Example")
  assert reader.first_unparsable(_write(tmp_path / "good.tfrecord", records), SCHEMA) is None


REGRESSION = schema_lib.Schema(SCHEMA.features, SCHEMA.labels,
                               [schema_lib.Task("value", "conversion", type="regression")])
INVALID = {  # name: (schema, bad record, message)
    "binary label 2": (SCHEMA, _record(click=2.0),
                       "label column click of binary task ctr must be 0 or 1 .*got 2"),
    "NaN label where it counts": (
        SCHEMA, _record(click=1.0, conversion=float("nan")),
        "label column conversion of binary task cvr must be 0 or 1 \\(or NaN, missing, where "
        "its mask click is 0\\).*got nan"),
    "label 2 where masked out": (SCHEMA, _record(click=0.0, conversion=2.0),
                                 "label column conversion of binary task cvr .*got 2"),
    "mask 0.5": (SCHEMA.with_tasks(["cvr"]), _record(click=0.5),
                 "mask column click of task cvr must be 0 or 1, got 0.5"),
    "infinite numeric": (SCHEMA, _record(age=float("-inf")),
                         "numeric feature age must not be infinite, got -inf"),
    "infinite regression label": (
        REGRESSION, _record(conversion=float("inf")),
        "label column conversion of regression task value must be a finite number, got inf"),
}


@pytest.mark.parametrize("kind", sorted(INVALID))
def test_value_the_schema_forbids_fails_naming_record_column_and_value(kind, tmp_path):
  schema, bad, message = INVALID[kind]
  records = _records(30)
  path = _write(tmp_path / "train.tfrecord", records[:21] + [bad] + records[21:])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=f"bad record in {re.escape(path)}, record 21: {message}.*"
                           "--bad_records=skip"):
    _read(path, schema=schema)
  ids, skipped = _read(path, "skip", schema=schema)
  assert ids == _raw_ids(records) and skipped.counts()["invalid"] == 1


def test_skip_leaves_out_exactly_the_bad_records_and_counts_each_once(tmp_path):
  good = _records(100)
  bad_unparsable = [make(good[0]) for make, _ in UNPARSABLE.values()] + [b"\x00\xffgarbage"]
  bad_invalid = [INVALID[k][1] for k in ("binary label 2", "NaN label where it counts",
                                          "infinite numeric")]
  # Bad records alone in a block, several in one block, and a whole block of them
  # (blocks are 16 records): the good records around them all arrive.
  whole_block = bad_unparsable[3:] * 8 + bad_unparsable[:1] * 8
  records = (good[:5] + bad_unparsable[:1] + good[5:40] + bad_invalid + bad_unparsable[1:3]
             + good[40:90] + whole_block + good[90:])
  unparsable = 1 + 2 + len(whole_block)
  path = _write(tmp_path / "train.tfrecord", records)
  skipped = validation.SkippedRecords()
  ds = reader.make_dataset(path, SCHEMA, 32, shuffle_block=16, seed=0, bad_records="skip",
                           skipped=skipped)
  for epoch in range(2):
    ids = sorted(i for features, _, _ in ds for i in features["raw_id"].numpy().tolist())
    assert ids == sorted(_raw_ids(good)), epoch
    # Parsed blocks are cached: the second epoch counts nothing again.
    assert skipped.counts() == {"corrupt": 0, "unparsable": unparsable, "invalid": 3,
                                "total": unparsable + 3, "unreadable_tails": 0}


def test_label_missing_where_masked_out_is_allowed_and_weighs_nothing(tmp_path):
  # E.g. no conversion label without a click (CSV converters write empty cells as NaN).
  path = _write(tmp_path / "train.tfrecord",
                [_record(click=0.0, conversion=float("nan")), _record(click=1.0, conversion=1.0)])
  _, labels, weights = next(iter(reader.make_dataset(path, SCHEMA, 8, shuffle=False)))
  assert labels["cvr"].numpy().ravel().tolist() == [0.0, 1.0]  # never NaN times 0
  assert weights["cvr"].numpy().tolist() == [0.0, 1.0]


def test_out_of_vocabulary_ids_are_kept_for_the_oov_row(tmp_path):
  # Valid by the schema: models look them up in the OOV row or hash them
  # (test_layers.test_feature_embedding_layout_and_oov).
  path = _write(tmp_path / "train.tfrecord",
                [_record(user=10**6, raw_id=-2**63, slot=-7, tags=[10**12, -5])])
  features, _, _ = next(iter(reader.make_dataset(path, SCHEMA, 8, shuffle=False)))
  assert features["user"].numpy().tolist() == [10**6]
  assert features["raw_id"].numpy().tolist() == [-2**63]
  assert features["tags"].numpy().tolist() == [[10**12, -5, -1]]


def test_nan_numeric_means_missing_and_infinite_is_clipped():
  embed = layers.feature_embedding(SCHEMA)
  serving = SCHEMA.parse_serving_examples(tf.constant([
      SCHEMA.serving_example({"price": float("nan"), "age": float("nan")}),
      SCHEMA.serving_example({}),  # both missing: the parse default
      SCHEMA.serving_example({"price": float("inf"), "age": -3e38})]))
  numeric = embed(serving).numpy()[:, -2:]
  np.testing.assert_allclose(numeric[0], [0.0, 0.0])  # NaN: the training mean
  np.testing.assert_allclose(numeric[1], [0.0, 0.0], atol=1e-6)  # missing, log1p too
  np.testing.assert_allclose(numeric[2], [layers.inputs.NUMERIC_Z_LIMIT,
                                          -layers.inputs.NUMERIC_Z_LIMIT])


# ------------------------------------------------------------------------- CLI

FLAG_ERRORS = {  # name: (argv, message); {file} is a regular file
    "unknown model": (["--model=mmeo"], "flag --model=mmeo: value should be one of"),
    "unknown weighting": (["--loss_weighting=softmax"],
                          "flag --loss_weighting=softmax: value should be one of"),
    "unknown policy": (["--bad_records=ignore"],
                       "flag --bad_records=ignore: value should be one of <fail|skip>"),
    "duplicate alone": (["--duplicate"], "--duplicate belongs to --strategy=sample_weighting"),
    "experts without experts": (["--model=shared_bottom", "--num_experts=4"],
                                "--num_experts does not apply to --model=shared_bottom; "
                                "it is taken by mmoe, omoe"),
    "dropout of l2_constrained": (["--model=l2_constrained", "--dropout=0.1"],
                                  "--dropout does not apply to --model=l2_constrained"),
    "levels of mmoe": (["--num_levels=3"], "--num_levels does not apply to --model=mmoe; "
                                           "it is taken by ple"),
    "another balancer's option": (["--loss_weighting=gradnorm", "--dwa_temperature=1"],
                                  "--dwa_temperature does not apply to --loss_weighting="
                                  "gradnorm; it belongs to --loss_weighting=dwa"),
    "synthetic size of census": (["--source=census", "--synthetic_requests=5"],
                                 "--synthetic_requests belongs to --source=synthetic"),
    "eval without train": (["--eval_files=x-*"], "--eval_files needs --train_files"),
    "keep without export": (["--export_dir=", "--keep=2"],
                            "--keep configures the export, but --export_dir=''"),
    "serving task without export": (["--export_dir=", "--serving_task=cvr"],
                                    "--serving_task configures the export"),
    "model_dir in a file": (["--model_dir={file}/run"],
                            "--model_dir={file}/run cannot be written ({file} is not a "
                            "directory)"),
    "export_dir in a file": (["--export_dir={file}/export"],
                             "--export_dir={file}/export cannot be written"),
    "unknown serving task": (["--train_files={data}/train-0.tfrecord", "--serving_task=ctcvr"],
                             "--serving_task=ctcvr is not a task of the model"),
}


def _bad_dataset(out) -> str:
  """mixed_schema shards: 300 good records and 3 bad ones (one unparsable, one
  with an invalid label, one whose bytes are corrupt)."""
  out.mkdir()
  SCHEMA.save(str(out / "schema.json"))
  good = _records(300, seed=5)
  _write(out / "train-0.tfrecord",
         good[:150] + [_replaced(good[0], "__labels__", None), _record(click=3.0)])
  path = _write(out / "train-1.tfrecord", good[150:] + [_record(seed=1)])
  data = bytearray(open(path, "rb").read())
  data[_starts(bytes(data))[-1] + 40] ^= 0xFF
  open(path, "wb").write(bytes(data))
  return str(out)


def _one_file_dataset(out, records) -> str:
  out.mkdir()
  SCHEMA.save(str(out / "schema.json"))
  return _write(out / "train.tfrecord", records)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """name -> (exit code, stdout, stderr, base directory) of every CLI case."""
  base = tmp_path_factory.mktemp("cli")
  (base / "file").write_text("a file, not a directory")
  bad = _bad_dataset(base / "bad")
  records = _records(50)
  small = ["--epochs=1", "--batch_size=64", "--num_experts=2", "--expert_units=4",
           "--tower_units=4", "--export_dir="]
  cases = {name: [a.format(file=base / "file", data=bad) for a in argv]
               + [f"--output_dir={base}/out-{i}"]
           for i, (name, (argv, _)) in enumerate(sorted(FLAG_ERRORS.items()))}
  for policy in validation.BAD_RECORD_POLICIES:
    cases[f"bad data, {policy}"] = [
        f"--train_files={bad}/train-*", f"--eval_files={bad}/train-*", "--epochs=2",
        f"--bad_records={policy}", f"--model_dir={base}/{policy}", *small[1:]]
  junk = _one_file_dataset(base / "junk", records[:9] + [b"\x00\xffgarbage"] + records[9:])
  cases["not an example"] = [f"--train_files={junk}", f"--model_dir={base}/junk-run", *small]
  empty = _one_file_dataset(base / "empty", [])
  cases["no records"] = [f"--train_files={empty}", f"--model_dir={base}/empty-run", *small]
  # With --steps_per_epoch the files are not counted; one record is looked for.
  cases["no records, steps given"] = [f"--train_files={empty}", "--steps_per_epoch=3",
                                      f"--model_dir={base}/empty-steps-run", *small]
  only_bad = _one_file_dataset(base / "only-bad", [_record(click=2.0)] * 3)
  cases["only bad records"] = [f"--train_files={only_bad}", "--bad_records=skip",
                               f"--model_dir={base}/only-bad-run", *small]
  return {name: (*result, base) for name, result in
          run_cli_cases("mtl_zoo.train", cases, base / "results.json").items()}


@pytest.mark.parametrize("case", sorted(FLAG_ERRORS))
def test_cli_flag_errors_exit_nonzero_naming_the_flag(case, cli):
  code, _, err, base = cli[case]
  assert code == 1
  message = FLAG_ERRORS[case][1].format(file=base / "file")
  assert message in err, err[-2000:]
  index = sorted(FLAG_ERRORS).index(case)
  assert not (base / f"out-{index}").exists()  # failed before writing anything


def test_cli_bad_records_fail_names_the_damage(cli):
  code, _, err, _ = cli["bad data, fail"]
  assert code == 1
  assert re.search(r"--train_files: damaged TFRecords:\s+\S+train-1.tfrecord: record 150 "
                   r"\(byte \d+\): the record's data fails its checksum", err), err[-2000:]
  assert "--bad_records=skip" in err and "Traceback" not in err


def test_cli_bad_records_skip_trains_on_the_good_records_and_reports_the_count(cli):
  code, out, err, base = cli["bad data, skip"]
  assert code == 0, err[-3000:]
  assert "train: skipped 3 bad records (1 corrupt, 1 unparsable, 1 with invalid values)" in out
  assert "train-1.tfrecord: record 150 (byte" in out
  metrics = json.load(open(base / "skip" / "metrics.json"))
  expected = {"corrupt": 1, "unparsable": 1, "invalid": 1, "total": 3, "unreadable_tails": 0}
  assert metrics["bad_records"]["skipped"] == {"train": expected, "eval": expected}
  assert metrics["bad_records"]["policy"] == "skip"
  assert metrics["eval"]["ctr"]["examples"] == 300


def test_cli_names_the_record_that_is_not_an_example(cli):
  code, _, err, base = cli["not an example"]
  assert code == 1
  assert (f"records do not match the schema's training layout: {base}/junk/train.tfrecord, "
          "record 9: it is not a serialized tf.Example") in err, err[-2000:]


@pytest.mark.parametrize("case, message", [
    ("no records", "the files hold no records"),
    ("no records, steps given", "the files hold no records"),
    ("only bad records", "(3 bad records were skipped)")])
def test_cli_without_training_examples_says_so(case, message, cli):
  code, _, err, _ = cli[case]
  assert code == 1
  assert "holds no training examples" in err and message in err, err[-2000:]


# ------------------------------------------------------------------------ fuzz

# The reader properties run 100 examples each in CI like the others. An example
# must then cost little: building make_dataset's tf.data pipelines (tracing a
# dozen functions) cost ~1 s of CPU, so where the shard's framing is always
# intact (records written by TFRecordWriter) the datasets are built once, for a
# fixed path, and each example replaces the file and reads them again (every
# pass opens the file anew; nothing is cached). The damaged-shard and
# random-file properties call make_dataset per example, since the framing scan
# it starts with is what they test (the scan's reads are traced once). Every
# pass runs as one op (`_one_pass`).


class _Shard:
  """make_dataset's datasets over one fixed shard path, built once; `read`
  passes over them after `write` replaced the shard."""

  def __init__(self, directory):
    self.path = os.path.join(directory, "fuzz.tfrecord")
    self.write([_record()])  # built over a valid shard (a damaged one is refused)
    self.skipped = validation.SkippedRecords()
    self.datasets = {
        name: reader.make_dataset(self.path, SCHEMA, 16, shuffle=shuffle, shuffle_block=16,
                                  seed=0, cache=False, bad_records=policy,
                                  skipped=self.skipped)
        for name, policy, shuffle in (("fail", "fail", False), ("skip", "skip", False),
                                      ("shuffled skip", "skip", True))}

  def write(self, records) -> None:
    # A new file under the path (renamed into place), never one an earlier
    # pass still has open.
    os.replace(_write(self.path + ".tmp", records), self.path)

  def read(self, policy: str = "fail"):
    """(the examples of one pass as one batch, or none; what that pass left out
    by reason)."""
    before = self.skipped.counts()
    batches = _one_pass(self.datasets[policy])
    after = self.skipped.counts()
    return batches, {k: after[k] - before[k] for k in after}

  def ids(self, policy: str = "fail"):
    batches, counts = self.read(policy)
    return [i for features, _, _ in batches for i in features["raw_id"].numpy().tolist()], counts


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
  return _Shard(str(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def embed():
  return layers.feature_embedding(SCHEMA)


_LABEL = st.sampled_from([0.0, 1.0, 0.0, 1.0, 0.5, 2.0, -1.0, float("nan"), float("inf")])
_NUMBER = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                    st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38]))
_ID = st.integers(-2**63, 2**63 - 1)
_ROW = st.fixed_dictionaries({
    "user": _ID, "raw_id": _ID, "slot": _ID, "tags": st.lists(_ID, max_size=5),
    "price": _NUMBER, "age": _NUMBER, "click": _LABEL, "conversion": _LABEL})


def _valid(row) -> bool:
  """The schema's value rules (validation.ValueRules), written out for mixed_schema."""
  return (not math.isinf(row["price"]) and not math.isinf(row["age"])
          and row["click"] in (0.0, 1.0)
          and (row["conversion"] in (0.0, 1.0)
               or (row["click"] == 0.0 and math.isnan(row["conversion"]))))


@given(rows=st.lists(_ROW, min_size=1, max_size=40))
def test_fuzz_reader_with_random_valid_examples(rows, shard, embed):
  shard.write([SCHEMA.training_example(r) for r in rows])
  expected = sum(_valid(r) for r in rows)
  batches, counts = shard.read("shuffled skip")
  kept = 0
  for features, labels, weights in batches:
    kept += len(labels["ctr"])
    assert np.isfinite(embed(features).numpy()).all()  # what reaches the model is finite
    assert set(labels["ctr"].numpy().ravel()) <= {0.0, 1.0}
    assert set(labels["cvr"].numpy().ravel()) <= {0.0, 1.0}
  assert kept == expected
  assert counts["invalid"] == len(rows) - expected
  if expected < len(rows):
    with pytest.raises(tf.errors.InvalidArgumentError, match="bad record in .*, record \\d+: "):
      shard.read("fail")


def _intact(starts: list, size: int, flip: int, cut: int) -> list:
  """Which records of a shard of `size` bytes survive a byte flipped at `flip`
  and a cut to `cut` bytes: a record survives whole and unflipped, unless a
  flipped header before it hides where the records after it start. (A cut at
  a record boundary leaves a shorter shard that looks complete.)"""
  kept = []
  for i, (start, end) in enumerate(zip(starts, starts[1:] + [size])):
    if start >= cut or start <= flip < start + 12:
      break
    if end <= cut and not start <= flip < end:
      kept.append(i)
  return kept


_GOOD = _records(20)  # the shard each example damages


@given(flip=st.integers(0, 10**6), value=st.integers(1, 255), cut=st.integers(0, 10**6))
def test_fuzz_reader_with_damaged_shards(flip, value, cut, tmp_path):
  """A valid shard with a random byte flipped and cut short at random: under
  "skip" exactly the intact records arrive, under "fail" an error names the
  damage; a shard damaged from its first byte is "not a TFRecord" under both."""
  data = bytearray(open(_write(tmp_path / "good", _GOOD), "rb").read())
  flip, cut = flip % len(data), cut % (len(data) + 1)
  data[flip] ^= value
  path = str(tmp_path / "fuzz.tfrecord")
  open(path, "wb").write(bytes(data[:cut]))
  try:
    ids, skipped = _read(path, "skip")
  except validation.BadRecordError as e:
    assert (0 < cut < 12 or flip < min(cut, 12)) and "is not a TFRecord file" in str(e)
    return
  starts = _starts(bytes(data))
  assert ids == [_raw_ids(_GOOD)[i] for i in _intact(starts, len(data), flip, cut)]
  counts = skipped.counts()
  if not counts["unreadable_tails"]:  # every record begun before the cut is accounted for
    assert len(ids) + counts["corrupt"] == sum(start < cut for start in starts)
  if counts["total"] or counts["unreadable_tails"]:
    with pytest.raises(validation.BadRecordError, match=f"{re.escape(path)}: record \\d+"):
      _read(path)


@given(content=st.binary(max_size=300))
def test_fuzz_reader_with_random_files(content, tmp_path):
  path = str(tmp_path / "fuzz.tfrecord")
  open(path, "wb").write(content)
  for policy in validation.BAD_RECORD_POLICIES:
    try:
      _read(path, policy)
    except validation.BadRecordError as e:
      assert path in str(e) and re.search("not a TFRecord|GZIP|: record \\d+", str(e))
    except (tf.errors.InvalidArgumentError, UnicodeDecodeError):  # framed, not our records
      assert policy == "fail" and reader.first_unparsable(path, SCHEMA)[0] == path


@given(records=st.lists(st.binary(max_size=40), min_size=1, max_size=12))
def test_fuzz_reader_with_random_bytes_as_records(records, shard):
  shard.write(records)
  ids, counts = shard.ids("skip")
  assert len(ids) + counts["unparsable"] + counts["invalid"] == len(records)
  if counts["total"]:
    with pytest.raises((tf.errors.InvalidArgumentError, UnicodeDecodeError)) as failure:
      shard.read("fail")
    found = reader.first_unparsable(shard.path, SCHEMA)
    if counts["unparsable"]:
      assert found is not None and found[0] == shard.path
    else:
      assert found is None and f"bad record in {shard.path}, record " in failure.value.message


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
  """A tiny MMoE over every feature kind, exported with a `rank` signature."""
  mtl_zoo.keras.utils.set_random_seed(0)
  model = mtl_zoo.build_mmoe(SCHEMA, num_experts=2, expert_units=[4], tower_units=[4])
  path = serving_lib.export_saved_model(
      model, SCHEMA, str(tmp_path_factory.mktemp("export") / "tiny"),
      fusion=layers.parse_fusion("product:ctr=1,cvr=1,price=0.5"))
  return tf.saved_model.load(path)


def _serve(serving, examples):
  """The serving_default outputs, or the error it raised."""
  try:
    out = serving.signatures["serving_default"](examples=tf.constant(examples, tf.string))
  except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as e:
    return e
  return {k: v.numpy() for k, v in out.items()}


def _is_text(data: bytes) -> bool:
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return False
  return True


def _check_outputs(out, n):
  assert sorted(out) == ["ctr", "cvr"]
  for p in out.values():
    assert p.shape == (n,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()


_FEATURE = st.one_of(
    st.lists(_ID, max_size=5).map(lambda v: _INTS(*v)),
    st.lists(st.floats(width=32), max_size=5).map(lambda v: _FLOATS(*v)),
    st.lists(st.binary(max_size=8), max_size=3).map(
        lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=v))),
    st.just(tf.train.Feature()))
_EXAMPLE = st.dictionaries(
    st.sampled_from(SCHEMA.feature_names + SCHEMA.labels + ["colour", ""]), _FEATURE,
    max_size=8).map(lambda features: tf.train.Example(
        features=tf.train.Features(feature=features)).SerializeToString())


@given(examples=st.lists(st.one_of(_EXAMPLE, st.binary(max_size=60)), min_size=1, max_size=6))
def test_fuzz_serving_signature(examples, serving):
  out = _serve(serving, examples)
  if isinstance(out, UnicodeDecodeError):
    # TensorFlow's parse error quotes the input; its Python binding cannot decode
    # bytes that are not text (TF Serving answers INVALID_ARGUMENT).
    assert not all(_is_text(e) for e in examples)
  elif isinstance(out, tf.errors.InvalidArgumentError):
    # A useful message: the bad key, or that the input is not a tf.Example.
    assert re.search(r"Key: \w+|Could not parse example input|Feature: \w+", out.message), \
        out.message
  else:
    _check_outputs(out, len(examples))


def test_serving_with_nan_infinite_and_out_of_range_values_gives_probabilities(serving):
  hostile = [{"user": -1, "raw_id": 2**63 - 1, "slot": 10**9, "tags": [10**15] * 50,
              "price": float("nan"), "age": float("inf")},
             {"price": -float("inf"), "age": -3.4e38, "tags": []},
             {}]
  examples = [SCHEMA.serving_example(r) for r in hostile]
  _check_outputs(_serve(serving, examples), 3)
  nan_price = serving.signatures["rank"](examples=tf.constant(examples))["score"].numpy()
  assert np.isfinite(nan_price).all()  # a NaN price counts as missing in the fused score
