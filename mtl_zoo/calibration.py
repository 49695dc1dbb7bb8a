"""Calibration after training: the negative-sampling correction and per-task
calibrators become part of the model, and every run with eval data measures
calibration and draws a reliability diagram.

  model, report = calibration.finish(config, model, schema, calibration_pattern,
                                     eval_pattern, model_dir)

`prepare` checks the settings against the run's tasks before anything is
trained and finds the calibration split; `negative_sampling_spec` is what a
training reader samples; `finish` fits one calibrator per binary task (Platt or
isotonic) on the calibration split, wraps the model (`calibrated_model`: same
inputs, same output names, a calibration layer on each calibrated output) and
evaluates it. The runner saves and exports the wrapped model, so every serving
signature returns calibrated probabilities.

Order inside the model: output -> negative-sampling correction (engagement
task only) -> calibrator. Calibrators are fitted on corrected outputs, so they
only mop up what the correction leaves.

ESMM: each output that is a task of the model's schema is calibrated on its
own labels, the entire-space product ctr_cvr (pCTCVR) too, on conversion over
all impressions; after calibration ctr_cvr is therefore no longer exactly the
product of the calibrated ctr and cvr outputs.
"""

import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo import metrics as metrics_lib
from mtl_zoo._keras import input_names, keras
from mtl_zoo.config import ConfigError, RunConfig
from mtl_zoo.layers.calibration import LOGIT_EPSILON
from pipelines import files
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import shards

RELIABILITY_PLOT = "reliability.png"


def fit_platt(predictions: np.ndarray, labels: np.ndarray, iterations: int = 100
              ) -> Dict[str, float]:
  """Platt scaling: logistic regression of the labels on logit(prediction),
  with a slope of at least 0 (the map never reverses the model's order).

  Newton's method with step halving on the mean log-loss, in float64; the log-
  loss is convex, so where the unconstrained slope is negative the constrained
  optimum has slope 0.

  Args:
    predictions: the model's probabilities.
    labels: 0/1 labels, one per prediction.
    iterations: at most this many Newton steps.

  Returns:
    {"method": "platt", "slope": a, "intercept": b}: p -> sigmoid(a logit(p) + b).
  """
  eps = LOGIT_EPSILON
  p = np.clip(np.asarray(predictions, np.float64).ravel(), eps, 1 - eps)
  y = np.asarray(labels, np.float64).ravel()
  x = np.stack([np.log(p) - np.log1p(-p), np.ones_like(p)], axis=1)

  def loss(w):
    z = x @ w
    return float(np.mean(np.logaddexp(0, z) - y * z))

  w = np.array([1.0, 0.0])
  current = loss(w)
  for _ in range(iterations):
    s = 1 / (1 + np.exp(-(x @ w)))
    gradient = x.T @ (s - y) / y.size
    hessian = (x * (s * (1 - s))[:, None]).T @ x / y.size + 1e-9 * np.eye(2)
    step = np.linalg.solve(hessian, gradient)
    scale = 1.0
    while scale > 1e-6 and loss(w - scale * step) > current:
      scale /= 2
    w, previous = w - scale * step, current
    current = loss(w)
    if previous - current < 1e-12:
      break
  if w[0] < 0:
    # The best non-decreasing map: a calibrator never reverses the model's order
    # (a negative slope on a noisy calibration split would). Slope 0: the base rate.
    rate = np.clip(y.mean(), eps, 1 - eps)
    w = np.array([0.0, np.log(rate) - np.log1p(-rate)])
  return {"method": "platt", "slope": float(w[0]), "intercept": float(w[1])}


def pool_adjacent_violators(values: np.ndarray, weights: np.ndarray
                            ) -> Tuple[np.ndarray, np.ndarray]:
  """Isotonic regression of a sequence: the non-decreasing block means closest
  (weighted least squares) to `values`, in order.

  Args:
    values: the sequence, e.g. labels sorted by prediction.
    weights: positive weights, one per value.

  Returns:
    (block index per value, weighted mean per block); block means increase
    strictly (equal neighbours are pooled too).
  """
  sums, counts, starts = [], [], []
  for i, (v, w) in enumerate(zip(np.asarray(values, np.float64),
                                 np.asarray(weights, np.float64))):
    sums.append(v * w)
    counts.append(w)
    starts.append(i)
    while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
      pooled_sum, pooled_count = sums.pop(), counts.pop()
      sums[-1] += pooled_sum
      counts[-1] += pooled_count
      starts.pop()
  block = np.zeros(len(values), np.int64)
  block[starts[1:]] = 1
  return np.cumsum(block), np.array(sums) / np.array(counts)


