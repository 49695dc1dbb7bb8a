"""Repeated, seeded train-and-evaluate runs and their statistics, for comparisons.

The experiment scripts in scripts/ are thin loops over `run_trial`; use it the
same way to compare architectures or weighting methods on your own data.
"""

import math
import tempfile
from typing import Dict, Optional, Sequence

import numpy as np

from mtl_zoo import config as config_lib
from mtl_zoo import metrics, runner
from pipelines import reader
from pipelines import schema as schema_lib

# Two-sided 95% Student-t critical values by degrees of freedom (1..30).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
        2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
        2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def run_trial(schema: schema_lib.Schema, train_pattern: str,
              eval_patterns: Dict[str, str], model_name: str, hparams: dict,
              max_epochs: int, batch_size: int, learning_rate: float, seed: int,
              weighting: str = "fixed", curve_split: Optional[str] = None,
              patience: Optional[int] = None, learning_rate_decay_steps: int = 0) -> dict:
  """Trains one model with the training runner and evaluates it on each split.

  The run is the train CLI's (`runner.run`), quiet, with no export, in a
  temporary directory that is removed afterwards.

  Args:
    schema: the data's schema (adapted to the architecture by the runner).
    train_pattern: training shards.
    eval_patterns: split name -> shards, each evaluated after training.
    model_name: a MODELS name.
    hparams: its builder's hyper-parameters (others are refused).
    max_epochs, batch_size, learning_rate, seed: as the train flags.
    weighting: a loss balancer name.
    curve_split: also evaluate this split after every epoch (the validation
      data of early stopping); the result's `curve` holds those metrics per epoch.
    patience: as the train flag (0: train all max_epochs, keeping the best
      epoch by the validation split's mean AUC, or mean MSE when every task is
      a regression); default, the train CLI's.
    learning_rate_decay_steps: as the train flag; default 0, a constant rate (the
      setting of the recorded experiments, not the CLI's default).

  Returns:
    {"model", "weighting", "seed", "train_seconds", "metrics": split -> task ->
    metric -> value} and, with `curve_split`, "curve".
  """
  with tempfile.TemporaryDirectory(prefix="mtl_zoo-trial-") as output_dir:
    result = runner.run(config_lib.RunConfig(
        model=model_name, train_files=train_pattern,
        eval_files=eval_patterns[curve_split] if curve_split else None, schema=schema,
        output_dir=output_dir, export_dir="", loss_weighting=weighting,
        max_epochs=max_epochs, patience=patience if curve_split else None,
        batch_size=batch_size, learning_rate=learning_rate,
        learning_rate_decay_steps=learning_rate_decay_steps, hyperparameters=hparams,
        seed=seed, quiet=True))
  predict = metrics.predict_function(result.model)
  evaluated = {split: metrics.evaluate(result.model, result.schema,
                                       reader.make_dataset(p, result.schema, 8192,
                                                           shuffle=False),
                                       predict)
               for split, p in eval_patterns.items()}
  trial = {"model": model_name, "weighting": weighting, "seed": seed,
           "train_seconds": result.summary["train_seconds"], "metrics": evaluated}
  if curve_split:
    trial["curve"] = result.curve
  return trial


def mean_interval(values: Sequence[float]) -> Dict[str, float]:
  """Mean, standard deviation and the 95% confidence half-width of the mean."""
  values = np.asarray([v for v in values if not math.isnan(v)], np.float64)
  n = values.size
  if n == 0:
    return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
  std = float(values.std(ddof=1)) if n > 1 else 0.0
  t = _T95[min(n - 1, len(_T95)) - 1] if n > 1 else float("nan")
  return {"mean": float(values.mean()), "std": std,
          "ci95": t * std / math.sqrt(n) if n > 1 else float("nan"), "n": int(n)}
