"""The Beam converter (DirectRunner) against the single-process CSV converter."""

import csv
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("apache_beam", reason="needs the beam extra: pip install -e .[beam]")

from pipelines import beam_convert  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines.datasets import csv_source  # noqa: E402

TEMPLATE = {
    "name": "shop",
    "features": [
        {"name": "city", "kind": "categorical", "embedding_dim": 4},
        {"name": "tags", "kind": "categorical_list", "embedding_dim": 3, "max_len": 3},
        {"name": "slot", "kind": "categorical", "vocab_size": 6, "embedding_dim": 2},
        {"name": "price", "kind": "numeric", "transform": "log1p"},
        {"name": "age", "kind": "numeric"},
    ],
    "labels": ["click", "buy"],
    "tasks": [{"name": "ctr", "label": "click"},
              {"name": "cvr", "label": "buy", "mask": "click"}],
    "request_id": "req",
}
HEADER = ["req", "city", "tags", "slot", "price", "age", "click", "buy", "unused"]
# Ties in counts (the order then falls back to the strings), an empty city, and a
# quoted cell holding the delimiter and a newline.
CITIES = ["paris", "rome", "oslo", "lima", "", "new york,\nny"]


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    click = int(rng.random() < 0.4)
    rows.append([i // 5, CITIES[rng.integers(len(CITIES))],
                 "|".join(rng.choice(list("abcdefg"), rng.integers(0, 5)).tolist()),
                 rng.integers(0, 8),
                 "" if rng.random() < 0.1 else f"{rng.gamma(2.0, 30.0) - 5:.3f}",
                 "" if rng.random() < 0.1 else f"{rng.normal(40, 12):.2f}",
                 click, click * int(rng.random() < 0.5), "x"])
  return rows


def _write_csv(path, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(HEADER)
    writer.writerows(rows)


def _records(pattern):
  return sorted(r.numpy() for r in tf.data.TFRecordDataset(sorted(glob.glob(pattern))))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The same rows converted by both converters; Beam reads train from two files and
  in chunks of 37 rows, so merging vocabularies and moments across chunks matters."""
  raw = tmp_path_factory.mktemp("raw")
  train, heldout = _rows(400, seed=1), _rows(60, seed=2)
  _write_csv(raw / "train.csv", train)
  _write_csv(raw / "train-part-a.csv", train[:170])
  _write_csv(raw / "train-part-b.csv", train[170:])
  _write_csv(raw / "eval.csv", heldout)
  out = tmp_path_factory.mktemp("out")
  local = csv_source.convert(TEMPLATE, [("train", str(raw / "train.csv")),
                                        ("eval", str(raw / "eval.csv"))],
                             str(out / "local"), num_shards=3)
  beam = beam_convert.convert(TEMPLATE, [("train", str(raw / "train-part-*.csv")),
                                         ("eval", str(raw / "eval.csv"))],
                              str(out / "beam"), num_shards=3, chunk_rows=37)
  return raw, out, local, beam


def test_beam_output_equals_single_process_output(converted):
  _, out, local, beam = converted
  assert beam == schema_lib.Schema.load(str(out / "beam"))  # what was written
  assert beam.feature("city").vocabulary == local.feature("city").vocabulary
  assert beam.feature("tags").vocabulary == local.feature("tags").vocabulary
  assert "new york,\nny" in beam.feature("city").vocabulary
  for name in ("price", "age"):
    assert beam.feature(name).mean == pytest.approx(local.feature(name).mean, rel=1e-12)
    assert beam.feature(name).std == pytest.approx(local.feature(name).std, rel=1e-12)
  strip = lambda d: {**d, "features": [{k: v for k, v in f.items() if k not in ("mean", "std")}
                                       for f in d["features"]]}
  assert strip(beam.to_dict()) == strip(local.to_dict())

  assert sorted(os.listdir(out / "beam")) == sorted(os.listdir(out / "local")) == [
      "eval-00000-of-00001.tfrecord", "schema.json", "train-00000-of-00003.tfrecord",
      "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord"]
  for split, count in (("train", 400), ("eval", 60)):
    beam_records = _records(str(out / "beam" / f"{split}-*"))
    assert len(beam_records) == count
    assert beam_records == _records(str(out / "local" / f"{split}-*"))


def test_failed_run_keeps_previous_dataset_and_names_the_bad_cell(converted, tmp_path, capsys):
  raw, out, _, _ = converted
  previous = {name: (out / "beam" / name).read_bytes() for name in os.listdir(out / "beam")}
  rows = _rows(50, seed=3)
  rows[44][4] = "cheap"  # row 46 of the file, the header being row 1
  _write_csv(tmp_path / "bad.csv", rows)
  template = tmp_path / "template.json"
  template.write_text(json.dumps(TEMPLATE))
  with pytest.raises(SystemExit) as exit_info:
    beam_convert.main([f"--csv=train:{tmp_path / 'bad.csv'}", f"--csv_schema={template}",
                       f"--out_dir={out / 'beam'}", "--overwrite",
                       "--runner=DirectRunner", "--direct_num_workers=1"])
  assert exit_info.value.code == 1
  assert "bad.csv, row 46: column 'price' must be a number, got 'cheap'" in (
      capsys.readouterr().err)
  assert {name: (out / "beam" / name).read_bytes()
          for name in os.listdir(out / "beam")} == previous
  assert sorted(os.listdir(out)) == ["beam", "local"]  # no temporary directory left

  with pytest.raises(FileExistsError, match="--overwrite"):
    beam_convert.convert(TEMPLATE, [("train", str(raw / "eval.csv"))], str(out / "beam"))
  with pytest.raises(FileNotFoundError, match="no CSV file matches"):
    beam_convert.convert(TEMPLATE, [("train", str(raw / "nothing-*.csv"))],
                         str(tmp_path / "new"))


def test_publishing_file_by_file_moves_schema_last_and_replaces_old_dataset(tmp_path,
                                                                          monkeypatch):
  """The object-store path (no directory rename), run on local directories."""
  old, new = tmp_path / "data", tmp_path / ".data.tmp-1"
  for directory, content in ((old, b"old"), (new, b"new")):
    directory.mkdir()
    for name in ("train-00000-of-00001.tfrecord", "schema.json"):
      (directory / name).write_bytes(content)
  moved = []
  rename = beam_convert.FileSystems.rename

  def recording_rename(sources, destinations):
    moved.extend(zip(sources, destinations))
    rename(sources, destinations)

  monkeypatch.setattr(beam_convert.FileSystems, "rename", recording_rename)
  beam_convert.publish(str(new), str(old), by_file=True)
  assert {p.name: p.read_bytes() for p in old.iterdir()} == {
      "train-00000-of-00001.tfrecord": b"new", "schema.json": b"new"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
  # The old dataset stops looking whole first; the new one looks whole only at the end.
  assert moved[0][0] == str(old / "schema.json")
  assert moved[-1] == (str(new / "schema.json"), str(old / "schema.json"))
  assert len(moved) == 4


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_a_local_directory_replaces_the_old_dataset(tmp_path, monkeypatch,
                                                               exchange):
  old, new = tmp_path / "data", tmp_path / ".data.tmp-1"
  for directory, content in ((old, b"old"), (new, b"new")):
    directory.mkdir()
    (directory / "schema.json").write_bytes(content)
  if not exchange:  # where the OS cannot swap: the two-rename path
    monkeypatch.setattr(beam_convert.writer_lib, "exchange_paths", lambda a, b: False)
  beam_convert.publish(str(new), str(old), by_file=False)
  assert (old / "schema.json").read_bytes() == b"new"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
