"""Train a multi-task model from TFRecords, report per-task metrics, export it.

With no flags: writes the built-in synthetic ads log, trains an MMoE on CTR and
CVR (CVR masked to clicked impressions), prints metrics and exports a
SavedModel, all under ./mtl_zoo_output/. `--strategy` picks one of the four
ways to rank by several objectives (see mtl_zoo/strategies.py); every strategy
ends with the same report of how its ranking score serves each objective.

  python -m mtl_zoo.train
  python -m mtl_zoo.train --strategy=learning_to_rank --ranking_loss=pairwise
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

from mtl_zoo import distribute
from mtl_zoo import layers
from mtl_zoo import metrics as metrics_lib
from mtl_zoo import models
from mtl_zoo import strategies
from mtl_zoo import weighting
from mtl_zoo._keras import keras
from mtl_zoo import export
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines.datasets import synthetic_ads

import tensorflow as tf  # noqa: E402  (after mtl_zoo._keras pins Keras 2)

FLAGS = flags.FLAGS

flags.DEFINE_enum("strategy", "multi_task", strategies.STRATEGIES,
                  "How the objectives become one ranking: multi_task (one model, an "
                  "output per task, fused by --fusion), fusion (one model per task, "
                  "fused by --fusion), sample_weighting (one 'engagement' task weighted "
                  "by --event_weights), learning_to_rank (one graded 'relevance' task "
                  "with --grades, --ranking_loss and --list_size).")
flags.DEFINE_enum("model", None, sorted(models.MODELS), "Architecture to train. Default: "
                  "mmoe for --strategy=multi_task, single_task for the others.")
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
                    "--strategy=sample_weighting: the weight of each event, e.g. "
                    "'conversion=1,click=0.2', or 'auto:conversion,click' for weights from "
                    "the training data's event counts. Default: auto over the schema's "
                    "binary task labels.")
flags.DEFINE_boolean("duplicate", False, "--strategy=sample_weighting: repeat examples in "
                     "proportion to their weights instead of weighting them.")
flags.DEFINE_string("grades", None, "--strategy=learning_to_rank: relevance grade of each "
                    "event, e.g. 'purchase=3,cart=2,click=1'. Default: funnel depth "
                    "(click 1, conversion 2).")
flags.DEFINE_enum("ranking_loss", "listwise", ["listwise", "pairwise"],
                  "--strategy=learning_to_rank: softmax cross-entropy over each request's "
                  "list, or logistic loss over its ordered pairs (RankNet).")
flags.DEFINE_integer("list_size", 10, "--strategy=learning_to_rank: examples per request "
                     "list; longer requests are cut, shorter ones padded.", lower_bound=2)
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
flags.DEFINE_string("fusion", None, "How task scores (and numeric features) fuse into "
                    "the ranking score, e.g. 'product:ctr=1,cvr=0.5,price=1' or "
                    "'sum:ctr=1,cvr=2'; exported as the `rank` signature. Default with "
                    "--strategy=fusion, and for the final report: the product of the "
                    "binary tasks' probabilities.")
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


def check_export_flags() -> None:
  """Flags that only configure the export are refused when there is none."""
  if FLAGS.export_dir == "":
    for flag in ("keep", "serving_task"):
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
  """(train pattern, eval pattern or None, the data's schema) from the flags."""
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
    schema.require_statistics()
  except (FileNotFoundError, schema_lib.SchemaError) as e:
    raise DataError(str(e)) from None
  return train, evaluation, schema


def check_strategy_flags() -> None:
  """Flags that only one strategy reads are refused with the others."""
  owners = {"event_weights": "sample_weighting", "duplicate": "sample_weighting",
            "grades": "learning_to_rank", "ranking_loss": "learning_to_rank",
            "list_size": "learning_to_rank"}
  for flag, strategy in owners.items():
    if FLAGS[flag].present and FLAGS.strategy != strategy:
      raise app.UsageError(f"--{flag} belongs to --strategy={strategy}; this run has "
                           f"--strategy={FLAGS.strategy}.")
  if FLAGS.loss_weighting != "fixed" and FLAGS.strategy != "multi_task":
    raise app.UsageError(f"--loss_weighting={FLAGS.loss_weighting} balances several tasks "
                         f"in one model; --strategy={FLAGS.strategy} trains one task per "
                         "model. Use --strategy=multi_task.")


def training_runs(schema: schema_lib.Schema, train_pattern: str,
                  model_name: str) -> List[tuple]:
  """(run name, training schema) per model the strategy trains."""
  if FLAGS.strategy == "fusion":
    return [(task, models.training_schema(model_name, schema.with_tasks([task])))
            for task in schema.task_names]
  if FLAGS.strategy == "sample_weighting":
    schema = strategies.sample_weighting_schema(
        schema, event_weights(schema, FLAGS.event_weights, train_pattern))
  elif FLAGS.strategy == "learning_to_rank":
    grades = (strategies.parse_event_values(FLAGS.grades, "--grades") if FLAGS.grades
              else strategies.default_grades(schema))
    schema = strategies.learning_to_rank_schema(schema, grades, FLAGS.list_size,
                                                FLAGS.ranking_loss)
  return [(model_name, models.training_schema(model_name, schema))]


def event_weights(schema: schema_lib.Schema, spec: Optional[str],
                  train_pattern: str) -> Dict[str, float]:
  """--event_weights: explicit, or 'auto:<events>' (default: auto over the
  funnel's labels) from the training data's event counts."""
  if spec and not spec.startswith("auto:"):
    return strategies.parse_event_values(spec, "--event_weights")
  events = ([e.strip() for e in spec[len("auto:"):].split(",") if e.strip()] if spec
            else [t.label for t in strategies.funnel(schema)])
  missing = [e for e in events if e not in schema.labels]
  if missing or not events:
    raise schema_lib.SchemaError(f"--event_weights: {missing or events} are not label "
                                 f"columns {schema.labels}.")
  try:
    return reader.event_weights_from_counts(
        reader.count_events(train_pattern, schema, events, bad_records=FLAGS.bad_records))
  except ValueError as e:  # BadRecordError too
    raise schema_lib.SchemaError(f"--event_weights: {e}") from None
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise DataError(explain_data_error(e, train_pattern, schema)) from None


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


def count_examples(pattern: str, schema: schema_lib.Schema, duplicate_task: Optional[str],
                   skipped: reader.SkippedRecords,
                   list_overflow: Optional[reader.ListOverflow] = None) -> int:
  """Training examples in one pass: records, copies with --duplicate, or list
  slots (padding included) for ranking tasks, whose examples past list_size
  `list_overflow` counts; with --bad_records=skip, of the good records only, and
  `skipped` counts the others."""
  skip = FLAGS.bad_records == reader.SKIP
  if not duplicate_task and not schema.list_size and not skip:
    return reader.count_records(pattern)
  ds = reader.make_dataset(pattern, schema, 8192, shuffle=False, cache=False,
                           check_values=skip, duplicate_task=duplicate_task,
                           bad_records=FLAGS.bad_records, skipped=skipped,
                           list_overflow=list_overflow)
  return sum(int(tf.shape(next(iter(labels.values())))[0]) for _, labels, _ in ds)


def examples_per_step(schema: schema_lib.Schema) -> int:
  """--batch_size, or for ranking tasks the whole lists that fit in it."""
  if not schema.list_size:
    return FLAGS.batch_size
  return max(1, FLAGS.batch_size // schema.list_size) * schema.list_size


def run_identity(model_name: str, train_pattern: str, schema: schema_lib.Schema,
                 hparams: dict, steps_per_epoch: int) -> dict:
  """The settings a backup belongs to: resuming with others would mix two runs."""
  return {"model": model_name, "hyperparameters": models.hyperparameters_of(model_name,
                                                                           hparams),
          "train_files": train_pattern, "tasks": schema.task_names,
          "strategy": FLAGS.strategy, "event_weights": FLAGS.event_weights,
          "duplicate": FLAGS.duplicate, "grades": FLAGS.grades,
          "ranking_loss": FLAGS.ranking_loss, "list_size": FLAGS.list_size,
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


def fit_model(name: str, schema: schema_lib.Schema, model_name: str, hparams: dict,
              train_pattern: str, eval_pattern: Optional[str], model_dir: str,
              strategy, config: dict, workers: int) -> dict:
  """Builds, compiles and fits one model (under `strategy`, resuming from its
  backup in `model_dir` if there is one); returns it, outside any strategy,
  with its history and eval metrics."""
  chief = distribute.is_chief(config)
  duplicate_task = strategies.ENGAGEMENT_TASK if FLAGS.duplicate else None
  train_files = reader.list_files(train_pattern)
  skipped = {"train": reader.SkippedRecords()}
  list_overflow = reader.ListOverflow() if schema.list_size else None
  # The counting pass also finds damaged shards, empty data and, with
  # --bad_records=skip, what is left out (counted even with --steps_per_epoch).
  counted = not FLAGS.steps_per_epoch or FLAGS.bad_records == reader.SKIP
  if counted:
    try:
      examples = count_examples(train_pattern, schema, duplicate_task, skipped["train"],
                                list_overflow)
    except reader.BadRecordError as e:
      raise DataError(f"--train_files: {e}") from None
    except (tf.errors.OpError, UnicodeDecodeError) as e:
      raise DataError(explain_data_error(e, train_pattern, schema)) from None
    if not examples:
      left_out = skipped["train"].counts()["total"]
      raise DataError(f"--train_files={train_pattern} holds no training examples"
                      + (f" ({left_out} bad records were skipped)" if left_out else
                         ": the files hold no records") + ".")
    if list_overflow and list_overflow.count:
      print(f"Warning: {list_overflow.count} training examples are past --list_size="
            f"{schema.list_size} in their request and are left out of training; raise "
            "--list_size to keep them.")
  steps_per_epoch = FLAGS.steps_per_epoch or max(1, math.ceil(
      examples / examples_per_step(schema)))

  # Crash safety: only an explicit --model_dir can be found again by a rerun.
  backup_dir = os.path.join(model_dir, "backup") if FLAGS.model_dir else None
  per_step_backups = (FLAGS.backup_every_steps > 0 and
                      not isinstance(strategy, tf.distribute.ParameterServerStrategy))
  resumed = None
  if backup_dir:
    identity = run_identity(model_name, train_pattern, schema, hparams, steps_per_epoch)
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
                             deterministic=backup_dir is not None,
                             bad_records=FLAGS.bad_records).repeat()
    replicas_per_reader = context.num_replicas_in_sync // context.num_input_pipelines
    return ds.skip(done_steps * replicas_per_reader) if done_steps else ds

  try:
    train_input = distribute.training_input(strategy, dataset_fn)
  except reader.BadRecordError as e:
    raise DataError(f"--train_files: {e}") from None
  eval_ds = None
  if eval_pattern and chief:
    skipped["eval"] = reader.SkippedRecords()
    try:
      eval_ds = reader.make_dataset(eval_pattern, schema, 8192, shuffle=False, cache=True,
                                    group_lists=False, bad_records=FLAGS.bad_records,
                                    skipped=skipped["eval"])
    except reader.BadRecordError as e:
      raise DataError(f"--eval_files: {e}") from None
  # Fused per-task models need distinct names to be combined into one model.
  hparams = {**hparams, "name": model_name if name == model_name else f"{name}_{model_name}"}
  with strategy.scope() if strategy else contextlib.nullcontext():
    model = models.build(model_name, schema, **hparams)
    trainable = models.compile_model(model, schema, learning_rate=FLAGS.learning_rate,
                                     weighting=FLAGS.loss_weighting)
  replicas = strategy.num_replicas_in_sync if strategy else 1
  where = (f" on {workers} workers" if workers > 1 else "") + (
      f" ({replicas} replica{'s' if replicas > 1 else ''})" if strategy else "")
  print(f"Training {model_name} ({model.count_params():,} parameters) on tasks "
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
  evaluator = (metrics_lib.EpochEvaluation(
      model, schema, eval_ds, log_dir=os.path.join(model_dir, "logs", "eval_gates"),
      report=True) if eval_ds is not None else None)
  if evaluator:
    callbacks.insert(0, evaluator)  # first, so later callbacks log its metrics
  start = time.perf_counter()
  try:
    history = trainable.fit(train_input, epochs=FLAGS.epochs, steps_per_epoch=steps_per_epoch,
                            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise DataError(explain_data_error(
        e, ",".join(p for p in (train_pattern, eval_pattern) if p), schema)) from None
  seconds = time.perf_counter() - start
  if backup_dir and chief:  # the run is complete: a rerun starts afresh
    remove_backup(backup_dir)
  if strategy is not None:
    # Saved and exported: the same architecture outside the strategy, so loading
    # it needs no cluster and sharded tables are whole again.
    trained, model = model, models.build(model_name, schema, **hparams)
    model.set_weights(distribute.weight_values(trained))
  return {"name": name, "model": model, "schema": schema, "train_seconds": seconds,
          "steps_per_epoch": steps_per_epoch,
          "resumed_from": ({"epoch": resumed[0] + 1, "step": resumed[1]}
                           if resumed else None),
          "train_loss": {k: float(v[-1]) for k, v in history.history.items()
                         if k.endswith("loss")},
          "task_weights": {k[len("weight_"):]: float(v[-1])
                           for k, v in history.history.items() if k.startswith("weight_")},
          "eval": evaluator.latest if evaluator else {},
          "gates": evaluator.gates if evaluator else {},
          # Training data: the counting pass; eval data: its cached first pass.
          "skipped": skipped,
          # Ranking tasks: training examples past list_size, from the counting
          # pass (None: not counted, with --steps_per_epoch).
          "examples_past_list_size": (list_overflow.count if list_overflow and counted
                                      else None)}


def bad_records_report(fitted: List[dict]) -> dict:
  """--bad_records and what each run's data lost, for metrics.json (and printed)."""
  report = {"policy": FLAGS.bad_records,
            "skipped": _merged([{**run, "skipped": {data: s.counts() for data, s in
                                                    run["skipped"].items()}}
                                for run in fitted], "skipped"),
            "damage": sorted({str(d) for run in fitted for s in run["skipped"].values()
                              for d in s.damage})}
  if FLAGS.bad_records == reader.SKIP:
    print("\nBad records (--bad_records=skip):")
    for run in fitted:
      for data, s in run["skipped"].items():
        print(f"  {data}" + (f" ({run['name']})" if len(fitted) > 1 else "")
              + f": {s.summary()}")
  return report


def train(argv_rest: Optional[list] = None) -> dict:
  """Runs the whole job from FLAGS; returns a summary (paths and metrics)."""
  if argv_rest:
    raise app.UsageError(f"unexpected arguments {argv_rest}; flags look like --name=value.")
  check_strategy_flags()
  check_export_flags()
  model_name = FLAGS.model or ("mmoe" if FLAGS.strategy == "multi_task" else "single_task")
  hparams = hyperparameters()
  try:
    fusion = layers.parse_fusion(FLAGS.fusion) if FLAGS.fusion else None
  except ValueError as e:
    raise app.UsageError(f"--fusion: {e}") from None
  if fusion and FLAGS.strategy not in ("multi_task", "fusion"):
    raise app.UsageError(f"--fusion fuses several task outputs; --strategy="
                         f"{FLAGS.strategy} trains a model with one output.")
  config, strategy = setup_distribution()
  chief = distribute.is_chief(config)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  run_label = model_name if FLAGS.strategy == "multi_task" else FLAGS.strategy
  model_dir = FLAGS.model_dir or os.path.join(FLAGS.output_dir, "runs", f"{run_label}-{stamp}")
  export_dir = (FLAGS.export_dir if FLAGS.export_dir is not None
                else os.path.join(FLAGS.output_dir, "export", run_label))
  writable_dir(model_dir, "model_dir")
  if export_dir and chief:
    writable_dir(export_dir, "export_dir")
  train_pattern, eval_pattern, data_schema = resolve_data()
  try:
    runs = training_runs(data_schema, train_pattern, model_name)
  except schema_lib.SchemaError as e:
    raise DataError(str(e)) from None
  tasks = [task for _, schema in runs for task in schema.task_names]
  if FLAGS.serving_task and FLAGS.serving_task not in tasks:
    raise app.UsageError(f"--serving_task={FLAGS.serving_task} is not a task of the model; "
                         f"its tasks are {tasks}.")
  if FLAGS.strategy == "fusion":
    fusion = fusion or strategies.default_fusion(data_schema)
  tf.io.gfile.makedirs(model_dir)
  keras.utils.set_random_seed(FLAGS.seed)

  workers = distribute.num_workers(FLAGS.distribution, config)
  fitted = [fit_model(name, schema, model_name, hparams, train_pattern, eval_pattern,
                      os.path.join(model_dir, name) if len(runs) > 1 else model_dir,
                      strategy, config, workers)
            for name, schema in runs]
  if not chief:
    # The chief holds the same weights and writes every output.
    print("Task %s %d finished; the chief writes the outputs." % distribute.role(config))
    return {"model": model_name, "chief": False}
  if len(fitted) > 1:
    schema = data_schema.with_tasks([t for run in fitted for t in run["schema"].task_names])
    model = export.combine_models([run["model"] for run in fitted], schema, name=run_label)
  else:
    model, schema = fitted[0]["model"], fitted[0]["schema"]

  result = {"strategy": FLAGS.strategy, "model": model_name,
            "loss_weighting": FLAGS.loss_weighting,
            "event_weights": {t.name: t.events for t in schema.tasks
                              if t.events and t.type == schema_lib.BINARY},
            "grades": {t.name: t.events for t in schema.tasks
                       if t.type == schema_lib.RANKING},
            "examples_past_list_size": (_merged(fitted, "examples_past_list_size")
                                        if schema.list_size else None),
            "fusion": fusion,
            "hyperparameters": models.hyperparameters_of(model_name, hparams),
            "tasks": schema.task_names,
            "train_files": train_pattern, "eval_files": eval_pattern,
            "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size,
            "steps_per_epoch": _merged(fitted, "steps_per_epoch"),
            "distribution": FLAGS.distribution, "workers": workers,
            "resumed_from": _merged(fitted, "resumed_from"),
            "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed,
            "train_seconds": round(sum(run["train_seconds"] for run in fitted), 2),
            "train_loss": _merged_dicts(fitted, "train_loss"),
            "task_weights": _merged_dicts(fitted, "task_weights"),
            "eval": {task: values for run in fitted for task, values in run["eval"].items()},
            "gates": _merged_dicts(fitted, "gates"),
            "bad_records": bad_records_report(fitted)}
  save_model_atomically(model, os.path.join(model_dir, "model.keras"))
  schema.save(os.path.join(model_dir, schema_lib.SCHEMA_FILENAME))
  if eval_pattern:
    print("\nEval metrics (" + eval_pattern + "):")
    print(metrics_lib.format_table(result["eval"], ["auc", "logloss", "mse",
                                                    "positive_rate", "examples"]))
    for gate, summary in result["gates"].items():
      weights = " ".join(f"{w:.2f}" for w in summary["mean_weights"])
      starved = summary["starved_experts"]
      print(f"gate {gate}: mean expert weights [{weights}], normalized entropy "
            f"{summary['normalized_entropy']:.2f}"
            + (f", starved experts {starved}" if starved else ""))
    result["ranking"] = ranking_report(model, schema, data_schema, eval_pattern, fusion)
  if export_dir:
    warmup = (schema.serving_examples(reader.read_columns(
        eval_pattern, schema, limit=32, bad_records=FLAGS.bad_records))
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


def _merged(fitted: List[dict], key: str):
  """One run's value as is; several runs' values by run name."""
  if len(fitted) == 1:
    return fitted[0][key]
  return {run["name"]: run[key] for run in fitted}


def _merged_dicts(fitted: List[dict], key: str) -> dict:
  """One run's dict as is; several runs' dicts with keys prefixed by run name."""
  if len(fitted) == 1:
    return fitted[0][key]
  return {f"{run['name']}/{k}": v for run in fitted for k, v in run[key].items()}


def ranking_report(model: keras.Model, schema: schema_lib.Schema,
                   data_schema: schema_lib.Schema, eval_pattern: str,
                   fusion: Optional[dict]) -> Dict[str, float]:
  """How the strategy's one ranking score (the fused outputs, or the only
  output) serves each of the data's objectives on the eval data; printed."""
  if not strategies.funnel(data_schema):
    return {}  # no binary objectives to rank by
  columns = reader.read_columns(eval_pattern, data_schema, bad_records=FLAGS.bad_records)
  outputs = metrics_lib.predict_columns(model, schema, columns)
  outputs = {task: outputs[task] for task in schema.task_names}
  if fusion is None and len(outputs) > 1:
    fusion = strategies.default_fusion(data_schema)
  report = strategies.objective_report(strategies.ranking_score(outputs, columns, fusion),
                                       columns, data_schema)
  how = (f"{fusion['mode']} of " + ", ".join(f"{t}^{w:g}" if fusion["mode"] == "product"
                                             else f"{w:g}*{t}"
                                             for t, w in zip(fusion["terms"],
                                                             fusion["weights"]))
         if fusion else f"the {next(iter(outputs))} output")
  print(f"\nRanking score ({how}) against each objective:")
  print(metrics_lib.format_table({"score": report}))
  return report


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
