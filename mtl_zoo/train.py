"""Train a multi-task model from TFRecords, report per-task metrics, export it.

With no flags: writes the built-in synthetic ads log, trains an MMoE on CTR and
CVR (CVR masked to clicked impressions), prints metrics and exports a
SavedModel, all under ./mtl_zoo_output/.

  python -m mtl_zoo.train
  python -m mtl_zoo.train --model=shared_bottom --train_files='data/train-*' \
      --eval_files='data/validation-*' --model_dir=runs/sb --export_dir=exports/sb
  python -m mtl_zoo.train --flagfile=census.flags

With an explicit --model_dir the run backs itself up every --backup_every_steps
steps and at every epoch's end; rerun the same command after a crash and it
resumes from the last backup. --distribution trains on several devices or
machines (README "Training on a cluster").
"""

import contextlib
import json
import math
import os
import re
import sys
import time
import uuid
from typing import Dict, List, Optional

from absl import app, flags

from mtl_zoo import diagnostics
from mtl_zoo import distribute
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
flags.DEFINE_integer("batch_size", 2048, "Examples per training step: the global batch of "
                     "one optimizer update, split over all replicas under --distribution.",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Training steps per epoch. Default: one pass "
                     "over the training examples, counted before training.", lower_bound=1)
flags.DEFINE_enum("distribution", "none", list(distribute.DISTRIBUTIONS),
                  "tf.distribute strategy: none; mirrored (all local GPUs/CPU); "
                  "multi_worker (MultiWorkerMirroredStrategy over the TF_CONFIG cluster); "
                  "parameter_server (ParameterServerStrategy: the chief coordinates, the "
                  "TF_CONFIG workers and ps tasks serve). See README 'Training on a cluster'.")
flags.DEFINE_integer("ps_shards", 0, "parameter_server: split variables of at least "
                     "--ps_min_shard_bytes into this many parts (default: one per ps task).",
                     lower_bound=0)
flags.DEFINE_integer("ps_min_shard_bytes", 256 << 10, "parameter_server: smallest part a "
                     "variable (an embedding table) is split into.", lower_bound=1)
flags.DEFINE_integer("backup_every_steps", 1000, "With --model_dir: back up the training "
                     "state every N steps (and after every epoch) into <model_dir>/backup; "
                     "0: after every epoch only. parameter_server backs up per epoch.",
                     lower_bound=0)
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


def resolve_data() -> tuple:
  """(train pattern, eval pattern or None, schema) from the flags."""
  if FLAGS.train_files:
    train, evaluation = FLAGS.train_files, FLAGS.eval_files
  else:
    if FLAGS.eval_files:
      raise app.UsageError("--eval_files needs --train_files (without both, the built-in "
                           "synthetic data is used).")
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
      weights = reader.default_event_weights(reader.read_columns(train_pattern, schema),
                                             events)
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


def save_model_atomically(model: keras.Model, path: str) -> None:
  """model.save to a hidden temporary name, renamed to `path` when complete: a
  crash leaves the previous model.keras, never a truncated one."""
  tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex[:8]}-"
                     f"{os.path.basename(path)}")
  try:
    model.save(tmp)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)


def count_examples(pattern: str, schema: schema_lib.Schema,
                   duplicate_task: Optional[str]) -> int:
  """Training examples in one pass: records, or copies with --duplicate."""
  if not duplicate_task:
    return reader.count_records(pattern)
  ds = reader.make_dataset(pattern, schema, 8192, shuffle=False, cache=False,
                           check_labels=False, duplicate_task=duplicate_task)
  return sum(int(tf.shape(labels[duplicate_task])[0]) for _, labels, _ in ds)


def run_identity(train_pattern: str, schema: schema_lib.Schema, hparams: dict,
                 steps_per_epoch: int) -> dict:
  """The settings a backup belongs to: resuming with others would mix two runs."""
  return {"model": FLAGS.model, "hyperparameters": models.hyperparameters_of(FLAGS.model,
                                                                            hparams),
          "train_files": train_pattern, "tasks": schema.task_names,
          "event_weights": FLAGS.event_weights, "duplicate": FLAGS.duplicate,
          "loss_weighting": FLAGS.loss_weighting, "batch_size": FLAGS.batch_size,
          "steps_per_epoch": steps_per_epoch, "learning_rate": FLAGS.learning_rate,
          "seed": FLAGS.seed, "shuffle_block": FLAGS.shuffle_block,
          "distribution": FLAGS.distribution}


