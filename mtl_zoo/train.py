"""Train a multi-task model from TFRecords, report per-task metrics, export it.

With no flags: writes the built-in synthetic ads log, trains an MMoE on CTR and
CVR (CVR masked to clicked impressions), prints metrics and exports a
SavedModel, all under ./mtl_zoo_output/.

  python -m mtl_zoo.train
  python -m mtl_zoo.train --model=shared_bottom --train_files='data/train-*' \
      --eval_files='data/validation-*' --model_dir=runs/sb --export_dir=exports/sb
  python -m mtl_zoo.train --flagfile=census.flags
"""

import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

from absl import app, flags

from mtl_zoo import diagnostics
from mtl_zoo import layers
from mtl_zoo import metrics as metrics_lib
from mtl_zoo import models
from mtl_zoo import weighting
from mtl_zoo._keras import keras
from mtl_zoo import export
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines.datasets import synthetic_ads

import tensorflow as tf  # noqa: E402  (after mtl_zoo._keras pins Keras 2)

FLAGS = flags.FLAGS

flags.DEFINE_enum("model", "mmoe", sorted(models.MODELS), "Architecture to train.")
flags.DEFINE_string("train_files", None,
                    "Glob(s), comma-separated, of training-layout TFRecord shards written "
                    "by `python -m pipelines.convert`. Default: the built-in synthetic ads "
                    "log, generated under --output_dir on first use.")
flags.DEFINE_string("eval_files", None,
                    "Glob(s) of evaluation shards. Default: with --train_files, none "
                    "(metrics are then skipped); without it, the synthetic log's eval split.")
flags.DEFINE_string("schema", None, "schema.json of the data. Default: the schema.json "
                    "next to the first training shard.")
flags.DEFINE_list("tasks", None, "Train only these schema tasks (default: all).")
flags.DEFINE_string("event_weights", None,
                    "Sample weighting: replace the tasks by one 'engagement' task that "
                    "learns 'any event', weighting each example by its deepest event, e.g. "
                    "'conversion=1,click=0.2', or 'auto:conversion,click' for weights from "
                    "the training data's event counts.")
flags.DEFINE_boolean("duplicate", False, "With --event_weights: repeat examples in "
                     "proportion to their weights instead of weighting them.")
flags.DEFINE_string("output_dir", "mtl_zoo_output",
                    "Base for the defaults of --model_dir, --export_dir and the synthetic data.")
flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, metrics.json and the "
                    "Keras model. Default: <output_dir>/runs/<model>-<timestamp>.")
flags.DEFINE_string("export_dir", None, "SavedModel base directory; each export is a new "
                    "numbered version in it. Default: <output_dir>/export/<model>. "
                    "Set to '' to skip the export.")
flags.DEFINE_enum("loss_weighting", "fixed", list(weighting.METHODS),
                  "How task losses are balanced: fixed (schema loss weights), uncertainty, "
                  "dwa, gradnorm or pcgrad (see mtl_zoo/weighting.py).")
flags.DEFINE_string("fusion", None, "Adds a `rank` signature to the export that fuses "
                    "task scores (and numeric features) into one score, e.g. "
                    "'product:ctr=1,cvr=0.5,price=1' or 'sum:ctr=1,cvr=2'.")
flags.DEFINE_integer("keep", None, "Keep only the newest N exported versions.", lower_bound=1)
flags.DEFINE_string("serving_task", None, "Task behind the classify/regress signatures "
                    "(default: the schema's first task).")
flags.DEFINE_integer("epochs", 5, "Passes over the training data.", lower_bound=1)
flags.DEFINE_integer("batch_size", 2048, "Examples per training step.", lower_bound=1)
flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("num_experts", 8, "Shared experts (mmoe, omoe).", lower_bound=1)
flags.DEFINE_integer("num_task_experts", 2, "Experts of each task (cgc, ple).", lower_bound=1)
flags.DEFINE_integer("num_shared_experts", 2, "Shared experts per level (cgc, ple).",
                     lower_bound=1)
flags.DEFINE_integer("num_levels", 2, "Extraction levels (ple).", lower_bound=1)
flags.DEFINE_list("expert_units", ["16"], "Hidden units of each expert, per layer (mmoe, "
                  "omoe, cgc, ple).")
flags.DEFINE_list("bottom_units", ["128"], "Units per layer of the shared bottom "
                  "(shared_bottom) or of each task's own network (single_task, esmm, "
                  "cross_stitch, l2_constrained).")
flags.DEFINE_list("tower_units", ["8"], "Units of each task tower, per layer; empty for "
                  "no tower.")
