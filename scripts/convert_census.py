"""Convert UCI Census-Income (KDD) to TFRecords + schema.json, MMoE-paper setup.

  python scripts/convert_census.py                                  # Group 1, shared data
  python scripts/convert_census.py --census_dir=/path/to/census-income \
      --out_dir=data/census_group2 --census_group=2

The same as `python -m pipelines.convert --source=census`, with defaults for this
checkout: the census files in ../shared/data/census-income beside the repository,
output in mtl_zoo_output/data/census_group1. Then:
  python -m mtl_zoo.train --train_files='<out_dir>/train-*' \
      --eval_files='<out_dir>/validation-*'
"""

import os
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import convert  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = ["--source=census",
            f"--census_dir={os.path.join(REPO, '..', 'shared', 'data', 'census-income')}",
            "--out_dir=" + os.path.join("mtl_zoo_output", "data", "census_group1")]

if __name__ == "__main__":
  # Flags given on the command line come after the defaults, so they win.
  app.run(convert.main, argv=[sys.argv[0], *DEFAULTS, *sys.argv[1:]])
