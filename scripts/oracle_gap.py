"""The synthetic ads log at several sizes, and what its oracle reaches.

  python scripts/oracle_gap.py [--requests=12000,100000] [--train]
      [--work_dir=/tmp/mtl_zoo-oracle-gap]

Per size (training requests of 10 impressions; eval and calibration get a
quarter as many each): converts the log with `python -m pipelines.convert
--source=synthetic` in a child process and prints the conversion's time (the
converter's own "Wrote ... in Xs", start-up excluded) and the child's peak RSS;
the log's shape (base rates, popularity skew, click-bait's share, clicks by
position); and the oracle's eval AUC and log-loss per task (ctr, cvr on clicks,
ctr_cvr = P(click and conversion) on all impressions), scored by
`mtl_zoo.oracle_report` as a model's would be. With --train, also the default
run (`python -m mtl_zoo.train`'s settings) on the first size's log and its
model-vs-oracle table. The machine may be busy: compare runs, not single numbers.
"""

import os
import re
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mtl_zoo import metrics, oracle_report, runner  # noqa: E402
from mtl_zoo.config import RunConfig  # noqa: E402
from mtl_zoo.models import esmm  # noqa: E402
from pipelines import oracle as oracle_lib  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("requests", ["12000", "100000"], "Log sizes, in training requests.")
flags.DEFINE_boolean("train", False, "Also train the default model on the first size's "
                     "log and print model vs oracle.")
flags.DEFINE_string("work_dir", "/tmp/mtl_zoo-oracle-gap", "Where the logs (and the "
                    "run) go; logs already there are reused, not timed again.")


def convert(out_dir: str, requests: int) -> dict:
  """Runs the converter in a child process; its seconds and peak RSS."""
  command = [sys.executable, "-m", "pipelines.convert", "--source=synthetic",
             f"--synthetic_requests={requests}", f"--out_dir={out_dir}", "--overwrite"]
  start = time.perf_counter()
  child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, text=True)
  text = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
  found = re.search(r"Wrote \S+ in ([\d.]+)s", text)
  if os.waitstatus_to_exitcode(status) or not found:
    raise RuntimeError(f"the conversion failed:\n{text[-3000:]}")
  return {"seconds": float(found.group(1)), "wall": time.perf_counter() - start,
          "peak_rss_mb": usage.ru_maxrss / 1024}


def top_share(counts: np.ndarray, fraction: float = 0.1) -> float:
  """The share of the total held by the top `fraction` of ids."""
  ranked = np.sort(counts)[::-1]
  return ranked[:max(1, int(len(ranked) * fraction))].sum() / ranked.sum()


def describe(data_dir: str) -> None:
  """Prints the log's shape (training split) and the oracle's eval metrics."""
  schema = schema_lib.Schema.load(data_dir)
  train = reader.read_columns(f"{data_dir}/train-*", schema)
  truth = oracle_lib.find(f"{data_dir}/train-*")
  p = {k: v[truth.rows_of(train["request_id"], train["position"])]
       for k, v in truth.columns.items()}
  click, conversion, position = train["click"], train["conversion"], train["position"]
  clicked = click > 0
  print(f"  train: {len(click):,} impressions; CTR {click.mean():.4f}, CVR on clicks "
        f"{conversion[clicked].mean():.4f}, conversions per impression "
        f"{conversion.mean():.4f}")
  items = np.bincount(train["item_id"], minlength=schema.feature("item_id").vocab_size)
  users = np.bincount(train["user_id"][position == 0],
                      minlength=schema.feature("user_id").vocab_size)
  print(f"  popularity: top 10% of items {top_share(items):.0%} of impressions "
        f"({(items > 0).sum():,} of {len(items):,} items shown); top 10% of users "
        f"{top_share(users):.0%} of requests ({(users > 0).sum():,} of {len(users):,} "
        "users seen)")
  shown = np.maximum(items, 1)
  click_rate = np.bincount(train["item_id"], p["p_click_without_position"], len(items)) / shown
  conversion_rate = np.bincount(train["item_id"], p["p_conversion_given_click"],
                                len(items)) / shown
  seen = items > 0
  bait = seen & (click_rate > np.quantile(click_rate[seen], 0.75)) & (
      conversion_rate < np.quantile(conversion_rate[seen], 0.25))
  print(f"  click-bait (top quarter of click rates, bottom quarter of conversion rates, "
        f"from the oracle): {bait.sum()} items, {items[bait].sum() / items.sum():.0%} of "
        "impressions")
  print("  CTR by position:           " + " ".join(
      f"{click[position == k].mean():.3f}" for k in range(10)))
  print("  oracle P(click) / relevance: " + " ".join(
      f"{(p['p_click'] / p['p_click_without_position'])[position == k][0]:.2f}"
      for k in range(10)))
  report = oracle_report.compare(esmm.entire_space_schema(schema), f"{data_dir}/eval-*", {})
  eval_columns = reader.read_columns(f"{data_dir}/eval-*", schema)
  eval_truth = oracle_lib.find(f"{data_dir}/eval-*")
  relevance = eval_truth.columns["p_click_without_position"][eval_truth.rows_of(
      eval_columns["request_id"], eval_columns["position"])]
  print("  oracle on eval:")
  for task, entry in report.items():
    print(f"    {task:8s} {entry['oracle']:24s} AUC {entry['oracle_auc']:.4f}  log-loss "
          f"{entry['oracle_logloss']:.4f}  ({entry['examples']:,} examples)")
  print(f"    ctr by relevance alone (position left out): AUC "
        f"{metrics.auc(eval_columns['click'], relevance):.4f}")


def main(argv):
  del argv
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  for requests in map(int, FLAGS.requests):
    data_dir = os.path.join(FLAGS.work_dir, f"synthetic-{requests}")
    print(f"--synthetic_requests={requests:,}:", flush=True)
    if not os.path.exists(os.path.join(data_dir, schema_lib.SCHEMA_FILENAME)):
      result = convert(data_dir, requests)
      impressions = requests * 10 * 3 // 2  # train, eval and calibration
      print(f"  converted {impressions:,} impressions in {result['seconds']:.1f}s "
            f"({impressions / result['seconds']:,.0f}/s; process {result['wall']:.1f}s, "
            f"peak RSS {result['peak_rss_mb']:,.0f} MiB)", flush=True)
    describe(data_dir)
  if FLAGS.train:
    first = int(FLAGS.requests[0])
    data_dir = os.path.join(FLAGS.work_dir, f"synthetic-{first}")
    result = runner.run(RunConfig(train_files=f"{data_dir}/train-*",
                                  eval_files=f"{data_dir}/eval-*", export_dir="",
                                  output_dir=os.path.join(FLAGS.work_dir, "run"), quiet=True))
    monitor = result.summary["monitor"]
    print(f"\nThe default run ({result.summary['model']}, best epoch {monitor['best_epoch']} of "
          f"{monitor['epochs_trained']}) on --synthetic_requests={first:,}:")
    print(oracle_report.format_table(result.summary["oracle"]))


if __name__ == "__main__":
  app.run(main)
