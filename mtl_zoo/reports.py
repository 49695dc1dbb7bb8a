"""A run's reports: the summary written to metrics.json and what is printed.

`runner.run` trains; this module turns its fitted models (each with a `name`
and the `report` dict `runner.fit_model` fills) into the summary, prints the
eval tables and measures the strategy's ranking score against every objective.
"""

from typing import Dict, Optional, Sequence

from mtl_zoo import metrics as metrics_lib
from mtl_zoo import models
from mtl_zoo import strategies
from mtl_zoo._keras import keras
from mtl_zoo.config import RunConfig
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import validation


def say(config: RunConfig, text: str) -> None:
  """Prints `text` unless the run is quiet."""
  if not config.quiet:
    print(text, flush=True)


def summary(config: RunConfig, fitted: Sequence, schema: schema_lib.Schema,
            fusion: Optional[dict], train_pattern: str, eval_pattern: Optional[str],
            workers: int) -> dict:
  """The run's summary: settings, what each model learned, eval metrics.

  Args:
    config: the run's settings.
    fitted: the run's trained models (`name`, `report`), one per strategy model.
    schema: the schema the combined model serves.
    fusion: the ranking fusion, if the strategy fuses outputs.
    train_pattern, eval_pattern: the data trained and evaluated on.
    workers: the cluster's worker count (1 without one).

  Returns:
    The dict written to `metrics.json` (the runner adds calibration, oracle,
    ranking and export entries); several models' values keyed by model name.
  """
  return {"strategy": config.strategy, "model": config.architecture,
          "loss_weighting": config.loss_weighting,
          "balancer_options": config.balancer_options,
          "balance_on": config.balance_on, "masked_loss": config.masked_loss,
          "event_weights": {t.name: t.events for t in schema.tasks
                            if t.events and t.type == schema_lib.BINARY},
          "grades": {t.name: t.events for t in schema.tasks
                     if t.type == schema_lib.RANKING},
          "examples_past_list_size": (_merged(fitted, "examples_past_list_size")
                                      if schema.list_size else None),
          "fusion": fusion,
          "hyperparameters": models.hyperparameters_of(
              config.architecture, config.hyperparameters, with_defaults=True),
          "tasks": schema.task_names,
          "train_files": train_pattern, "eval_files": eval_pattern,
          "max_epochs": config.max_epochs, "batch_size": config.batch_size,
          "monitor": _merged(fitted, "monitor"),
          "steps_per_epoch": _merged(fitted, "steps_per_epoch"),
          "distribution": config.distribution, "workers": workers,
          "resumed_from": _merged(fitted, "resumed_from"),
          "learning_rate": config.learning_rate,
          "learning_rate_decay_steps": config.learning_rate_decay_steps, "seed": config.seed,
          "train_seconds": round(sum(run.report["train_seconds"] for run in fitted), 2),
          "cache": _merged(fitted, "cache"),
          "train_loss": _merged_dicts(fitted, "train_loss"),
          "task_weights": _merged_dicts(fitted, "task_weights"),
          "eval": {task: values for run in fitted for task, values in
                   run.report["eval"].items()},
          "eval_at_logged_positions": {
              task: values for run in fitted
              for task, values in run.report.get("eval_at_logged_positions", {}).items()},
          "gates": _merged_dicts(fitted, "gates"),
          "bad_records": bad_records_report(config, fitted)}


def print_eval(config: RunConfig, eval_pattern: str, run_summary: dict) -> None:
  """Prints the eval metrics (before and after calibration) and the gates.

  Args:
    config: the run's settings (`quiet` silences it).
    eval_pattern: the eval data, named in the heading.
    run_summary: `summary`'s dict, after calibration.
  """
  say(config, "\nEval metrics (" + eval_pattern + "):")
  columns = ["auc", "logloss", "pcoc", "ece", "ne", "mse", "positive_rate", "examples"]
  say(config, metrics_lib.format_table(run_summary["eval"], columns))
  if "eval_uncalibrated" in run_summary:
    say(config, "As trained, before the negative-sampling correction and calibrators:")
    say(config, metrics_lib.format_table(run_summary["eval_uncalibrated"], columns))
  if run_summary.get("eval_at_logged_positions"):
    say(config, "Tasks the bias tower shaped, at the logged positions (the model as trained, "
        "tower included, negative sampling corrected; the served probabilities above are "
        "debiased, so they need not match clicks the position shaped):")
    say(config, metrics_lib.format_table(run_summary["eval_at_logged_positions"], columns))
  for gate, gate_summary in run_summary["gates"].items():
    weights = " ".join(f"{w:.2f}" for w in gate_summary["mean_weights"])
    starved = gate_summary["starved_experts"]
    say(config, f"gate {gate}: mean expert weights [{weights}], normalized entropy "
         f"{gate_summary['normalized_entropy']:.2f}"
        + (f", starved experts {starved}" if starved else ""))