def fit_isotonic(predictions: np.ndarray, labels: np.ndarray) -> Dict[str, object]:
  """Isotonic regression of the labels on the predictions (pool adjacent
  violators over the examples sorted by prediction, equal predictions pooled
  first), served as a piecewise-linear map through the blocks' centres.

  Each block becomes one knot: x its mean prediction, y its observed rate,
  kept within [0.5/n, 1 - 0.5/n] (n examples): a block without a positive
  among n says the rate is below about 1/n, not that it is 0, and a served 0
  would zero a fused product score. Between knots the map interpolates
  linearly, so close predictions get close probabilities instead of the
  steps of the fitted block function; outside the knots it stays at the end
  values.

  Args:
    predictions: the model's probabilities.
    labels: 0/1 labels, one per prediction.

  Returns:
    {"method": "isotonic", "x": knot positions, "y": knot values}.
  """
  p = np.asarray(predictions, np.float64).ravel()
  y = np.asarray(labels, np.float64).ravel()
  unique, inverse = np.unique(p, return_inverse=True)
  counts = np.bincount(inverse).astype(np.float64)
  rates = np.bincount(inverse, y) / counts
  block, means = pool_adjacent_violators(rates, counts)
  centres = np.bincount(block, unique * counts) / np.bincount(block, counts)
  floor = 0.5 / max(1, y.size)
  return {"method": "isotonic", "x": centres.tolist(),
          "y": np.clip(means, floor, 1 - floor).tolist()}


# One per config.CALIBRATION_METHODS.
FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def calibrator_layer(calibrator: dict, name: str) -> keras.layers.Layer:
  """The Keras layer serving a calibrator as `fit_platt`/`fit_isotonic` return it."""
  if calibrator["method"] == "platt":
    return layers.PlattCalibration(calibrator["slope"], calibrator["intercept"], name=name)
  return layers.IsotonicCalibration(calibrator["x"], calibrator["y"], name=name)


def calibrated_model(model: keras.Model, schema: schema_lib.Schema,
                     calibrators: Dict[str, dict],
                     negative_sampling: Optional[Tuple[str, float]] = None) -> keras.Model:
  """`model` with the negative-sampling correction and calibrators applied to
  its outputs: the same inputs and output names, so saving, exporting and
  every serving signature need nothing else.

  Args:
    model: a functional model with one output per task of `schema`.
    schema: the schema the model was built with.
    calibrators: task -> calibrator (`fit_platt`/`fit_isotonic`); other outputs
      pass through unchanged.
    negative_sampling: (task, rate): correct that task's output for training
      on a fraction `rate` of its negatives, before its calibrator.

  Returns:
    A functional model that nests `model`, named as it.
  """
  inputs = layers.schema_inputs(schema)
  produced = model({name: inputs[name] for name in input_names(model)})
  outputs = {}
  for task in schema.task_names:
    corrected = negative_sampling is not None and negative_sampling[0] == task
    tensor = produced[task]
    # Keras names an output after its last layer, which therefore takes the task's
    # name (a pass-through where nothing else comes last).
    if corrected:
      tensor = layers.NegativeSamplingCorrection(
          negative_sampling[1],
          name=f"{task}_negative_sampling" if task in calibrators else task)(tensor)
    if task in calibrators:
      tensor = calibrator_layer(calibrators[task], name=task)(tensor)
    elif not corrected:
      tensor = keras.layers.Activation("linear", name=task)(tensor)
    outputs[task] = tensor
  return keras.Model(inputs, outputs, name=model.name)


def engagement_task(schema: schema_lib.Schema) -> Optional[schema_lib.Task]:
  """The first binary task: the one whose negatives --negative_sampling samples."""
  return next((t for t in schema.tasks if t.type == schema_lib.BINARY), None)


def _sampled_labels(task: schema_lib.Task) -> Tuple[str, ...]:
  """Label columns any of which makes a row a positive of `task`."""
  return tuple(task.events) if task.events else (task.label,)


def negative_sampling_spec(config: RunConfig, schema: schema_lib.Schema
                           ) -> Optional[Tuple[Tuple[str, ...], float]]:
  """What a training reader of one model samples (`reader.make_dataset`'s
  `negative_sampling`), or None.

  Args:
    config: the run's settings (`negative_sampling`).
    schema: the training schema of one model of the run.

  Returns:
    (label columns of the model's first unmasked binary task, rate), or None:
    without --negative_sampling, with a rate of 1, or for a model of masked
    tasks only (--strategy=fusion's cvr model), which reads every row.
  """
  rate = config.negative_sampling
  if rate is None or rate >= 1:
    return None
  task = next((t for t in schema.tasks if t.type == schema_lib.BINARY and not t.mask), None)
  return (_sampled_labels(task), rate) if task else None


