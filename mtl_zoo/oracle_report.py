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

COLUMNS = ["oracle", "examples", "model_auc", "oracle_auc", "auc_gap", "model_logloss",
           "oracle_logloss", "logloss_gap"]


def compare(schema: schema_lib.Schema, eval_pattern: str,
            model_eval: Dict[str, Dict[str, float]],
            bad_records: str = validation.FAIL) -> Dict[str, dict]:
  """Per task, the model's eval AUC and log-loss beside the oracle's.

  Args:
    schema: the schema the model was evaluated with (its tasks and masks).
    eval_pattern: the eval data's files; their oracle is looked for beside them.
    model_eval: the model's eval metrics, task -> {"auc", "logloss", ...}.
    bad_records: the run's policy, so that the same records are read.

  Returns:
    {} when the eval data has no oracle. Otherwise task -> {"oracle" (what it
    predicts), "examples", "model_auc", "oracle_auc", "auc_gap" and, for binary
    tasks, the same for "logloss"}; a task the oracle cannot score (or data it
    does not cover) -> {"skipped": why}.
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
  oracle_eval = metrics_lib.task_metrics(scored_schema, {
      t: {"label": labels[t].numpy().ravel(), "weight": weights[t].numpy(),
          "prediction": predictions[t]} for t in scored})
  for task in scored_schema.tasks:
    model, best = model_eval.get(task.name, {}), oracle_eval[task.name]
    entry = {"oracle": describe(task, truth), "examples": best["examples"]}
    for metric, sign in (("auc", 1.0), ("logloss", -1.0)):
      if metric in best:
        entry[f"model_{metric}"] = _value(model.get(metric))
        entry[f"oracle_{metric}"] = best[metric]
        entry[f"{metric}_gap"] = (sign * (best[metric] - entry[f"model_{metric}"])
                                  if entry[f"model_{metric}"] is not None else None)
    report[task.name] = entry
  return {t: report[t] for t in schema.task_names}


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
