#!/usr/bin/env bash
# The issue-13 quality runs on the built-in realistic log, default flags: the
# default size (120k training impressions) and 1M, each with the tuned
# logistic-regression baseline; then calibration (isotonic) and 10% negative
# sampling on the 1M log. Prints each run's report; see BUILD_NOTES "Generator
# version 3" (and, for version 2's log, "Quality on the realistic log").
#   bash scripts/quality_runs.sh [output_dir]
set -euo pipefail
out="${1:-quality_runs}"
export TF_CPP_MIN_LOG_LEVEL=2
for requests in 12000 100000; do
  dir="$out/r$requests"
  python -m mtl_zoo.train --output_dir="$dir" --model_dir="$dir/run" \
      --synthetic_requests=$requests
  data=$(ls -d "$dir"/data/synthetic-v3*)
  python scripts/baseline_logreg.py --data_dir="$data"
done
dir="$out/r100000"
data=$(ls -d "$dir"/data/synthetic-v3*)
python -m mtl_zoo.train --train_files="$data/train-*" --eval_files="$data/eval-*" \
    --calibrate=isotonic --calibration_files="$data/calibration-*" \
    --model_dir="$dir/isotonic" --export_dir=
python -m mtl_zoo.train --train_files="$data/train-*" --eval_files="$data/eval-*" \
    --negative_sampling=0.1 --model_dir="$dir/sampled" --export_dir=
