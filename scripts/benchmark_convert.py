"""Throughput and peak memory of the single-process CSV converter, by input size.

  python scripts/benchmark_convert.py [--rows=2000000,8000000] [--id_columns=4]
      [--numeric_columns=4] [--work_dir=/tmp/mtl_zoo-benchmark-convert]

Generates an ads-like CSV per size (string ids drawn from fixed vocabularies,
numerics, click and conversion labels; a conversion only after a click), with a
schema template, then runs `python -m pipelines.convert --source=csv` on it in a
subprocess per size and prints, per size: rows, the conversion's own time and
rows/s (from the converter's "Wrote ... in Xs" line: interpreter and TensorFlow
start-up excluded), the whole process's wall time, and its peak resident
memory (ru_maxrss of that child, `os.wait4`). Bounded memory shows as the same
peak at every size. The machine may be busy with other work: compare runs,
not single numbers.
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["2000000", "8000000"], "CSV sizes to convert, in rows.")
flags.DEFINE_integer("id_columns", 4, "String id columns (categorical features with "
                     "vocabularies built by the converter).", lower_bound=1)
flags.DEFINE_integer("numeric_columns", 4, "Numeric feature columns.", lower_bound=0)
flags.DEFINE_integer("vocabulary", 50_000, "Distinct ids per id column (the first has "
                     "this many, each next one a tenth as many, at least 10).", lower_bound=1)
flags.DEFINE_string("work_dir", "/tmp/mtl_zoo-benchmark-convert", "Where the CSVs and "
                    "the converted datasets go (reused across runs).")
flags.DEFINE_integer("num_shards", 8, "Shards of the converted split.", lower_bound=1)

GENERATE_ROWS = 500_000


def id_sizes() -> list:
  return [max(10, FLAGS.vocabulary // 10 ** i) for i in range(FLAGS.id_columns)]


def template() -> dict:
  """The schema template of the generated CSV."""
  features = [{"name": f"id{i}", "kind": "categorical", "embedding_dim": 8}
              for i in range(FLAGS.id_columns)]
  features += [{"name": f"num{i}", "kind": "numeric"} for i in range(FLAGS.numeric_columns)]
  return {"name": "benchmark", "features": features, "labels": ["click", "conversion"],
          "tasks": [{"name": "ctr", "label": "click"},
                    {"name": "cvr", "label": "conversion", "mask": "click"}]}


def generate(path: str, rows: int, seed: int = 0) -> None:
  """Writes a CSV of `rows` rows in chunks (header first)."""
  rng = np.random.default_rng(seed)
  with pa_csv.CSVWriter(path, schema=_schema()) as writer:
    for start in range(0, rows, GENERATE_ROWS):
      n = min(GENERATE_ROWS, rows - start)
      columns = {}
      for i, size in enumerate(id_sizes()):
        ids = np.minimum(rng.zipf(1.3, n), size) - 1  # a few ids frequent, most rare
        columns[f"id{i}"] = pa.array(np.char.add(f"{chr(97 + i)}", ids.astype(str)))
      for i in range(FLAGS.numeric_columns):
        columns[f"num{i}"] = pa.array(np.round(rng.gamma(2.0, 10.0, n), 3))
      click = (rng.random(n) < 0.1).astype(np.int8)
      columns["click"] = pa.array(click)
      columns["conversion"] = pa.array((click & (rng.random(n) < 0.2)).astype(np.int8))
      writer.write_table(pa.table(columns, schema=_schema()))


def _schema() -> pa.Schema:
  return pa.schema([(f"id{i}", pa.string()) for i in range(FLAGS.id_columns)]
                   + [(f"num{i}", pa.float64()) for i in range(FLAGS.numeric_columns)]
                   + [("click", pa.int8()), ("conversion", pa.int8())])


def convert(csv_path: str, template_path: str, out_dir: str) -> dict:
  """Runs the converter in a child process; its seconds, wall time and peak RSS."""
  command = [sys.executable, "-m", "pipelines.convert", "--source=csv",
             f"--csv_schema={template_path}", f"--csv=train:{csv_path}",
             f"--out_dir={out_dir}", f"--num_shards={FLAGS.num_shards}", "--overwrite"]
  log = os.path.join(FLAGS.work_dir, "convert.log")
  start = time.perf_counter()
  with open(log, "w") as output:
    child = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    # wait4 reaps this child alone and returns its own resource usage.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  text = open(log).read()
  found = re.search(r"Wrote \S+ in ([\d.]+)s", text)
  if child.returncode or not found:
    raise RuntimeError(f"the conversion failed (exit {child.returncode}):\n{text[-3000:]}")
  return {"seconds": float(found.group(1)), "wall": wall,
          "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux reports KiB


def main(argv):
  del argv
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  template_path = os.path.join(FLAGS.work_dir, "template.json")
  with open(template_path, "w") as f:
    json.dump(template(), f)
  print(f"columns: {FLAGS.id_columns} string ids (vocabularies {id_sizes()}), "
        f"{FLAGS.numeric_columns} numerics, click, conversion")
  results = []
  for rows in map(int, FLAGS.rows):
    csv_path = os.path.join(FLAGS.work_dir, f"ads-{rows}-{FLAGS.id_columns}x"
                            f"{FLAGS.numeric_columns}.csv")
    if not os.path.exists(csv_path):
      start = time.perf_counter()
      generate(csv_path, rows)
      print(f"generated {csv_path} ({os.path.getsize(csv_path) / 2**20:,.0f} MiB) in "
            f"{time.perf_counter() - start:.0f}s", flush=True)
    result = convert(csv_path, template_path, os.path.join(FLAGS.work_dir, f"out-{rows}"))
    result.update(rows=rows, mib=os.path.getsize(csv_path) / 2**20)
    results.append(result)
    print(f"{rows:>11,} rows: {result['seconds']:6.1f}s, {rows / result['seconds']:>9,.0f} "
          f"rows/s ({result['mib'] / result['seconds']:.0f} MiB/s of CSV); process "
          f"{result['wall']:.1f}s; peak RSS {result['peak_rss_mb']:,.0f} MiB", flush=True)
  print("\n| rows | CSV MiB | conversion s | rows/s | process s | peak RSS MiB |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['rows']:,} | {r['mib']:,.0f} | {r['seconds']:.1f} | "
          f"{r['rows'] / r['seconds']:,.0f} | {r['wall']:.1f} | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
  app.run(main)