def bad_records_report(config: RunConfig, fitted: Sequence) -> dict:
  """The bad-record policy and what each run's data lost (printed with skip).

  Args:
    config: the run's settings.
    fitted: the run's trained models; each report has `skipped` per data split.

  Returns:
    {"policy", "skipped" (counts per split, per model when several), "damage"}.
  """
  skipped = {run.name: {data: s.counts() for data, s in run.report["skipped"].items()}
             for run in fitted}
  report = {"policy": config.bad_records,
            "skipped": skipped[fitted[0].name] if len(fitted) == 1 else skipped,
            "damage": sorted({str(d) for run in fitted
                              for s in run.report["skipped"].values() for d in s.damage})}
  if config.bad_records == validation.SKIP:
    say(config, "\nBad records (--bad_records=skip):")
    for run in fitted:
      for data, s in run.report["skipped"].items():
        say(config, f"  {data}" + (f" ({run.name})" if len(fitted) > 1 else "")
            + f": {s.summary()}")
  return report


def _merged(fitted: Sequence, key: str):
  """One run's value as is; several runs' values by run name."""
  if len(fitted) == 1:
    return fitted[0].report[key]
  return {run.name: run.report[key] for run in fitted}


def _merged_dicts(fitted: Sequence, key: str) -> dict:
  """One run's dict as is; several runs' dicts with keys prefixed by run name."""
  if len(fitted) == 1:
    return fitted[0].report[key]
  return {f"{run.name}/{k}": v for run in fitted for k, v in run.report[key].items()}


def ranking_report(config: RunConfig, model: keras.Model, schema: schema_lib.Schema,
                   data_schema: schema_lib.Schema, eval_pattern: str,
                   fusion: Optional[dict], train_pattern: str) -> Dict[str, float]:
  """How the strategy's one ranking score (the fused outputs, or the only
  output) serves each of the data's objectives on the eval data; printed.
  Where the schema names the item, novelty is counted against the items'
  popularity in the training data (one pass over its item column).

  Args:
    config: the run's settings.
    model: the served model; `schema` its (training) schema.
    data_schema: the data's schema, with the objectives' label columns.
    eval_pattern, train_pattern: the eval data scored, the training data
      popularity is counted on.
    fusion: the strategy's fusion; None fuses per the data's default.

  Returns:
    Metric name -> value (AUC per objective, GAUC, NDCG, beyond-accuracy);
    empty when the data has no binary objective.

  Raises:
    metrics.MetricError: a metric that would be NaN (names the column).
  """
  if not strategies.funnel(data_schema):
    return {}  # no binary objectives to rank by
  columns = reader.read_columns(eval_pattern, data_schema, bad_records=config.bad_records)
  outputs = metrics_lib.predict_columns(model, schema, columns)
  outputs = {task: outputs[task] for task in schema.task_names}
  if fusion is None and len(outputs) > 1:
    fusion = strategies.default_fusion(data_schema)
  popularity = (metrics_lib.popularity(reader.count_ids(
      train_pattern, data_schema, data_schema.item_id, config.bad_records))
                if data_schema.item_id and data_schema.request_id else None)
  report = strategies.objective_report(
      strategies.ranking_score(outputs, columns, fusion, data_schema), columns,
      data_schema, item_popularity=popularity, beyond_k=config.beyond_k)
  how = (f"{fusion['mode']} of " + ", ".join(f"{t}^{w:g}" if fusion["mode"] == "product"
                                             else f"{w:g}*{t}"
                                             for t, w in zip(fusion["terms"],
                                                             fusion["weights"]))
         if fusion else f"the {next(iter(outputs))} output")
  say(config, f"\nRanking score ({how}) against each objective:")
  say(config, metrics_lib.format_table({"score": report}))
  return report
