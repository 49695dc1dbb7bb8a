"""Model vs oracle: the eval metrics a perfect model would reach on the same eval
examples, where the data comes with its true probabilities (`pipelines.oracle`,
written by generated sources such as the built-in synthetic log).

The oracle's prediction for each task is scored exactly as the model's eval
metrics are (`metrics.task_metrics` over the targets and masks of
`pipelines.targets`), so the gap is what the model leaves on the table: AUC
gap = oracle AUC - model AUC, log-loss gap = model log-loss - oracle log-loss,
both >= 0 up to sampling noise.
"""

from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from mtl_zoo import metrics as metrics_lib
from pipelines import oracle as oracle_lib
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import targets
from pipelines import validation

# The row of a tower-shaped task's metrics as trained: "ctr at logged positions".
AT_LOGGED_POSITIONS = "at logged positions"
COLUMNS = ["oracle", "examples", "model_auc", "oracle_auc", "auc_gap", "model_logloss",
           "oracle_logloss", "logloss_gap"]


def compare(schema: schema_lib.Schema, eval_pattern: str,
            model_eval: Dict[str, Dict[str, float]],
            bad_records: str = validation.FAIL,
            at_logged_positions: Optional[Dict[str, Dict[str, float]]] = None
            ) -> Dict[str, dict]:
  """Per task, the model's eval AUC and log-loss beside the oracle's.

  A task a bias tower shaped is served debiased, so where the oracle knows the
  position-free probabilities it is compared with those, and its metrics as
  trained at the logged positions with the oracle's own (a row
  "<task> at logged positions"): each comparison then asks of the model only
  what it could know.

  Args:
    schema: the schema the model was evaluated with (its tasks and masks).
    eval_pattern: the eval data's files; their oracle is looked for beside them.
    model_eval: the model's eval metrics, task -> {"auc", "logloss", ...}.
    bad_records: the run's policy, so that the same records are read.
    at_logged_positions: the metrics of the tasks a bias tower shaped, as
      trained at the logged positions (the run's `eval_at_logged_positions`).

  Returns:
    {} when the eval data has no oracle. Otherwise row -> {"oracle" (what it
    predicts), "examples", "model_auc", "oracle_auc", "auc_gap" and, for binary
    tasks, the same for "logloss"}, one row per task (and one more per task a
    tower shaped); a task the oracle cannot score (or data it does not cover)
    -> {"skipped": why}.
  """
  try:
    truth = oracle_lib.find(eval_pattern)
  except ValueError as e:  # a damaged oracle costs its report, not the run
    return {t: {"skipped": str(e)} for t in schema.task_names}
  if truth is None:
    return {}
  key = [schema.request_id, oracle_lib.KEY[1]]
  if not schema.request_id or key[1] not in schema.feature_names:
    return {t: {"skipped": f"the records have no join key {list(oracle_lib.KEY)}"}
            for t in schema.task_names}
  columns = reader.read_columns(eval_pattern, schema, bad_records=bad_records)
  try:
    rows = truth.rows_of(columns[key[0]], columns[key[1]])
  except KeyError as e:
    return {t: {"skipped": f"the oracle beside {eval_pattern} is not this data's: {e.args[0]}"}
            for t in schema.task_names}
  report, scored, predictions = {}, [], {}
  for task in schema.tasks:
    probabilities = truth.task_probabilities(task)
    if isinstance(probabilities, str):
      report[task.name] = {"skipped": probabilities}
    else:
      scored.append(task.name)
      predictions[task.name] = np.asarray(probabilities, np.float64)[rows]
  if not scored:
    return report
  scored_schema = schema.with_tasks(scored)
  labels, weights = targets.split_for_tasks(
      scored_schema, {c: tf.constant(columns[c]) for c in scored_schema.labels})

  def oracle_metrics(chosen: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    return metrics_lib.task_metrics(scored_schema, {
        t: {"label": labels[t].numpy().ravel(), "weight": weights[t].numpy(),
            "prediction": chosen[t]} for t in scored})

  position_free = {}
  for name in set(at_logged_positions or {}) & set(scored):
    free = truth.task_probabilities(scored_schema.task(name), without_position=True)
    if not isinstance(free, str):
      position_free[name] = np.asarray(free, np.float64)[rows]
  logged = oracle_metrics(predictions)
  debiased = oracle_metrics({**predictions, **position_free}) if position_free else logged
  extra = {}  # task -> its row at the logged positions
  for task in scored_schema.tasks:
    if task.name in position_free:
      report[task.name] = _entry(describe(task, truth) + " without position",
                                 model_eval.get(task.name, {}), debiased[task.name])
      at_logged = f"{task.name} {AT_LOGGED_POSITIONS}"
      report[at_logged] = _entry(describe(task, truth), at_logged_positions[task.name],
                                 logged[task.name])
      extra[task.name] = at_logged
    else:
      report[task.name] = _entry(describe(task, truth), model_eval.get(task.name, {}),
                                 logged[task.name])
  return {row: report[row] for t in schema.task_names
          for row in ([t, extra[t]] if t in extra else [t])}


def _entry(oracle: str, model: Dict[str, float], best: Dict[str, float]) -> dict:
  """One row: the model's and the oracle's AUC (and log-loss), and the gaps."""
  entry = {"oracle": oracle, "examples": best["examples"]}
  for metric, sign in (("auc", 1.0), ("logloss", -1.0)):
    if metric in best:
      entry[f"model_{metric}"] = _value(model.get(metric))
      entry[f"oracle_{metric}"] = best[metric]
      entry[f"{metric}_gap"] = (sign * (best[metric] - entry[f"model_{metric}"])
                                if entry[f"model_{metric}"] is not None else None)
  return entry


def describe(task: schema_lib.Task, truth: oracle_lib.Oracle) -> str:
  """What the oracle predicts for a task, e.g. "P(conversion | click)"."""
  if task.events:
    return f"P({min(task.events, key=truth.funnel.index)})"
  return f"P({task.label}" + (f" | {task.mask})" if task.mask else ")")


def _value(value) -> Optional[float]:
  return None if value is None else float(value)


def format_table(report: Dict[str, dict]) -> str:
  """The report as printed: a markdown table, then the tasks skipped and why."""
  # "|" of "P(conversion | click)" escaped: it would split the markdown cell.
  rows = {task: {c: ("" if v is None else v.replace("|", "\\|") if isinstance(v, str) else v)
                 for c, v in entry.items()}
          for task, entry in report.items() if "skipped" not in entry}
  lines = ["Model vs oracle (the true probabilities, on the same eval examples; gaps "
           "are what the model leaves):"]
  if rows:
    lines.append(metrics_lib.format_table(rows, COLUMNS))
  lines += [f"  {task}: no oracle ({entry['skipped']})" for task, entry in report.items()
            if "skipped" in entry]
  return "\n".join(lines)