def prepare(config: RunConfig, schemas: Sequence[schema_lib.Schema], train_pattern: str,
            eval_pattern: Optional[str]) -> Optional[str]:
  """Checks --calibrate and --negative_sampling against the run's tasks and
  finds the calibration split, before anything is trained.

  Args:
    config: the run's settings.
    schemas: the training schema of every model of the run.
    train_pattern: the training data.
    eval_pattern: the eval data, or None.

  Returns:
    The calibration data's pattern with --calibrate, else None.

  Raises:
    ConfigError: naming the setting and the fix.
  """
  tasks = [t for schema in schemas for t in schema.tasks]
  binary = [t for t in tasks if t.type == schema_lib.BINARY]
  for name in ("calibrate", "negative_sampling"):
    if getattr(config, name) is not None and not binary:
      raise ConfigError(f"--{name} applies to binary tasks' probabilities; this run's tasks "
                        f"{[t.name for t in tasks]} have none. Drop --{name}.")
  if config.negative_sampling is not None:
    _check_negative_sampling(binary[0], tasks)
  if not config.calibrate:
    return None
  pattern, builtin = config.calibration_files, None
  if not pattern and not config.train_files:
    builtin = files.join(train_pattern.rsplit("/", 1)[0], "calibration-*")
    pattern = builtin if tf.io.gfile.glob(builtin) else None
  if not pattern:
    raise ConfigError(
        f"--calibrate={config.calibrate} fits its calibrators on a calibration split that "
        "is neither the training nor the eval data, and this run has none"
        + (f" (the built-in data has no {builtin} split)" if builtin else "")
        + ": pass --calibration_files=<glob of such shards>.")
  try:
    calibration = set(shards.list_files(pattern))
  except FileNotFoundError as e:
    raise ConfigError(f"--calibration_files={pattern}: {e}") from None
  for name, other in (("train_files", train_pattern), ("eval_files", eval_pattern)):
    shared = sorted(calibration & set(shards.list_files(other))) if other else []
    if shared:
      raise ConfigError(f"--calibration_files={pattern} shares {shared[:3]} with --{name}="
                        f"{other}: calibrators fitted on data the model is trained or "
                        "evaluated on look better than they are. Use a split of its own.")
  return pattern


def _check_negative_sampling(engagement: schema_lib.Task,
                             tasks: Sequence[schema_lib.Task]) -> None:
  """Every other task must be masked, through a chain of masks, by the
  engagement task's label: only then is it trained on rows sampling keeps whole."""
  if engagement.mask:
    raise ConfigError(f"--negative_sampling samples the negatives of the first binary task, "
                      f"{engagement.name}, which is masked by {engagement.mask}: sample a "
                      "task trained on every row (put it first with --tasks).")
  kept = set(_sampled_labels(engagement))
  others = [t for t in tasks if t.name != engagement.name]
  changed = True
  while changed:
    changed = False
    for task in others:
      if task.mask in kept and task.label not in kept:
        kept.add(task.label)
        changed = True
  biased = [t.name for t in others if t.mask not in kept]
  if biased:
    raise ConfigError(
        f"--negative_sampling drops rows where {'/'.join(_sampled_labels(engagement))} is 0, "
        f"and tasks {biased} are trained on those rows too (no mask by "
        f"{engagement.label}), so their predictions would be biased. Train them without "
        "--negative_sampling, or choose tasks masked by the engagement label (--tasks; "
        "esmm's entire-space tasks train on every row).")


