"""Training as a library: one run from a `RunConfig`, reading no flags.

  from mtl_zoo import config, runner
  result = runner.run(config.RunConfig(train_files="data/train-*",
                                       eval_files="data/eval-*", model="mmoe"))
  result.model, result.summary["eval"]

`run` resolves the data (the built-in source when no files are given), trains
one model per the strategy (under --distribution, resuming from a backup when
`model_dir` is explicit), evaluates, reports, saves and exports. The train CLI
(`python -m mtl_zoo.train`), the experiment runs (`mtl_zoo.experiments`) and
the scripts all go through it.
"""

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from mtl_zoo import _keras
from mtl_zoo import balancers
from mtl_zoo import calibration
from mtl_zoo import distribute
from mtl_zoo import early_stopping
from mtl_zoo import layers
from mtl_zoo import metrics as metrics_lib
from mtl_zoo import models
from mtl_zoo import oracle_report
from mtl_zoo import reports
from mtl_zoo import serving
from mtl_zoo import strategies
from mtl_zoo._keras import keras
from mtl_zoo.compile import compile_model
from mtl_zoo.config import RESULT_FIELDS, STRATEGY_OPTIONS, ConfigError, RunConfig
from mtl_zoo.reports import say as _say
from pipelines import caching
from pipelines import files
from pipelines import manifest
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines import shards
from pipelines import targets
from pipelines import validation
from pipelines.sources import SOURCES


class DataError(Exception):
  """The data cannot be used as given; the message says what to change."""


class ExportError(Exception):
  """Training finished and its outputs are saved, but the export failed; the
  message says how to export the saved run."""


