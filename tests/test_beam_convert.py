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
from pipelines.sources import SOURCES, csv_beam  # noqa: E402

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
  (raw / "template.json").write_text(json.dumps(TEMPLATE))
  out = tmp_path_factory.mktemp("out")
  local = SOURCES["csv"].write(str(out / "local"), num_shards=3,
                               csv_schema=str(raw / "template.json"),
                               csv=[f"train:{raw / 'train.csv'}", f"eval:{raw / 'eval.csv'}"])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(csv_beam, "CHUNK_ROWS", 37)
    beam = beam_convert.convert("csv", str(out / "beam"), num_shards=3,
                                csv_schema=str(raw / "template.json"),
                                csv=[f"train:{raw / 'train-part-*.csv'}",
                                     f"eval:{raw / 'eval.csv'}"])
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

  shards = ["eval-00000-of-00001.tfrecord", "train-00000-of-00003.tfrecord",
            "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord"]
  assert sorted(os.listdir(out / "beam")) == sorted(shards + ["schema.json"])
  # Beam's sinks report no per-shard counts: no manifest, readers count themselves.
  assert sorted(os.listdir(out / "local")) == sorted(shards + ["manifest.json",
                                                              "schema.json"])
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
    beam_convert.convert("csv", str(out / "beam"), csv_schema=str(template),
                         csv=[f"train:{raw / 'eval.csv'}"])
  with pytest.raises(FileNotFoundError, match="no CSV file matches"):
    beam_convert.convert("csv", str(tmp_path / "new"), csv_schema=str(template),
                         csv=[f"train:{raw / 'nothing-*.csv'}"])
  assert not (tmp_path / "new").exists()
  with pytest.raises(SystemExit) as exit_info:  # another source's option
    beam_convert.main([f"--csv=train:{raw / 'eval.csv'}", f"--csv_schema={template}",
                       f"--out_dir={tmp_path / 'new'}", "--census_dir=/x"])
  assert exit_info.value.code == 2
  assert "--census_dir belongs to --source=census; it does not apply to --source=csv" in (
      capsys.readouterr().err)