def check_backup_owner(backup_dir: str, identity: dict) -> None:
  """Refuses to resume a backup that another run's settings wrote."""
  path = os.path.join(backup_dir, "run.json")
  if not tf.io.gfile.exists(os.path.join(backup_dir, "chief")):
    return
  saved = {}
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
  changed = sorted(k for k in identity if saved.get(k) != identity[k])
  if changed:
    raise app.UsageError(
        f"{backup_dir} holds the backup of an unfinished run with other settings "
        f"({', '.join(changed)}). Rerun with that run's flags to resume it, or pass another "
        f"--model_dir (or delete {backup_dir}) to start over.")


def remove_backup(backup_dir: str) -> None:
  """Deletes the finished run's backup directory. Keras has already deleted the
  checkpoint; other workers may still be removing their temporary copies, so a
  directory that is not yet empty is left alone."""
  try:
    tf.io.gfile.remove(os.path.join(backup_dir, "run.json"))
    if not tf.io.gfile.listdir(backup_dir):
      tf.io.gfile.rmtree(backup_dir)
  except tf.errors.OpError:
    pass


def setup_distribution() -> tuple:
  """(TF_CONFIG, strategy or None) for --distribution; first thing in the job,
  because the multi-worker strategy must exist before TensorFlow runs any op
  (and its creation waits for every worker, so the flags are checked before).
  On parameter-server workers and ps tasks it serves and never returns."""
  try:
    config = distribute.tf_config()
    if FLAGS.distribution == "parameter_server" and \
        distribute.role(config)[0] in ("worker", "ps"):
      distribute.serve(config)
      sys.exit(0)
    if FLAGS.distribution != "none" and FLAGS.loss_weighting != "fixed":
      raise app.UsageError(
          f"--loss_weighting={FLAGS.loss_weighting} trains with its own train step, which "
          "computes task losses and gradients per replica; it is only available with "
          "--distribution=none. Use --loss_weighting=fixed to distribute.")
    if FLAGS.distribution in ("multi_worker", "parameter_server") and not FLAGS.train_files:
      raise app.UsageError(f"--distribution={FLAGS.distribution} needs --train_files: "
                           "workers read shares of the same files.")
    workers = distribute.num_workers(FLAGS.distribution, config)
    if workers > 1:
      try:
        num_files = len(reader.list_files(FLAGS.train_files))
      except FileNotFoundError as e:
        raise DataError(str(e)) from None
      if num_files < workers:
        raise DataError(f"--train_files matches {num_files} file(s) but {workers} workers "
                        "read whole files; write at least as many shards (pipelines.convert "
                        "--num_shards).")
    if FLAGS.distribution == "multi_worker" and workers > 1:
      print(f"Waiting for all {workers} workers of TF_CONFIG to start ...", flush=True)
    strategy = distribute.make_strategy(FLAGS.distribution, FLAGS.ps_shards,
                                        FLAGS.ps_min_shard_bytes)
  except distribute.ClusterError as e:
    raise app.UsageError(f"--distribution={FLAGS.distribution}: {e}") from None
  if strategy is not None and FLAGS.batch_size % strategy.num_replicas_in_sync:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} is the global batch and must "
                         f"divide evenly over the {strategy.num_replicas_in_sync} replicas.")
  return config, strategy


def explain_data_error(e: tf.errors.OpError, files: str) -> str:
  lines = [l.strip() for l in e.message.splitlines() if l.strip()]
  keys = ("corrupted record", "Feature:", "Key:", "must be 0 or 1", "Number of")
  detail = next((l for l in lines if any(k in l for k in keys)), lines[-1] if lines else "")
  if isinstance(e, tf.errors.DataLossError) or "corrupted record" in detail:
    return (f"a record in {files} is corrupt or not a TFRecord ({detail}). Rewrite the "
            "shards with `python -m pipelines.convert`; GZIP files must end in .gz.")
  bad_label = re.search(r"assertion failed: \[(.*?)\] \[(.*?)\] \[(.*?)\]", detail)
  if bad_label:
    what, low, high = bad_label.groups()
    return f"bad values in {files}: {what} {low}, {high}."
  if "Feature:" in detail or "Key:" in detail or "Number of" in detail:
    return (f"records in {files} do not match the schema's training layout ({detail}). "
            "Were they written with this schema by `python -m pipelines.convert`? "
            "Pass the matching --schema.")
  return f"reading {files} failed: {detail}"