flags.DEFINE_float("dropout", 0.0, "Dropout after every hidden layer.", lower_bound=0.0,
                   upper_bound=0.99)
flags.DEFINE_float("embeddings_l2", 0.0, "L2 penalty on embedding tables.", lower_bound=0.0)
flags.DEFINE_integer("cross_layers", 0, "DCN-v2 cross layers (TFRS `Cross`) on top of the "
                     "embeddings, for any architecture.", lower_bound=0)
flags.DEFINE_float("l2_distance_weight", 1e-3, "Weight of the parameter-distance penalty "
                   "between task networks (l2_constrained).", lower_bound=0.0)
flags.DEFINE_float("cross_stitch_self_weight", 0.9, "Initial weight a cross-stitch unit "
                   "gives a task's own activations (cross_stitch).", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and the synthetic data.")
flags.DEFINE_boolean("cache", True, "Keep parsed training data in memory after epoch 1.")
flags.DEFINE_integer("shuffle_block", 8192, "Examples shuffled together (see "
                     "pipelines.reader.make_dataset).", lower_bound=1)
flags.DEFINE_enum("bad_records", reader.FAIL, list(reader.BAD_RECORD_POLICIES),
                  "Records that are corrupt, do not parse as the schema's training layout, "
                  "or hold values the schema forbids (a binary label other than 0/1, an "
                  "infinite numeric): 'fail' stops with an error naming the file and "
                  "record; 'skip' leaves each one out, never the good records around it, "
                  "and reports how many at the end and in metrics.json.")
flags.DEFINE_integer("synthetic_requests", 12_000, "Training requests (10 impressions "
                     "each) of the default synthetic log.", lower_bound=1)


class DataError(Exception):
  """The data cannot be used as given; the message says what to change."""


def _units(values: List[str], flag: str) -> List[int]:
  try:
    units = [int(v) for v in values if v.strip()]
  except ValueError:
    raise app.UsageError(f"--{flag} takes comma-separated integers, got "
                         f"{','.join(values)!r}.") from None
  if any(u < 1 for u in units):
    raise app.UsageError(f"--{flag} units must be positive, got {units}.")
  return units


def hyperparameters() -> dict:
  return {"num_experts": FLAGS.num_experts, "num_task_experts": FLAGS.num_task_experts,
          "num_shared_experts": FLAGS.num_shared_experts, "num_levels": FLAGS.num_levels,
          "expert_units": _units(FLAGS.expert_units, "expert_units"),
          "bottom_units": _units(FLAGS.bottom_units, "bottom_units"),
          "tower_units": _units(FLAGS.tower_units, "tower_units"),
          "dropout": FLAGS.dropout, "embeddings_l2": FLAGS.embeddings_l2,
          "cross_layers": FLAGS.cross_layers,
          "l2_distance_weight": FLAGS.l2_distance_weight,
          "cross_stitch_self_weight": FLAGS.cross_stitch_self_weight}


def check_flags() -> None:
  """Flags that contradict each other, before anything is read or written."""
  if FLAGS.eval_files and not FLAGS.train_files:
    raise app.UsageError("--eval_files needs --train_files (without both, the built-in "
                         "synthetic data is used).")
  if FLAGS.duplicate and not FLAGS.event_weights:
    raise app.UsageError("--duplicate needs --event_weights.")
  if FLAGS.tasks and FLAGS.event_weights:
    raise app.UsageError("--tasks and --event_weights conflict: --event_weights replaces "
                         "the schema's tasks by one 'engagement' task; drop one of them.")
  if FLAGS.export_dir == "":
    for flag in ("keep", "fusion", "serving_task"):
      if FLAGS[flag].present:
        raise app.UsageError(f"--{flag} configures the export, but --export_dir='' skips "
                             f"it; drop --{flag} or set --export_dir.")


def writable_dir(path: str, flag: str) -> None:
  """Fails now, rather than after training, if `path` cannot be created or
  written (its nearest existing ancestor decides); creates nothing."""
  existing = path
  while not tf.io.gfile.exists(existing):
    parent = os.path.dirname(existing.rstrip("/")) or "."
    if parent == existing:
      break
    existing = parent
  problem = None
  if not tf.io.gfile.isdir(existing):
    problem = f"{existing} is not a directory"
  elif "://" not in existing and not os.access(existing, os.W_OK | os.X_OK):
    problem = f"{existing} is not writable"
  if problem:
    raise app.UsageError(f"--{flag}={path} cannot be written ({problem}); choose another "
                         f"--{flag}.")


def resolve_data() -> tuple:
  """(train pattern, eval pattern or None, schema) from the flags."""
  if FLAGS.train_files:
    train, evaluation = FLAGS.train_files, FLAGS.eval_files
  else:
    data_dir = os.path.join(FLAGS.output_dir, "data",
                            f"synthetic_ads-{FLAGS.synthetic_requests}-seed{FLAGS.seed}")
    if not tf.io.gfile.exists(os.path.join(data_dir, schema_lib.SCHEMA_FILENAME)):
      print(f"Writing the synthetic ads log to {data_dir} ...", flush=True)
      synthetic_ads.write(data_dir, num_train_requests=FLAGS.synthetic_requests,
                          num_eval_requests=max(1, FLAGS.synthetic_requests // 4),
                          seed=FLAGS.seed)
    else:
      print(f"Using the synthetic ads log in {data_dir}", flush=True)
    train, evaluation = os.path.join(data_dir, "train-*"), os.path.join(data_dir, "eval-*")
  try:
    train_files = reader.list_files(train)
    if evaluation:
      reader.list_files(evaluation)
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  schema_path = FLAGS.schema or os.path.join(os.path.dirname(train_files[0]),
                                             schema_lib.SCHEMA_FILENAME)
  try:
    schema = schema_lib.Schema.load(schema_path)
    if FLAGS.tasks:
      schema = schema.with_tasks(FLAGS.tasks)
    if FLAGS.event_weights:
      schema = sample_weighting_schema(schema, FLAGS.event_weights, train)
    schema = models.training_schema(FLAGS.model, schema)
    schema.require_statistics()
  except (FileNotFoundError, schema_lib.SchemaError) as e:
    raise DataError(str(e)) from None
  except (tf.errors.OpError, UnicodeDecodeError) as e:  # reading for --event_weights=auto
    raise DataError(explain_data_error(e, train, schema)) from None
  if FLAGS.serving_task and FLAGS.serving_task not in schema.task_names:
    raise app.UsageError(f"--serving_task={FLAGS.serving_task} is not a task of the model; "
                         f"its tasks are {schema.task_names}.")
  return train, evaluation, schema


def sample_weighting_schema(schema: schema_lib.Schema, spec: str,
                            train_pattern: str) -> schema_lib.Schema:
  """The schema with one 'engagement' task weighted by events (--event_weights)."""
  if spec.startswith("auto:"):
    events = [e.strip() for e in spec[len("auto:"):].split(",") if e.strip()]
    missing = [e for e in events if e not in schema.labels]
    if missing:
      raise schema_lib.SchemaError(f"--event_weights: {missing} are not label columns "
                                   f"{schema.labels}.")
    try:
      weights = reader.default_event_weights(
          reader.read_columns(train_pattern, schema, bad_records=FLAGS.bad_records), events)
    except ValueError as e:
      raise schema_lib.SchemaError(f"--event_weights: {e}") from None
  else:
    weights = {}
    for item in spec.split(","):
      name, eq, value = item.partition("=")
      try:
        weights[name.strip()] = float(value)
      except ValueError:
        raise schema_lib.SchemaError(f"--event_weights entries look like click=0.2, got "
                                     f"{item!r}.") from None
  task = schema_lib.Task("engagement", next(iter(weights)), events=weights)
  return schema_lib.Schema(schema.features, schema.labels, [task], schema.request_id,
                           schema.name)


class EvalMetrics(keras.callbacks.Callback):
  """Exact per-task metrics on the eval data after every epoch, into the logs
  (so TensorBoard and the progress line show them), and for gated models the
  gates' mean expert weights (TensorBoard `gates/...` under `log_dir`)."""

  def __init__(self, model: keras.Model, schema: schema_lib.Schema,
               dataset: tf.data.Dataset, log_dir: str):
    super().__init__()
    # `model` is the functional model, not what `fit` trains (maybe a
    # loss-weighting wrapper).
    self.schema, self.dataset = schema, dataset
    self.latest: Dict[str, Dict[str, float]] = {}
    self.gates: Dict[str, dict] = {}
    # One pass per epoch gives both the task predictions and the gate weights.
    self._probe = diagnostics.with_gate_outputs(model)
    self._predict = metrics_lib.predict_function(self._probe)
    self._writer = tf.summary.create_file_writer(log_dir)

  def on_epoch_end(self, epoch, logs=None):
    collected = metrics_lib.collect(self._probe, self.dataset, self._predict)
    self.latest = metrics_lib.task_metrics(self.schema, collected)
    self.gates = diagnostics.gate_report(collected)
    diagnostics.write_summaries(self.gates, self._writer, epoch + 1)
    summary = []
    for task, values in self.latest.items():
      for name, value in values.items():
        if name in ("auc", "logloss", "mse"):
          if logs is not None:
            logs[f"eval_{task}_{name}"] = value
          summary.append(f"{task} {name} {value:.4f}")
    print(f"  epoch {epoch + 1} eval: " + ", ".join(summary), flush=True)


def write_json_atomically(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
  tf.io.gfile.rename(tmp, path, overwrite=True)


def explain_data_error(e: Exception, files: str, schema: schema_lib.Schema) -> str:
  """A reading error (an OpError, or TensorFlow failing to decode one) as the fix
  it needs; `files` are the flag's globs."""
  text = " ".join(l.strip() for l in getattr(e, "message", "").splitlines() if l.strip())
  bad_record = re.search(r"assertion failed: \[(bad record in .*?)\](?: \[\[| \[Op:|$)", text)
  if bad_record:  # pipelines.reader names file, record, problem and fix
    return bad_record.group(1)
  if isinstance(e, (tf.errors.InvalidArgumentError, UnicodeDecodeError)):
    try:
      found = reader.first_unparsable(files, schema)
    except reader.BadRecordError as damaged:  # a shard changed after it was checked
      return str(damaged)
    if found:
      path, index, why = found
      return (f"records do not match the schema's training layout: {path}, record {index}: "
              f"{why}. Were the files written with this schema by `python -m "
              "pipelines.convert`? Pass the matching --schema, or skip such records with "
              "--bad_records=skip.")
  if isinstance(e, tf.errors.DataLossError):  # e.g. a shard changed after it was checked
    return (f"a record in {files} is corrupt or not a TFRecord ({text[-300:]}). Rewrite the "
            "shards with `python -m pipelines.convert`; GZIP files must end in .gz.")
  return f"reading {files} failed: {text[-500:] or e}"


class FirstPassCounts(keras.callbacks.Callback):
  """The skipped-record counts after the first epoch, i.e. after one whole pass
  over the training and eval data (later uncached passes count them again)."""

  def __init__(self, skipped: Dict[str, reader.SkippedRecords]):
    super().__init__()
    self.skipped = skipped
    self.counts: Dict[str, dict] = {}

  def on_epoch_end(self, epoch, logs=None):
    if epoch == 0:
      self.counts = {name: s.counts() for name, s in self.skipped.items()}


def train(argv_rest: Optional[list] = None) -> dict:
  """Runs the whole job from FLAGS; returns a summary (paths and metrics)."""
  if argv_rest:
    raise app.UsageError(f"unexpected arguments {argv_rest}; flags look like --name=value.")
  hparams = hyperparameters()
  try:
    fusion = layers.parse_fusion(FLAGS.fusion) if FLAGS.fusion else None
  except ValueError as e:
    raise app.UsageError(f"--fusion: {e}") from None
  check_flags()
  stamp = time.strftime("%Y%m%d-%H%M%S")
  model_dir = FLAGS.model_dir or os.path.join(FLAGS.output_dir, "runs", f"{FLAGS.model}-{stamp}")
  export_dir = (FLAGS.export_dir if FLAGS.export_dir is not None
                else os.path.join(FLAGS.output_dir, "export", FLAGS.model))
  writable_dir(model_dir, "model_dir")
  if export_dir:
    writable_dir(export_dir, "export_dir")
  train_pattern, eval_pattern, schema = resolve_data()
  tf.io.gfile.makedirs(model_dir)
  keras.utils.set_random_seed(FLAGS.seed)

  skipped = {"train": reader.SkippedRecords()}
  try:
    train_ds = reader.make_dataset(train_pattern, schema, FLAGS.batch_size, seed=FLAGS.seed,
                                   cache=FLAGS.cache, shuffle_block=FLAGS.shuffle_block,
                                   duplicate_task="engagement" if FLAGS.duplicate else None,
                                   bad_records=FLAGS.bad_records, skipped=skipped["train"])
  except reader.BadRecordError as e:
    raise DataError(f"--train_files: {e}") from None
  eval_ds = None
  if eval_pattern:
    skipped["eval"] = reader.SkippedRecords()
    try:
      eval_ds = reader.make_dataset(eval_pattern, schema, 8192, shuffle=False, cache=True,
                                    bad_records=FLAGS.bad_records, skipped=skipped["eval"])
    except reader.BadRecordError as e:
      raise DataError(f"--eval_files: {e}") from None
  model = models.build(FLAGS.model, schema, **hparams)
  trainable = models.compile_model(model, schema, learning_rate=FLAGS.learning_rate,
                                   weighting=FLAGS.loss_weighting)
  print(f"Training {FLAGS.model} ({model.count_params():,} parameters) on tasks "
        f"{schema.task_names} from {train_pattern}", flush=True)

  callbacks = [
      keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "checkpoints", "epoch-{epoch:03d}"),
                                      save_weights_only=True),
      keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), profile_batch=0),
  ]
  evaluator = (EvalMetrics(model, schema, eval_ds,
                           os.path.join(model_dir, "logs", "eval_gates"))
               if eval_ds is not None else None)
  if evaluator:
    callbacks.insert(0, evaluator)  # first, so later callbacks log its metrics
  first_pass = FirstPassCounts(skipped)
  callbacks.append(first_pass)  # last: after the evaluator's pass over the eval data
  start = time.perf_counter()
  data_files = ",".join(p for p in (train_pattern, eval_pattern) if p)
  try:
    history = trainable.fit(train_ds, epochs=FLAGS.epochs, callbacks=callbacks,
                            verbose=1 if sys.stdout.isatty() else 2)
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise DataError(explain_data_error(e, data_files, schema)) from None
  except ValueError as e:
    if "Empty logs" not in str(e):
      raise
    left_out = skipped["train"].counts()["total"]
    raise DataError(f"--train_files={train_pattern} yielded no training examples"
                    + (f" ({left_out} bad records were skipped)" if left_out else
                       ": the files hold no records") + ".") from None
  seconds = time.perf_counter() - start

  result = {"model": FLAGS.model, "loss_weighting": FLAGS.loss_weighting,
            "event_weights": {t.name: t.events for t in schema.tasks if t.events},
            "hyperparameters": models.hyperparameters_of(FLAGS.model, hparams),
            "tasks": schema.task_names,
            "train_files": train_pattern, "eval_files": eval_pattern,
            "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size,
            "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed,
            "train_seconds": round(seconds, 2),
            "train_loss": {k: float(v[-1]) for k, v in history.history.items()
                           if k.endswith("loss")},
            "task_weights": {k[len("weight_"):]: float(v[-1])
                             for k, v in history.history.items() if k.startswith("weight_")},
            "eval": evaluator.latest if evaluator else {},
            "gates": evaluator.gates if evaluator else {},
            "bad_records": {"policy": FLAGS.bad_records, "skipped": first_pass.counts,
                            "damage": [str(d) for s in skipped.values() for d in s.damage]}}
  model.save(os.path.join(model_dir, "model.keras"))
  schema.save(os.path.join(model_dir, schema_lib.SCHEMA_FILENAME))
  if evaluator:
    print("\nEval metrics (" + eval_pattern + "):")
    print(metrics_lib.format_table(evaluator.latest,
                                   ["auc", "logloss", "mse", "positive_rate", "examples"]))
    for gate, summary in evaluator.gates.items():
      weights = " ".join(f"{w:.2f}" for w in summary["mean_weights"])
      starved = summary["starved_experts"]
      print(f"gate {gate}: mean expert weights [{weights}], normalized entropy "
            f"{summary['normalized_entropy']:.2f}"
            + (f", starved experts {starved}" if starved else ""))
  if FLAGS.bad_records == reader.SKIP:
    print("\nBad records (--bad_records=skip), first pass over the data:")
    for name, counts in first_pass.counts.items():
      print(f"  {name}: {skipped[name].summary(counts)}")
  if export_dir:
    warmup = None
    for features, _, _ in eval_ds.take(1) if eval_ds is not None else []:
      # The eval data as read, with bad records left out.
      warmup = schema.serving_examples({k: v.numpy()[:32] for k, v in features.items()})
    result["export"] = export.export_saved_model(model, schema, export_dir,
                                                 serving_task=FLAGS.serving_task,
                                                 warmup_examples=warmup, keep=FLAGS.keep,
                                                 fusion=fusion)
    result["serving_configs"] = export.write_serving_configs(export_dir)
  write_json_atomically(os.path.join(model_dir, "metrics.json"), result)
  print(f"\nModel dir:   {os.path.abspath(model_dir)} (checkpoints/, logs/, metrics.json, "
        "model.keras)")
  if export_dir:
    print(f"SavedModel:  {os.path.abspath(result['export'])} (serving configs: "
          f"{', '.join(result['serving_configs'])})")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(os.path.join(model_dir, 'logs'))}")
  return result


def main(argv):
  try:
    train(argv[1:])
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console-script entry point (`mtl-zoo-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
