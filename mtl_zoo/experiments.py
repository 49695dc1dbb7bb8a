"""Repeated, seeded train-and-evaluate runs and their statistics, for comparisons.

The experiment scripts in scripts/ are thin loops over `run_trial`; use it the
same way to compare architectures or weighting methods on your own data.
"""

import math
import time
from typing import Dict, Optional, Sequence

import numpy as np

from mtl_zoo import metrics, models
from mtl_zoo._keras import keras
from pipelines import reader
from pipelines import schema as schema_lib

# Two-sided 95% Student-t critical values by degrees of freedom (1..30).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
        2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
        2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def run_trial(schema: schema_lib.Schema, train_pattern: str,
              eval_patterns: Dict[str, str], model_name: str, hparams: dict,
              epochs: int, batch_size: int, learning_rate: float, seed: int,
              weighting: str = "fixed", curve_split: Optional[str] = None,
              num_train_examples: Optional[int] = None) -> dict:
  """Builds, trains and evaluates one model; returns its metrics per eval split.

  The schema is adapted to the architecture (`models.training_schema`). With
  `curve_split`, that split is also evaluated after every epoch (needs
  `num_train_examples` to report steps).
  """
  keras.utils.set_random_seed(seed)
  schema = models.training_schema(model_name, schema)
  model = models.build(model_name, schema, **hparams)
  trainable = models.compile_model(model, schema, learning_rate=learning_rate,
                                   weighting=weighting)
  train = reader.make_dataset(train_pattern, schema, batch_size, seed=seed)
  heldout = {split: reader.make_dataset(p, schema, 8192, shuffle=False)
             for split, p in eval_patterns.items()}
  callbacks = []
  if curve_split:
    steps = math.ceil((num_train_examples or 0) / batch_size)
    callbacks.append(metrics.EpochEvaluation(model, schema, heldout[curve_split], steps))
  start = time.perf_counter()
  trainable.fit(train, epochs=epochs, verbose=0, callbacks=callbacks)
  seconds = time.perf_counter() - start
  predict = metrics.predict_function(model)
  result = {"model": model_name, "weighting": weighting, "seed": seed,
            "train_seconds": seconds,
            "metrics": {split: metrics.evaluate(model, schema, ds, predict)
                        for split, ds in heldout.items()}}
  if curve_split:
    result["curve"] = callbacks[0].curve
  return result


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