def train(argv_rest: Optional[list] = None) -> dict:
  """Runs the whole job from FLAGS; returns a summary (paths and metrics)."""
  if argv_rest:
    raise app.UsageError(f"unexpected arguments {argv_rest}; flags look like --name=value.")
  hparams = hyperparameters()
  try:
    fusion = layers.parse_fusion(FLAGS.fusion) if FLAGS.fusion else None
  except ValueError as e:
    raise app.UsageError(f"--fusion: {e}") from None
  config, strategy = setup_distribution()
  chief = distribute.is_chief(config)
  train_pattern, eval_pattern, schema = resolve_data()
  stamp = time.strftime("%Y%m%d-%H%M%S")
  model_dir = FLAGS.model_dir or os.path.join(FLAGS.output_dir, "runs", f"{FLAGS.model}-{stamp}")
  export_dir = (FLAGS.export_dir if FLAGS.export_dir is not None
                else os.path.join(FLAGS.output_dir, "export", FLAGS.model))
  try:
    tf.io.gfile.makedirs(model_dir)
    if export_dir and chief:
      tf.io.gfile.makedirs(export_dir)
  except (tf.errors.OpError, OSError) as e:
    raise app.UsageError(f"--model_dir/--export_dir cannot be created: {e}") from None
  keras.utils.set_random_seed(FLAGS.seed)

  if FLAGS.duplicate and not FLAGS.event_weights:
    raise app.UsageError("--duplicate needs --event_weights.")
  duplicate_task = "engagement" if FLAGS.duplicate else None
  workers = distribute.num_workers(FLAGS.distribution, config)
  train_files = reader.list_files(train_pattern)
  try:
    steps_per_epoch = FLAGS.steps_per_epoch or max(1, math.ceil(
        count_examples(train_pattern, schema, duplicate_task) / FLAGS.batch_size))
  except tf.errors.OpError as e:
    raise DataError(explain_data_error(e, train_pattern)) from None

  # Crash safety: only an explicit --model_dir can be found again by a rerun.
  backup_dir = os.path.join(model_dir, "backup") if FLAGS.model_dir else None
  per_step_backups = (FLAGS.backup_every_steps > 0 and
                      not isinstance(strategy, tf.distribute.ParameterServerStrategy))
  resumed = None
  if backup_dir:
    identity = run_identity(train_pattern, schema, hparams, steps_per_epoch)
    check_backup_owner(backup_dir, identity)
    resumed = distribute.backup_resume_point(backup_dir, steps_per_epoch, per_step_backups)
    if chief:
      tf.io.gfile.makedirs(backup_dir)
      write_json_atomically(os.path.join(backup_dir, "run.json"), identity)
  # Steps already trained: the resumed run skips the batches they read and reads
  # deterministically, so it sees the batches the interrupted run would have
  # (parameter-server workers read at their own pace: no such order to keep).
  done_steps = (resumed[0] * steps_per_epoch + resumed[1]
                if resumed and not isinstance(strategy, tf.distribute.ParameterServerStrategy)
                else 0)
  if resumed:
    print(f"Resuming from the backup in {backup_dir}: epoch {resumed[0] + 1}, step "
          f"{resumed[1]} of {steps_per_epoch}.", flush=True)

  def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
    readers, index = distribute.input_shard(strategy, context, workers)
    if readers > 1 and isinstance(index, int):
      print(f"Input: reader {index} of {readers} reads {len(train_files[index::readers])} "
            f"of the {len(train_files)} training files.", flush=True)
    elif readers > 1:  # a parameter-server worker's index is known only on the worker
      print(f"Input: the {readers} workers read disjoint shares of the {len(train_files)} "
            f"training files (file i goes to worker i mod {readers}).", flush=True)
    # Each worker repeats its own files: every epoch is exactly steps_per_epoch
    # steps on every worker, so none waits for another that ran out of data.
    ds = reader.make_dataset(train_pattern, schema,
                             context.get_per_replica_batch_size(FLAGS.batch_size),
                             seed=FLAGS.seed, cache=FLAGS.cache,
                             shuffle_block=FLAGS.shuffle_block, duplicate_task=duplicate_task,
                             shard=(readers, index) if readers > 1 else None,
                             deterministic=backup_dir is not None).repeat()
    replicas_per_reader = context.num_replicas_in_sync // context.num_input_pipelines
    return ds.skip(done_steps * replicas_per_reader) if done_steps else ds

  train_input = distribute.training_input(strategy, dataset_fn)
  eval_ds = (reader.make_dataset(eval_pattern, schema, 8192, shuffle=False, cache=True)
             if eval_pattern and chief else None)
  with strategy.scope() if strategy else contextlib.nullcontext():
    model = models.build(FLAGS.model, schema, **hparams)
    trainable = models.compile_model(model, schema, learning_rate=FLAGS.learning_rate,
                                     weighting=FLAGS.loss_weighting)
  replicas = strategy.num_replicas_in_sync if strategy else 1
  where = (f" on {workers} workers" if workers > 1 else "") + (
      f" ({replicas} replica{'s' if replicas > 1 else ''})" if strategy else "")
  print(f"Training {FLAGS.model} ({model.count_params():,} parameters) on tasks "
        f"{schema.task_names} from {train_pattern}{where}, {steps_per_epoch} steps of "
        f"{FLAGS.batch_size} per epoch", flush=True)
  if isinstance(strategy, tf.distribute.ParameterServerStrategy):
    split = distribute.sharded_variables(model)
    print("Variables split over the parameter servers: " + (
        ", ".join(f"{name} ({parts} parts)" for name, parts in split.items())
        or "none (each is smaller than --ps_min_shard_bytes)"), flush=True)

  callbacks = [
      keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "checkpoints", "epoch-{epoch:03d}"),
                                      save_weights_only=True),
      keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), profile_batch=0),
  ]
  if backup_dir:
    callbacks.append(distribute.Backup(
        backup_dir, save_freq=FLAGS.backup_every_steps if per_step_backups else "epoch"))
  evaluator = (EvalMetrics(model, schema, eval_ds,
                           os.path.join(model_dir, "logs", "eval_gates"))
               if eval_ds is not None else None)
  if evaluator:
    callbacks.insert(0, evaluator)  # first, so later callbacks log its metrics
  start = time.perf_counter()
  try:
    history = trainable.fit(train_input, epochs=FLAGS.epochs, steps_per_epoch=steps_per_epoch,
                            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
  except tf.errors.OpError as e:
    raise DataError(explain_data_error(
        e, " or ".join(p for p in (train_pattern, eval_pattern) if p))) from None
  seconds = time.perf_counter() - start
  if not chief:
    # The chief holds the same weights and writes every output.
    print("Task %s %d finished; the chief writes the outputs." % distribute.role(config))
    return {"model": FLAGS.model, "chief": False}
  if backup_dir:  # the run is complete: a rerun starts afresh
    remove_backup(backup_dir)

  result = {"model": FLAGS.model, "loss_weighting": FLAGS.loss_weighting,
            "event_weights": {t.name: t.events for t in schema.tasks if t.events},
            "hyperparameters": models.hyperparameters_of(FLAGS.model, hparams),
            "tasks": schema.task_names,
            "train_files": train_pattern, "eval_files": eval_pattern,
            "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "distribution": FLAGS.distribution, "workers": workers,
            "resumed_from": ({"epoch": resumed[0] + 1, "step": resumed[1]}
                             if resumed else None),
            "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed,
            "train_seconds": round(seconds, 2),
            "train_loss": {k: float(v[-1]) for k, v in history.history.items()
                           if k.endswith("loss")},
            "task_weights": {k[len("weight_"):]: float(v[-1])
                             for k, v in history.history.items() if k.startswith("weight_")},
            "eval": evaluator.latest if evaluator else {},
            "gates": evaluator.gates if evaluator else {}}
  if strategy is not None:
    # Saved and exported: the same architecture outside the strategy, so loading
    # it needs no cluster and sharded tables are whole again.
    trained, model = model, models.build(FLAGS.model, schema, **hparams)
    model.set_weights(distribute.weight_values(trained))
  save_model_atomically(model, os.path.join(model_dir, "model.keras"))
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
  if export_dir:
    warmup = (schema.serving_examples(reader.read_columns(eval_pattern, schema, limit=32))
              if eval_pattern else None)
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