def finish(config: RunConfig, model: keras.Model, schema: schema_lib.Schema,
           calibration_pattern: Optional[str], eval_pattern: Optional[str],
           model_dir: str) -> Tuple[keras.Model, dict]:
  """After training: corrects and calibrates the model as the settings say,
  evaluates it and draws `<model_dir>/reliability.png`.

  Args:
    config: the run's settings (`calibrate`, `negative_sampling`, ...).
    model: the trained model (all tasks of `schema`).
    schema: its schema.
    calibration_pattern: the calibration split (`prepare`), or None.
    eval_pattern: the eval data, or None.
    model_dir: where the reliability diagram goes.

  Returns:
    (the model to save and export, entries for the run's summary): with a
    correction or calibrators, "calibration" (their parameters), "eval" (of
    the returned model) and "eval_uncalibrated" (of the model as trained);
    with eval data and binary tasks, "reliability_plot".
  """
  report = {}
  engagement = engagement_task(schema)
  correction = ((engagement.name, config.negative_sampling)
                if config.negative_sampling and config.negative_sampling < 1 else None)
  final = model
  if correction or config.calibrate:
    calibrators = {}
    if config.calibrate:
      calibrators = fit_calibrators(config, calibrated_model(model, schema, {}, correction),
                                    schema, calibration_pattern)
    final = calibrated_model(model, schema, calibrators, correction)
    report["calibration"] = {
        "method": config.calibrate, "calibration_files": calibration_pattern,
        "negative_sampling": ({"task": correction[0], "rate": correction[1]}
                              if correction else None),
        "calibrators": calibrators}
  binary = [t.name for t in schema.tasks if t.type == schema_lib.BINARY]
  if not eval_pattern or not (binary or final is not model):
    return final, report
  collected = {"served": _collect(config, final, schema, eval_pattern)}
  if final is not model:
    collected["as trained"] = _collect(config, model, schema, eval_pattern)
    report["eval"] = metrics_lib.task_metrics(schema, collected["served"])
    report["eval_uncalibrated"] = metrics_lib.task_metrics(schema, collected["as trained"])
  if binary:
    path = files.join(model_dir, RELIABILITY_PLOT)
    with files.atomic_open(path, "wb") as f:
      f.write(reliability_png(collected, binary))
    report["reliability_plot"] = path
  return final, report


def fit_calibrators(config: RunConfig, model: keras.Model, schema: schema_lib.Schema,
                    pattern: str) -> Dict[str, dict]:
  """One `config.calibrate` calibrator per binary task, fitted on `model`'s
  predictions over the calibration data, each on its task's masked-in rows
  (cvr on clicked impressions).

  Returns:
    task -> calibrator, with "examples": the rows it was fitted on.
  """
  collected = _collect(config, model, schema, pattern)
  calibrators = {}
  for task in schema.tasks:
    if task.type != schema_lib.BINARY:
      continue
    data = collected[task.name]
    keep = data["weight"] > 0
    if not keep.any():
      raise ConfigError(f"--calibration_files={pattern} holds no rows of task {task.name}"
                        + (f" (none with {task.mask} set)" if task.mask else "")
                        + "; calibrators need some.")
    fitted = FITTERS[config.calibrate](data["prediction"][keep], data["label"][keep])
    calibrators[task.name] = {**fitted, "examples": int(keep.sum())}
  if not config.quiet:
    print(f"\nCalibrators ({config.calibrate}) fitted on {pattern}: " + ", ".join(
        f"{t} ({c['examples']} examples)" for t, c in calibrators.items()), flush=True)
  return calibrators


def _collect(config: RunConfig, model: keras.Model, schema: schema_lib.Schema,
             pattern: str) -> Dict[str, Dict[str, np.ndarray]]:
  """Predictions, labels and masks over all of `pattern`'s data, unsampled."""
  ds = reader.make_dataset(pattern, schema, 8192, shuffle=False, cache=False,
                           group_lists=False, bad_records=config.bad_records)
  return metrics_lib.collect(model, ds)


def reliability_png(collected: Dict[str, Dict[str, Dict[str, np.ndarray]]],
                    tasks: List[str]) -> bytes:
  """A reliability diagram as PNG bytes: one panel per task, the mean
  prediction against the observed rate in each of the ECE's equal-frequency
  bins (`metrics.calibration_bins`), one curve per model, and the diagonal.

  Args:
    collected: curve label (e.g. "served") -> `metrics.collect` output.
    tasks: binary tasks to draw.
  """
  # The object-oriented API on an Agg canvas: no pyplot state, no display.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(4.2 * len(tasks), 4.2))
  FigureCanvasAgg(figure)
  for i, task in enumerate(tasks):
    axes = figure.add_subplot(1, len(tasks), i + 1)
    top = 0.0
    for label, data in collected.items():
      keep = data[task]["weight"] > 0
      y, p = data[task]["label"][keep], data[task]["prediction"][keep]
      binned = metrics_lib.calibration_bins(y, p)
      ece = metrics_lib.expected_calibration_error(y, p)
      axes.plot(binned["prediction"], binned["rate"], ".-",
                label=f"{label} (ECE {ece:.4f})")
      top = max([top, *binned["prediction"], *binned["rate"]])
    top = min(1.0, 1.05 * top) or 1.0
    axes.plot([0, top], [0, top], "k--", linewidth=0.8, label="perfect")
    axes.set(xlim=(0, top), ylim=(0, top), title=task, xlabel="mean prediction",
             ylabel="observed rate")
    axes.legend(fontsize=7, loc="upper left")
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()
