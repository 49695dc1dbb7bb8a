"""scripts/baseline_logreg.py: a logistic regression per binary task."""

import json
import subprocess
import sys

from conftest import REPO


def test_logistic_regression_baseline_learns_each_task(ads_dir, tmp_path):
  output = tmp_path / "baseline.json"
  run = subprocess.run(
      [sys.executable, "scripts/baseline_logreg.py", f"--train_files={ads_dir}/train-*",
       f"--eval_files={ads_dir}/eval-*", "--Cs=0.01,1", f"--output={output}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| ctr |" in run.stdout and "| cvr |" in run.stdout
  results = json.load(open(output))["tasks"]
  # The synthetic log's clicks and conversions depend on its ids and numbers.
  assert results["ctr"]["eval_auc"] > 0.6 and results["cvr"]["eval_auc"] > 0.55
  for task in results.values():
    assert task["C"] in (0.01, 1.0)
    assert task["eval_auc"] == max(task["tried"].values())  # tuned on eval
    assert 0 < task["eval_logloss"] < 0.7
  # CVR learns on clicked impressions only: fewer examples than CTR.
  assert results["cvr"]["train_examples"] < results["ctr"]["train_examples"] == 3000