@dataclasses.dataclass
class RunResult:
  """What a run leaves: the trained model (outside any distribution strategy),
  the schema it serves, the summary written to metrics.json and, for one model
  trained with eval data, its eval metrics after every epoch (`curve`)."""

  model: Optional[keras.Model]
  schema: Optional[schema_lib.Schema]
  summary: dict
  curve: List[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Fitted:
  """One trained model of a run (a strategy may train several)."""

  name: str
  model: keras.Model
  schema: schema_lib.Schema
  report: dict
  curve: List[dict]


def run(config: RunConfig, on_epoch_end: Optional[Callable[[int, float], None]] = None
        ) -> RunResult:
  """Runs the whole job `config` describes.

  Args:
    config: the run's settings; validated first.
    on_epoch_end: called after every evaluated epoch with the 1-based epoch and
      the --monitor value as the metric reads (e.g. to prune a search's trial
      by raising); needs eval data.

  Returns:
    The trained model, its schema and the run's summary (also written to
    `<model_dir>/metrics.json`). On a non-chief worker of a cluster, whose
    chief writes the outputs, only a summary saying so.

  Raises:
    ConfigError: settings that do not apply or cannot be combined.
    DataError: data that cannot be used as given.
  """
  cluster = serve_if_server_task(config)
  config.validate()
  fusion = _parse_fusion(config)
  strategy = setup_distribution(config, cluster)
  chief = distribute.is_chief(cluster)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  model_dir = config.model_dir or files.join(config.output_dir, "runs",
                                             f"{config.run_label}-{stamp}")
  export_dir = (config.export_dir if config.export_dir is not None
                else files.join(config.output_dir, "export", config.run_label))
  writable_dir(model_dir, "model_dir")
  if export_dir and chief:
    writable_dir(export_dir, "export_dir")
  train_pattern, eval_pattern, data_schema = resolve_data(config)
  try:
    runs = training_runs(config, data_schema, train_pattern)
  except schema_lib.SchemaError as e:
    raise DataError(str(e)) from None
  tasks = [task for _, schema in runs for task in schema.task_names]
  monitor_spec = config.monitor_spec([t.type for _, schema in runs for t in schema.tasks])
  if config.serving_task and config.serving_task not in tasks:
    raise ConfigError(f"--serving_task={config.serving_task} is not a task of the model; "
                      f"its tasks are {tasks}.")
  if eval_pattern:
    try:
      early_stopping.Monitor(monitor_spec).check_tasks(tasks)
    except ValueError as e:
      raise ConfigError(f"--monitor={monitor_spec} {e}") from None
  if config.strategy == "fusion":
    fusion = fusion or strategies.default_fusion(data_schema)
  calibration_pattern = calibration.prepare(config, [s for _, s in runs], train_pattern,
                                            eval_pattern)
  check_balancer(config, runs)
  tf.io.gfile.makedirs(model_dir)
  keras.utils.set_random_seed(config.seed)

  workers = distribute.num_workers(config.distribution, cluster)
  fitted = [fit_model(config, name, schema, train_pattern, eval_pattern,
                      files.join(model_dir, name) if len(runs) > 1 else model_dir,
                      strategy, cluster, workers, on_epoch_end)
            for name, schema in runs]
  if not chief:
    # The chief holds the same weights and writes every output.
    _say(config, "Task %s %d finished; the chief writes the outputs." % distribute.role(cluster))
    return RunResult(None, None, {"model": config.architecture, "chief": False})
  if len(fitted) > 1:
    schema = data_schema.with_tasks([t for run in fitted for t in run.schema.task_names])
    model = models.combine_models([run.model for run in fitted], schema,
                                  name=config.run_label)
  else:
    model, schema = fitted[0].model, fitted[0].schema

  summary = reports.summary(config, fitted, schema, fusion, train_pattern, eval_pattern,
                            workers)
  # Negative-sampling correction and calibrators join the model saved and exported.
  model, calibrated = calibration.finish(config, model, schema, calibration_pattern,
                                         eval_pattern, model_dir)
  summary.update(calibrated)
  save_model(model, files.join(model_dir, "model.keras"))
  schema.save(files.join(model_dir, schema_lib.SCHEMA_FILENAME))
  if eval_pattern:
    reports.print_eval(config, eval_pattern, summary)
    summary["oracle"] = oracle_report.compare(schema, eval_pattern, summary["eval"],
                                              config.bad_records,
                                              summary.get("eval_at_logged_positions"))
    if summary["oracle"]:
      _say(config, "\n" + oracle_report.format_table(summary["oracle"]))
    try:
      summary["ranking"] = reports.ranking_report(config, model, schema, data_schema,
                                                  eval_pattern, fusion, train_pattern)
    except metrics_lib.MetricError as e:
      raise DataError(f"--eval_files={eval_pattern}: {e}") from None
  # Saved before the export, and the backup removed only after it: a failed
  # export loses nothing, and `python -m mtl_zoo.export --model_dir` redoes it.
  summary["backups"] = [run.report["backup_dir"] for run in fitted
                        if run.report["backup_dir"]]
  summary["export_settings"] = {"export_dir": export_dir, "serving_task": config.serving_task,
                                "keep": config.keep, "serving_threads": config.serving_threads}
  files.write_json(files.join(model_dir, "metrics.json"), summary)
  if export_dir:
    try:
      summary.update(export_run(model, schema, summary, config.bad_records))
    except Exception as e:
      raise ExportError(
          f"the export to {_shown(export_dir)} failed ({type(e).__name__}: {e}). The trained "
          f"model is saved in {_shown(model_dir)} (model.keras, metrics.json, and the "
          "backup); after fixing the cause, export it with: python -m mtl_zoo.export "
          f"--model_dir={model_dir}") from e
    files.write_json(files.join(model_dir, "metrics.json"), summary)
  for backup_dir in summary["backups"]:  # the run is complete: a rerun starts afresh
    distribute.remove_backup(backup_dir)
  _say(config, f"\nModel dir:   {_shown(model_dir)} (checkpoints/, logs/, metrics.json, "
       "model.keras)")
  if export_dir:
    _say(config, f"SavedModel:  {_shown(summary['export'])} (serving configs: "
         f"{', '.join(summary['serving_configs'])})")
  _say(config, f"TensorBoard: tensorboard --logdir {_shown(files.join(model_dir, 'logs'))}")
  return RunResult(model, schema, summary, fitted[0].curve if len(fitted) == 1 else [])


def export_run(model: keras.Model, schema: schema_lib.Schema, summary: dict,
               bad_records: str = validation.FAIL) -> dict:
  """Exports a trained run as its summary's `export_settings` say, with warm-up
  requests from its eval data and its fusion as the `rank` signature.

  Args:
    model: the run's model (as saved in model.keras).
    schema: its schema.
    summary: the run's summary (metrics.json).
    bad_records: the policy for reading the warm-up examples.

  Returns:
    {"export": the new version's path, "serving_configs": the config files}.
  """
  settings = summary["export_settings"]
  eval_pattern = summary.get("eval_files")
  warmup = (schema.serving_examples(reader.read_columns(
      eval_pattern, schema, limit=32, bad_records=bad_records)) if eval_pattern else None)
  export_dir = settings["export_dir"]
  path = serving.export_saved_model(model, schema, export_dir,
                                    serving_task=settings["serving_task"],
                                    warmup_examples=warmup, keep=settings["keep"],
                                    fusion=summary.get("fusion"))
  return {"export": path, "serving_configs": serving.write_serving_configs(
      export_dir, num_batch_threads=settings["serving_threads"])}


def _parse_fusion(config: RunConfig) -> Optional[dict]:
  try:
    fusion = layers.parse_fusion(config.fusion) if config.fusion else None
  except ValueError as e:
    raise ConfigError(f"--fusion: {e}") from None
  if fusion and config.strategy not in ("multi_task", "fusion"):
    raise ConfigError(f"--fusion fuses several task outputs; --strategy="
                      f"{config.strategy} trains a model with one output.")
  return fusion


def _shown(path: str) -> str:
  """A path as printed: absolute when local."""
  return os.path.abspath(path) if files.is_local(path) else path


def writable_dir(path: str, setting: str) -> None:
  """Fails now, rather than after training, if `path` cannot be created or
  written (its nearest existing ancestor decides); creates nothing.

  Args:
    path: a directory to be written.
    setting: the setting that named it, for the message.

  Raises:
    ConfigError: naming the setting and what is wrong.
  """
  existing = path
  while not tf.io.gfile.exists(existing):
    parent = os.path.dirname(existing.rstrip("/")) or "."
    if parent == existing:
      break
    existing = parent
  problem = None
  if not tf.io.gfile.isdir(existing):
    problem = f"{existing} is not a directory"
  elif files.is_local(existing) and not os.access(existing, os.W_OK | os.X_OK):
    problem = f"{existing} is not writable"
  if problem:
    raise ConfigError(f"--{setting}={path} cannot be written ({problem}); choose another "
                      f"--{setting}.")


def resolve_data(config: RunConfig) -> Tuple[str, Optional[str], schema_lib.Schema]:
  """The training pattern, the eval pattern (or None) and the data's schema.

  Without `train_files`, the built-in data of `config.source` is written under
  `<output_dir>/data` on first use and read from there afterwards.

  Args:
    config: the run's settings (the data: `train_files`, `eval_files`, `schema`,
      or `source` and its options under `output_dir`; `tasks`, `task_weights`).

  Returns:
    (training file pattern, eval file pattern or None, the data's schema with
    only the --tasks, weighted by --task_weights).

  Raises:
    DataError: files, or a schema, that cannot be found or read.
    ConfigError: --task_weights that do not fit the schema.
  """
  if config.train_files:
    train, evaluation = config.train_files, config.eval_files
  else:
    train, evaluation = _builtin_data(config)
  try:
    train_files = shards.list_files(train)
    if evaluation:
      shards.list_files(evaluation)
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  try:
    if isinstance(config.schema, schema_lib.Schema):
      schema = config.schema
    else:
      schema = schema_lib.Schema.load(config.schema or files.join(
          os.path.dirname(train_files[0]), schema_lib.SCHEMA_FILENAME))
    if config.tasks:
      schema = schema.with_tasks(config.tasks)
    if config.task_weights:
      schema = with_task_weights(schema, config.task_weights)
    schema.require_statistics()
  except (FileNotFoundError, schema_lib.SchemaError) as e:
    raise DataError(str(e)) from None
  return train, evaluation, schema


def with_task_weights(schema: schema_lib.Schema, spec: str) -> schema_lib.Schema:
  """`schema` with the loss weights of --task_weights ('ctr=1,cvr=0.5').

  Args:
    schema: the data's schema.
    spec: task=weight pairs; tasks not named keep their weight.

  Returns:
    The schema with those tasks' `loss_weight` replaced.

  Raises:
    ConfigError: a malformed entry or a task the schema does not have.
  """
  try:
    weights = strategies.parse_event_values(spec, "--task_weights")
  except schema_lib.SchemaError as e:
    raise ConfigError(str(e)) from None
  unknown = sorted(set(weights) - set(schema.task_names))
  if unknown:
    raise ConfigError(f"--task_weights names {unknown}, which are not tasks of the data; "
                      f"its tasks are {schema.task_names}.")
  negative = sorted(t for t, w in weights.items() if not 0 <= w < math.inf)
  if negative:
    raise ConfigError(f"--task_weights: the weights of {negative} must be finite and >= 0.")
  return schema.replace(tasks=[dataclasses.replace(t, loss_weight=weights.get(t.name,
                                                                              t.loss_weight))
                               for t in schema.tasks])


def _builtin_data(config: RunConfig) -> Tuple[str, str]:
  """(train, eval) patterns of the source's data, written if missing, in a
  directory named by the source, its options that differ from their defaults
  and the seed."""
  try:
    source = SOURCES[config.source]
  except KeyError:
    raise ConfigError(f"--source={config.source} is not a data source; choose one of "
                      f"{sorted(SOURCES)}.") from None
  try:
    values = source.option_values(config.source_options)
  except ValueError as e:
    raise ConfigError(f"--source={config.source}: {e}") from None
  changed = "".join(f"-{o.name}={values[o.name]}" for o in source.options
                    if values[o.name] != o.default)
  version = f"-v{source.version}" if source.version > 1 else ""
  data_dir = files.join(config.output_dir, "data",
                        f"{config.source}{version}{changed}-seed{config.seed}")
  if not tf.io.gfile.exists(files.join(data_dir, schema_lib.SCHEMA_FILENAME)):
    _say(config, f"Writing the {config.source} data to {data_dir} ...")
    try:
      source.write(data_dir, num_shards=4, compression=None, overwrite=False,
                   seed=config.seed, **config.source_options)
    except (FileNotFoundError, ValueError) as e:
      raise DataError(f"--source={config.source}: {e}") from None
  else:
    _say(config, f"Using the {config.source} data in {data_dir}")
  return files.join(data_dir, "train-*"), files.join(data_dir, "eval-*")


def training_runs(config: RunConfig, schema: schema_lib.Schema,
                  train_pattern: str) -> List[Tuple[str, schema_lib.Schema]]:
  """The models `config.strategy` trains.

  Args:
    config: the run's settings.
    schema: the data's schema.
    train_pattern: the training files (event weights are counted from them).

  Returns:
    (run name, training schema) per model.

  Raises:
    pipelines.schema.SchemaError: --event_weights or --grades that do not fit
      the data (e.g. events that are not label columns).
    DataError: training files that cannot be read to count the events.
  """
  architecture = config.architecture
  if config.strategy == "fusion":
    return [(task, models.training_schema(architecture, schema.with_tasks([task])))
            for task in schema.task_names]
  if config.strategy == "sample_weighting":
    schema = strategies.sample_weighting_schema(
        schema, event_weights(config, schema, train_pattern))
  elif config.strategy == "learning_to_rank":
    grades = (strategies.parse_event_values(config.grades, "--grades") if config.grades
              else strategies.default_grades(schema))
    schema = strategies.learning_to_rank_schema(schema, grades, config.option("list_size"),
                                                config.option("ranking_loss"))
  return [(architecture, models.training_schema(architecture, schema))]


def event_weights(config: RunConfig, schema: schema_lib.Schema,
                  train_pattern: str) -> Dict[str, float]:
  """--event_weights: explicit, or 'auto:<events>' (default: auto over the
  funnel's labels) from the training data's event counts.

  Args:
    config: the run's settings.
    schema: the data's schema (its funnel's labels).
    train_pattern: the training files, counted for 'auto'.

  Returns:
    event label column -> sample weight.

  Raises:
    pipelines.schema.SchemaError: events that are not label columns, or a
      malformed spec.
    DataError: training files that cannot be read for the counts.
  """
  spec = config.event_weights
  if spec and not spec.startswith("auto:"):
    return strategies.parse_event_values(spec, "--event_weights")
  events = ([e.strip() for e in spec[len("auto:"):].split(",") if e.strip()] if spec
            else [t.label for t in strategies.funnel(schema)])
  missing = [e for e in events if e not in schema.labels]
  if missing or not events:
    raise schema_lib.SchemaError(f"--event_weights: {missing or events} are not label "
                                 f"columns {schema.labels}.")
  try:
    return targets.event_weights_from_counts(
        targets.count_events(train_pattern, schema, events, bad_records=config.bad_records))
  except ValueError as e:  # BadRecordError too
    raise schema_lib.SchemaError(f"--event_weights: {e}") from None
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise DataError(explain_data_error(e, train_pattern, schema)) from None


def save_model(model: keras.Model, path: str) -> None:
  """Saves `model` (Keras format) to `path` through a temporary name: a crash
  leaves the previous file, never a truncated one.

  Args:
    model: the model to save.
    path: the `.keras` file, on any filesystem TensorFlow supports.
  """
  with files.atomic_path(path) as tmp:
    # Keras picks the format from the extension, which the temporary name keeps.
    model.save(tmp)


def count_examples(config: RunConfig, pattern: str, schema: schema_lib.Schema,
                   duplicate_task: Optional[str], skipped: validation.SkippedRecords,
                   list_overflow: Optional[validation.ListOverflow] = None,
                   negative_sampling=None) -> int:
  """Training examples in one pass: records, copies with --duplicate, or list
  slots (padding included) for ranking tasks, whose examples past list_size
  `list_overflow` counts; with --bad_records=skip, of the good records only, and
  `skipped` counts the others. Plain records are counted from the converter's
  manifest where it vouches for the files. With `negative_sampling`, the rows
  it keeps.

  Args:
    config: the run's settings (`bad_records`, `seed`).
    pattern: the training files.
    schema: the training schema.
    duplicate_task: the task whose event copies are counted (--duplicate), or None.
    skipped: receives the bad records left out.
    list_overflow: receives the examples past `list_size`, for ranking tasks.
    negative_sampling: (label columns, rate) or None.

  Returns:
    The number of training examples one epoch sees.
  """
  skip = config.bad_records == validation.SKIP
  if not duplicate_task and not schema.list_size and not skip and not negative_sampling:
    return reader.count_records(pattern)
  ds = reader.make_dataset(pattern, schema, 8192, shuffle=False, cache=False,
                           check_values=skip, duplicate_task=duplicate_task,
                           bad_records=config.bad_records, skipped=skipped,
                           list_overflow=list_overflow, negative_sampling=negative_sampling,
                           seed=config.seed)
  return sum(int(tf.shape(next(iter(labels.values())))[0]) for _, labels, _ in ds)


def examples_per_step(config: RunConfig, schema: schema_lib.Schema) -> int:
  """Examples in one training step.

  Args:
    config: the run's settings (`batch_size`).
    schema: the training schema.

  Returns:
    --batch_size, or for ranking tasks the slots of the whole lists that fit in
    it (at least one list).
  """
  if not schema.list_size:
    return config.batch_size
  return max(1, config.batch_size // schema.list_size) * schema.list_size


def run_identity(config: RunConfig, train_pattern: str, schema: schema_lib.Schema,
                 steps_per_epoch: int) -> dict:
  """The settings a backup belongs to (`config.RESULT_FIELDS`, with the
  defaults they resolve to): resuming with others would mix two runs.

  Args:
    config: the run's settings.
    train_pattern: the training files.
    schema: the training schema.
    steps_per_epoch: the steps of one epoch.

  Returns:
    A JSON-serializable dict, compared field by field on resume.
  """
  identity = {name: getattr(config, name) for name in RESULT_FIELDS}
  # eval_files matter through the monitor (which epoch is kept, when to stop).
  identity.update(model=config.architecture, hyperparameters=_hyperparameters(config),
                  train_files=train_pattern, tasks=schema.task_names,
                  schema=schema.to_dict(), steps_per_epoch=steps_per_epoch,
                  monitor=config.monitor_spec([t.type for t in schema.tasks]),
                  patience=config.patience_epochs,
                  **{name: config.option(name) for name in STRATEGY_OPTIONS})
  return identity


def _hyperparameters(config: RunConfig) -> dict:
  """The architecture's hyper-parameters as built: its builder's defaults
  overridden by the configured ones."""
  return models.hyperparameters_of(config.architecture, config.hyperparameters,
                                   with_defaults=True)


def serve_if_server_task(config: RunConfig) -> dict:
  """TF_CONFIG; on a parameter-server cluster's workers and ps tasks, which take
  no other settings, serves the chief and never returns.

  Args:
    config: the run's settings (`distribution`).

  Returns:
    The parsed TF_CONFIG ({} without one).

  Raises:
    ConfigError: TF_CONFIG that cannot be parsed.
  """
  try:
    cluster = distribute.tf_config()
  except distribute.ClusterError as e:
    raise ConfigError(f"--distribution={config.distribution}: {e}") from None
  if config.distribution == "parameter_server" and \
      distribute.role(cluster)[0] in ("worker", "ps"):
    distribute.serve(cluster)
    sys.exit(0)
  return cluster


def setup_distribution(config: RunConfig, cluster: dict):
  """The tf.distribute strategy of `config.distribution` (None for "none");
  made before TensorFlow runs any op, as the multi-worker strategy must be (its
  creation waits for every worker, so the settings are checked before).

  Args:
    config: the run's settings (`distribution`, `cpu_replicas`, `ps_shards`, ...).
    cluster: the parsed TF_CONFIG (`serve_if_server_task`).

  Returns:
    The strategy, or None.

  Raises:
    ConfigError: a cluster or batch size the strategy cannot use.
    DataError: training files that cannot be split among the workers.
  """
  try:
    workers = distribute.num_workers(config.distribution, cluster)
    if workers > 1:
      try:
        num_files = len(shards.list_files(config.train_files))
      except FileNotFoundError as e:
        raise DataError(str(e)) from None
      if num_files < workers:
        raise DataError(f"--train_files matches {num_files} file(s) but {workers} workers "
                        "read whole files; write at least as many shards (pipelines.convert "
                        "--num_shards).")
    if config.distribution == "multi_worker" and workers > 1:
      _say(config, f"Waiting for all {workers} workers of TF_CONFIG to start ...")
    strategy = distribute.make_strategy(config.distribution, config.ps_shards,
                                        config.ps_min_shard_bytes, config.cpu_replicas)
  except distribute.ClusterError as e:
    raise ConfigError(f"--distribution={config.distribution}: {e}") from None
  if strategy is not None and config.batch_size % strategy.num_replicas_in_sync:
    raise ConfigError(f"--batch_size={config.batch_size} is the global batch and must "
                      f"divide evenly over the {strategy.num_replicas_in_sync} replicas.")
  return strategy


def explain_data_error(e: Exception, data_files: str, schema: schema_lib.Schema) -> str:
  """A reading error (an OpError, or TensorFlow failing to decode one) as the fix
  it needs.

  Args:
    e: the error.
    data_files: the setting's globs.
    schema: the schema the files should follow.

  Returns:
    The message for the user: the file and record where they can be found, and
    the fix where one is known; else TensorFlow's own message.
  """
  text = " ".join(l.strip() for l in getattr(e, "message", "").splitlines() if l.strip())
  bad_record = re.search(r"assertion failed: \[(bad record in .*?)\](?: \[\[| \[Op:|$)", text)
  if bad_record:  # pipelines.validation names file, record, problem and fix
    return bad_record.group(1)
  if isinstance(e, (tf.errors.InvalidArgumentError, UnicodeDecodeError)):
    try:
      found = reader.first_unparsable(data_files, schema)
    except validation.BadRecordError as damaged:  # a shard changed after it was checked
      return str(damaged)
    if found:
      path, index, why = found
      return (f"records do not match the schema's training layout: {path}, record {index}: "
              f"{why}. Were the files written with this schema by `python -m "
              "pipelines.convert`? Pass the matching --schema, or skip such records with "
              "--bad_records=skip.")
  if isinstance(e, tf.errors.DataLossError):
    # A shard the converter's manifest vouched for (same size) is read unscanned;
    # damaged in place since, it fails only now: scan it to name the record.
    try:
      damage = [d for scan in shards.scan(shards.list_files(data_files), trust_manifest=False)
                for d in scan.damage]
    except (FileNotFoundError, tf.errors.OpError, validation.BadRecordError):
      damage = []
    if damage:
      return str(validation.damaged_error(damage))
    return (f"a record in {data_files} is corrupt or not a TFRecord ({text[-300:]}). Rewrite "
            "the shards with `python -m pipelines.convert`; GZIP files must end in .gz.")
  return f"reading {data_files} failed: {text[-500:] or e}"


def check_balancer(config: RunConfig, runs: List[Tuple[str, schema_lib.Schema]]) -> None:
  """Refuses, before any data is read, a balancer that takes per-task gradients
  (GradNorm, PCGrad) on an architecture whose tasks share no dense parameter.

  Args:
    config: the run's settings (`loss_weighting`, `architecture` and its
      hyperparameters, `balance_on`).
    runs: `training_runs`' (name, schema) pairs.

  Raises:
    ConfigError: naming --loss_weighting and the architectures that share.
  """
  if not balancers.get_balancer(config.loss_weighting).uses_task_gradients:
    return
  for _, schema in runs:
    trained = [t.name for t in balancers.trained_tasks(schema)]
    if len(trained) < 2:
      continue  # compile_model refuses it, naming the tasks
    try:
      balancers.balanced_indices(models.build(config.architecture, schema,
                                              **_hyperparameters(config)),
                                 schema, trained, config.balance_on)
    except balancers.NothingSharedError as e:
      raise ConfigError(
          f"--loss_weighting={config.loss_weighting} balances per-task gradients on the "
          f"parameters the tasks share, but --model={config.architecture} shares none: {e}. "
          "Choose an architecture that shares: "
          f"{', '.join(balancers.sharing_architectures(schema))}; or another "
          "--loss_weighting (" + ", ".join(n for n, c in balancers.BALANCERS.items()
                                           if not c.uses_task_gradients) + ").") from None


def fit_model(config: RunConfig, name: str, schema: schema_lib.Schema, train_pattern: str,
              eval_pattern: Optional[str], model_dir: str, strategy, cluster: dict,
              workers: int, on_epoch_end: Optional[Callable[[int, float], None]] = None
              ) -> _Fitted:
  """Builds, compiles and fits one model (under `strategy`, resuming from its
  backup in `model_dir` if there is one).

  Args:
    config: the run's settings.
    name: the run's name (a strategy's model).
    schema: its training schema.
    train_pattern: the training files.
    eval_pattern: the eval files, or None.
    model_dir: where its checkpoints, backups and logs go.
    strategy: the tf.distribute strategy, or None.
    cluster: the parsed TF_CONFIG ({} without one).
    workers: the number of workers reading the data.
    on_epoch_end: as in `run`.

  Returns:
    The model, outside any strategy, its schema, the report of its training
    (history, eval metrics, skipped records) and its eval curve.
  """
  chief = distribute.is_chief(cluster)
  duplicate_task = strategies.ENGAGEMENT_TASK if config.option("duplicate") else None
  sampling = calibration.negative_sampling_spec(config, schema)  # (labels, rate) or None
  train_files = shards.list_files(train_pattern)
  skipped = {"train": validation.SkippedRecords()}
  list_overflow = validation.ListOverflow() if schema.list_size else None
  # The counting pass also finds damaged shards, empty data and, with
  # --bad_records=skip, what is left out (counted even with --steps_per_epoch).
  counted = not config.steps_per_epoch or config.bad_records == validation.SKIP
  if counted:
    try:
      examples = count_examples(config, train_pattern, schema, duplicate_task,
                                skipped["train"], list_overflow, sampling)
    except validation.BadRecordError as e:
      raise DataError(f"--train_files: {e}") from None
    except (tf.errors.OpError, UnicodeDecodeError) as e:
      raise DataError(explain_data_error(e, train_pattern, schema)) from None
    if not examples:
      left_out = skipped["train"].counts()["total"]
      raise DataError(f"--train_files={train_pattern} holds no training examples"
                      + (f" ({left_out} bad records were skipped)" if left_out else
                         ": the files hold no records") + ".")
    if list_overflow and list_overflow.count:
      _say(config, f"Warning: {list_overflow.count} training examples are past --list_size="
           f"{schema.list_size} in their request and are left out of training; raise "
           "--list_size to keep them.")
  else:  # not counted: at least see that there is something to train on
    try:
      empty = not reader.has_records(train_pattern)
    except (tf.errors.OpError, UnicodeDecodeError) as e:
      raise DataError(explain_data_error(e, train_pattern, schema)) from None
    if empty:
      raise DataError(f"--train_files={train_pattern} holds no training examples: the "
                      "files hold no records.")
  steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(
      examples / examples_per_step(config, schema)))

  # Crash safety: only an explicit --model_dir can be found again by a rerun;
  # the backup is Keras 2's (BUILD_NOTES "Keras 3").
  if config.model_dir and _keras.KERAS_3:
    _say(config, f"Not backed up: crash resume needs Keras 2 ({_keras.ENV_VAR}=2); "
         "this process uses Keras 3.")
  try:
    backup_dir, resumed = distribute.claim_backup(
        model_dir if config.model_dir and not _keras.KERAS_3 else None, chief,
        run_identity(config, train_pattern, schema, steps_per_epoch), steps_per_epoch,
        per_step=config.backup_every_steps > 0 and not _is_ps(strategy))
  except distribute.BackupOwnerError as e:
    raise ConfigError(str(e)) from None
  # Steps already trained: the resumed run skips the batches they read and reads
  # deterministically, so it sees the batches the interrupted run would have
  # (parameter-server workers read at their own pace: no such order to keep).
  done_steps = (resumed[0] * steps_per_epoch + resumed[1]
                if resumed and not _is_ps(strategy) else 0)
  progress, curve = early_stopping.Progress(), []
  monitor = early_stopping.Monitor(config.monitor_spec([t.type for t in schema.tasks])
                                  ).for_tasks(schema.task_names)
  if resumed and eval_pattern:
    progress, curve = early_stopping.load_progress(model_dir, monitor, resumed[0])
  finished = bool(resumed) and (resumed[0] >= config.max_epochs
                                or progress.should_stop(config.patience_epochs))
  if resumed:
    _say(config, f"Resuming from the backup in {backup_dir}: " + (
        "training had finished." if finished else
        f"epoch {resumed[0] + 1}, step {resumed[1]} of {steps_per_epoch}."))

  records = examples if counted else _vouched_records(train_files)
  cache_mode, why = caching.choose(config.cache, records, schema,
                                   budget_bytes=(config.cache_memory_mb << 20
                                                 if config.cache_memory_mb else None),
                                   file_possible=not _is_ps(strategy))
  _say(config, f"Cache: {why}.")

  def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
    readers, index = distribute.input_shard(strategy, context, workers)
    cache = (_cache_file(model_dir, index) if cache_mode == "file"
             else cache_mode == "memory")
    if readers > 1 and isinstance(index, int):
      _say(config, f"Input: reader {index} of {readers} reads "
           f"{len(train_files[index::readers])} of the {len(train_files)} training files.")
    elif readers > 1:  # a parameter-server worker's index is known only on the worker
      _say(config, f"Input: the {readers} workers read disjoint shares of the "
           f"{len(train_files)} training files (file i goes to worker i mod {readers}).")
    # Each worker repeats its own files: every epoch is exactly steps_per_epoch
    # steps on every worker, so none waits for another that ran out of data.
    # Read deterministically: the same seed gives the same model bit for bit,
    # and a resumed run sees the batches the interrupted one would have.
    ds = reader.make_dataset(train_pattern, schema,
                             context.get_per_replica_batch_size(config.batch_size),
                             seed=config.seed, cache=cache,
                             shuffle_block=config.shuffle_block,
                             duplicate_task=duplicate_task,
                             shard=(readers, index) if readers > 1 else None,
                             deterministic=True,
                             bad_records=config.bad_records,
                             negative_sampling=sampling).repeat()
    replicas_per_reader = context.num_replicas_in_sync // context.num_input_pipelines
    return ds.skip(done_steps * replicas_per_reader) if done_steps else ds

  try:
    train_input = distribute.training_input(strategy, dataset_fn)
  except validation.BadRecordError as e:
    raise DataError(f"--train_files: {e}") from None
  eval_ds = None
  if eval_pattern and chief:
    skipped["eval"] = validation.SkippedRecords()
    try:
      eval_ds = reader.make_dataset(eval_pattern, schema, 8192, shuffle=False, cache=True,
                                    group_lists=False, bad_records=config.bad_records,
                                    skipped=skipped["eval"])
    except validation.BadRecordError as e:
      raise DataError(f"--eval_files: {e}") from None
  # Fused per-task models need distinct names to be combined into one model.
  architecture = config.architecture
  hparams = {**_hyperparameters(config),
             "name": architecture if name == architecture else f"{name}_{architecture}"}
  with strategy.scope() if strategy else contextlib.nullcontext():
    model = models.build(architecture, schema, **hparams)
    trainable = compile_model(model, schema, learning_rate=config.learning_rate,
                              learning_rate_decay_steps=config.learning_rate_decay_steps,
                              weighting=config.loss_weighting,
                              weighting_options=config.balancer_options,
                              balance_on=config.balance_on, masked_loss=config.masked_loss)
  replicas = strategy.num_replicas_in_sync if strategy else 1
  where = (f" on {workers} workers" if workers > 1 else "") + (
      f" ({replicas} replica{'s' if replicas > 1 else ''})" if strategy else "")
  _say(config, f"Training {architecture} ({model.count_params():,} parameters) on tasks "
       f"{schema.task_names} from {train_pattern}{where}, {steps_per_epoch} steps of "
       f"{config.batch_size} per epoch")
  if _is_ps(strategy):
    split = distribute.sharded_variables(model)
    _say(config, "Variables split over the parameter servers: " + (
        ", ".join(f"{name} ({parts} parts)" for name, parts in split.items())
        or "none (each is smaller than --ps_min_shard_bytes)"))

  callbacks = [
      keras.callbacks.ModelCheckpoint(
          files.join(model_dir, "checkpoints", "epoch-{epoch:03d}" + _keras.WEIGHTS_SUFFIX),
          save_weights_only=True),
      keras.callbacks.TensorBoard(files.join(model_dir, "logs"), profile_batch=0),
  ]
  if backup_dir:
    # Kept when training ends: the run removes it once the model is saved and
    # exported, so a failed export loses nothing.
    callbacks.append(distribute.Backup(
        backup_dir, save_freq=(config.backup_every_steps
                               if config.backup_every_steps > 0 and not _is_ps(strategy)
                               else "epoch"), delete_checkpoint=False))
  # Evaluated, saved and exported: the serving model (no train-only features).
  evaluator = (metrics_lib.EpochEvaluation(
      models.serving_model(model), schema, eval_ds, steps_per_epoch,
      log_dir=files.join(model_dir, "logs", "eval_gates"), report=not config.quiet)
               if eval_ds is not None else None)
  if eval_pattern:  # workers of a cluster join the chief's decision without evaluating
    callbacks.insert(0, early_stopping.EarlyStopping(
        monitor, config.patience_epochs, evaluator, state_dir=model_dir if chief else None,
        progress=progress, strategy=strategy, report=not config.quiet))
  if evaluator and on_epoch_end:  # after the early stopping, which appends the value
    callbacks.insert(1, keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
        on_epoch_end(epoch + 1, monitor.shown(progress.values[-1])))))
  if evaluator:
    evaluator.curve = curve
    callbacks.insert(0, evaluator)  # first, so later callbacks log its metrics
  start = time.perf_counter()
  history = None
  if not finished:
    try:
      history = trainable.fit(train_input, epochs=config.max_epochs,
                              steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                              verbose=0 if config.quiet else 1 if sys.stdout.isatty() else 2)
    except (tf.errors.OpError, UnicodeDecodeError) as e:
      raise DataError(explain_data_error(
          e, ",".join(p for p in (train_pattern, eval_pattern) if p), schema)) from None
    except (metrics_lib.MetricError, early_stopping.MonitorError) as e:  # epoch evaluation
      raise DataError(f"--eval_files={eval_pattern}: {e}") from None
  seconds = time.perf_counter() - start
  if cache_mode == "file" and chief:
    files.remove(files.join(model_dir, "cache"))
  best_epoch = progress.best_epoch if evaluator else None
  epochs_trained = len(progress.values) if evaluator else None
  # The weights to keep: the best epoch's, or after a resumed run that had
  # already finished (nothing was fitted), its last epoch's.
  kept = best_epoch or (resumed[0] if finished else None)
  if kept and (finished or kept != epochs_trained):
    if best_epoch:
      _say(config, f"Keeping epoch {best_epoch}'s weights, the best by --monitor="
           f"{monitor.spec} ({epochs_trained} epochs trained).")
    _keras.load_weights(trainable, early_stopping.checkpoint_path(model_dir, kept))
    if evaluator:
      evaluator.evaluate()  # the report is the kept model's, measured again
  try:
    at_logged_positions = (_eval_at_logged_positions(model, schema, eval_ds, sampling)
                           if evaluator else {})
  except metrics_lib.MetricError as e:
    raise DataError(f"--eval_files={eval_pattern}: {e}") from None
  if strategy is not None:
    # Saved and exported: the same architecture outside the strategy, so loading
    # it needs no cluster and sharded tables are whole again.
    trained, model = model, models.build(architecture, schema, **hparams)
    model.set_weights(distribute.weight_values(trained))
  report = {
      "train_seconds": seconds, "steps_per_epoch": steps_per_epoch,
      "resumed_from": ({"epoch": resumed[0] + 1, "step": resumed[1]} if resumed else None),
      "train_loss": {k: float(v[-1]) for k, v in history.history.items()
                     if k.endswith("loss")} if history else {},
      "task_weights": {k[len("weight_"):]: float(v[-1])
                       for k, v in history.history.items()
                       if k.startswith("weight_")} if history else {},
      "backup_dir": backup_dir, "cache": cache_mode,
      "eval": evaluator.latest if evaluator else {},
      "eval_at_logged_positions": at_logged_positions,
      "monitor": ({"spec": monitor.spec, "patience": config.patience_epochs,
                   "values": progress.values, "best_epoch": best_epoch,
                   "epochs_trained": epochs_trained,
                   "stopped_early": epochs_trained < config.max_epochs}
                  if evaluator else None),
      "gates": evaluator.gates if evaluator else {},
      # Training data: the counting pass; eval data: its cached first pass.
      "skipped": skipped,
      # Ranking tasks: training examples past list_size, from the counting
      # pass (None: not counted, with --steps_per_epoch).
      "examples_past_list_size": (list_overflow.count if list_overflow and counted
                                  else None)}
  return _Fitted(name, models.serving_model(model), schema, report,
                 evaluator.curve if evaluator else [])


def _eval_at_logged_positions(model: keras.Model, schema: schema_lib.Schema,
                              eval_ds: tf.data.Dataset,
                              negative_sampling: Optional[Tuple[Sequence[str], float]]
                              ) -> Dict[str, Dict[str, float]]:
  """Metrics of the tasks the bias tower shapes, as trained: the training model,
  tower included, over the eval data at the positions it was logged at.

  The served probability of such a task is the debiased one, which a log's
  position-shaped clicks cannot check (on the built-in log it under-predicts
  the top slot's clicks and over-predicts the bottom's); this says whether the
  model of those clicks is calibrated, and how well the negative-sampling
  correction, exact in either form, did.

  Args:
    model: the trained model (with its tower), the kept epoch's weights.
    schema: its schema.
    eval_ds: the eval dataset (training layout: train-only features included).
    negative_sampling: (labels, rate) the training data was sampled with, or None.

  Returns:
    task -> metrics (`metrics.task_metrics`), {} for a model without a tower.
  """
  biased = models.biased_tasks(model)
  if not biased:
    return {}
  collected = metrics_lib.collect(model, eval_ds)
  if negative_sampling:
    engagement = calibration.engagement_task(schema).name
    p = collected[engagement]["prediction"]
    collected[engagement]["prediction"] = p / (p + (1.0 - p) / negative_sampling[1])
  results = metrics_lib.task_metrics(schema, collected)
  return {task: results[task] for task in biased}


def _vouched_records(train_files: List[str]) -> Optional[int]:
  """Training records per the converter's manifest, None unless it vouches for all."""
  counts = manifest.vouched_counts(train_files)
  return sum(counts.values()) if len(counts) == len(train_files) else None


def _cache_file(model_dir: str, index) -> str:
  """A reader's file cache, emptied first: a crashed run leaves a partial cache
  and its lock, which tf.data would refuse."""
  prefix = files.join(model_dir, "cache", f"train-{index}")
  for stale in tf.io.gfile.glob(prefix + "*"):
    tf.io.gfile.remove(stale)
  tf.io.gfile.makedirs(files.join(model_dir, "cache"))
  return prefix


def _is_ps(strategy) -> bool:
  return isinstance(strategy, tf.distribute.ParameterServerStrategy)
