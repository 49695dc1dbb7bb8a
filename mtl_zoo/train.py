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

import sys
from typing import List, Optional

from absl import app, flags

from mtl_zoo import balancers
from mtl_zoo import losses
from mtl_zoo import models
from mtl_zoo import runner
from mtl_zoo import strategies
from mtl_zoo.config import CALIBRATION_METHODS, STRATEGY_OPTIONS, ConfigError, RunConfig
from mtl_zoo.distribute import DISTRIBUTIONS
from pipelines import caching
from pipelines import validation

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
flags.DEFINE_enum("loss_weighting", "fixed", list(balancers.BALANCERS),
                  "How task losses are balanced: fixed (schema loss weights), uncertainty, "
                  "dwa, gradnorm or pcgrad (see mtl_zoo/balancers/).")
flags.DEFINE_enum("balance_on", balancers.LAST_SHARED, list(balancers.BALANCE_ON),
                  "--loss_weighting=gradnorm/pcgrad: the shared dense parameters they take "
                  "per-task gradients on (never embedding tables): last_shared, the last "
                  "shared layer (GradNorm paper); all_dense, every shared dense layer "
                  "(memory per step: tasks x those parameters floats). An architecture "
                  "whose tasks share no dense parameter (single_task) is refused.")
flags.DEFINE_enum("masked_loss", losses.DEFAULT_MASKED_LOSS, list(losses.MASKED_LOSSES),
                  "What a masked task's loss (e.g. CVR, masked to clicks) is averaged over: "
                  "batch, the whole batch, as Keras does (its weight is then the schema's "
                  "times the batch's kept share, e.g. the click rate); masked, the examples "
                  "its mask keeps (the schema's loss weight is its weight; on the synthetic "
                  "log CVR then fits faster and overfits by epoch 5, BUILD_NOTES).")
flags.DEFINE_string("fusion", None, "How task scores (and numeric features) fuse into "
                    "the ranking score, e.g. 'product:ctr=1,cvr=0.5,price=1' or "
                    "'sum:ctr=1,cvr=2'; exported as the `rank` signature. Default with "
                    "--strategy=fusion, and for the final report: the product of the "
                    "binary tasks' probabilities.")
flags.DEFINE_integer("keep", None, "Keep only the newest N exported versions.", lower_bound=1)
flags.DEFINE_integer("beyond_k", None, "List length of the ranking report's catalog coverage, "
                     "category diversity and novelty (each request's top N by the ranking "
                     "score). Default: 10, or a third of the median request (at least 2) "
                     "where requests hold no more than 10 candidates (then any ranking "
                     "shows the same items).", lower_bound=1)
flags.DEFINE_string("serving_task", None, "Task behind the classify/regress signatures "
                    "(default: the schema's first task).")
flags.DEFINE_integer("serving_threads", None, "num_batch_threads of the exported "
                     "batching_parameters.txt. Default: TF Serving's own (one per core of "
                     "the serving machine).", lower_bound=1)
flags.DEFINE_integer("max_epochs", 10, "Passes over the training data at most: with eval "
                     "data, training stops earlier when --monitor has not improved for "
                     "--patience epochs, and the best epoch's weights are kept.",
                     lower_bound=1)
flags.DEFINE_alias("epochs", "max_epochs")
flags.DEFINE_string("monitor", None, "The validation objective watched after every epoch "
                    "(needs eval data): 'auc' (the mean of the tasks' AUCs, the default; 'mse' "
                    "when every task is a regression), "
                    "one task's metric ('cvr:auc', 'ctr:logloss') or a weighted mean "
                    "('ctr:auc=1,cvr:auc=2'); metrics auc, logloss, mse, ne, ece (lower is "
                    "better for all but auc). The saved and exported model is the best "
                    "epoch's.")
flags.DEFINE_integer("patience", None, "Stop after this many epochs without improvement "
                     "of --monitor (default 2; 0: train all --max_epochs, still keeping "
                     "the best epoch).", lower_bound=0)
flags.DEFINE_integer("batch_size", 2048, "Examples per training step: the global batch of "
                     "one optimizer update, split over all replicas under --distribution.",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Training steps per epoch. Default: one pass "
                     "over the training examples, counted before training.", lower_bound=1)
flags.DEFINE_enum("distribution", "none", list(DISTRIBUTIONS),
                  "tf.distribute strategy: none; mirrored (all local GPUs/CPU); "
                  "multi_worker (MultiWorkerMirroredStrategy over the TF_CONFIG cluster); "
                  "parameter_server (ParameterServerStrategy: the chief coordinates, the "
                  "TF_CONFIG workers and ps tasks serve). See README 'Training on a cluster'.")
flags.DEFINE_integer("ps_shards", 0, "parameter_server: split variables of at least "
                     "--ps_min_shard_bytes into this many parts (default: one per ps task).",
                     lower_bound=0)
flags.DEFINE_integer("ps_min_shard_bytes", 256 << 10, "parameter_server: smallest part a "
                     "variable (an embedding table) is split into.", lower_bound=1)
flags.DEFINE_integer("cpu_replicas", 0, "--distribution=mirrored without GPUs: split the "
                     "CPU into this many logical devices, one replica each (to try "
                     "multi-replica training on a laptop; slower than one).", lower_bound=0)
flags.DEFINE_integer("backup_every_steps", 1000, "With --model_dir: back up the training "
                     "state every N steps (and after every epoch) into <model_dir>/backup; "
                     "0: after every epoch only. parameter_server backs up per epoch.",
                     lower_bound=0)
flags.DEFINE_float("learning_rate", 2e-2, "Adam's learning rate at the first step (chosen "
                   "on validation of the realistic synthetic log: BUILD_NOTES \"Learning "
                   "rate\").", lower_bound=0.0)
flags.DEFINE_integer("learning_rate_decay_steps", 500, "The learning rate at step t is "
                     "--learning_rate / (1 + t / N): half of it after N steps, a tenth "
                     "after 9N; 0 keeps it constant.", lower_bound=0)
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
flags.DEFINE_float("embeddings_l2", 1e-4, "L2 penalty on embedding tables (the default "
                   "chosen on a realistic sparse log; see BUILD_NOTES).", lower_bound=0.0)
flags.DEFINE_integer("cross_layers", 0, "DCN-v2 cross layers (TFRS `Cross`) on top of the "
                     "embeddings, for any architecture.", lower_bound=0)
flags.DEFINE_float("l2_distance_weight", 1e-3, "Weight of the parameter-distance penalty "
                   "between task networks (l2_constrained).", lower_bound=0.0)
flags.DEFINE_float("cross_stitch_self_weight", 0.9, "Initial weight a cross-stitch unit "
                   "gives a task's own activations (cross_stitch).", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and the synthetic data.")
flags.DEFINE_enum("cache", "auto", list(caching.MODES), "Where parsed training data is "
                  "kept after epoch 1: memory, a file under --model_dir, or none. auto: in "
                  "memory when it fits in half of the memory available (from the record "
                  "count), else a file.")
flags.DEFINE_integer("cache_memory_mb", None, "--cache=auto: memory the parsed training "
                     "data may take in memory (default: half of the memory available at "
                     "start).", lower_bound=1)
flags.DEFINE_string("source", "synthetic", "Data source (pipelines.sources.SOURCES) of the "
                    "built-in data used without --train_files.")
flags.DEFINE_integer("shuffle_block", 8192, "Examples shuffled together (see "
                     "pipelines.reader.make_dataset).", lower_bound=1)
flags.DEFINE_enum("bad_records", validation.FAIL, list(validation.BAD_RECORD_POLICIES),
                  "Records that are corrupt, do not parse as the schema's training layout, "
                  "or hold values the schema forbids (a binary label other than 0/1, an "
                  "infinite numeric): 'fail' stops with an error naming the file and "
                  "record; 'skip' leaves each one out, never the good records around it, "
                  "and reports how many at the end and in metrics.json.")
flags.DEFINE_enum("calibrate", None, list(CALIBRATION_METHODS),
                  "After training, fit a calibrator per binary task on --calibration_files "
                  "(platt: logistic regression on the logit; isotonic: pool adjacent "
                  "violators, served piecewise-linear) and make it part of the saved and "
                  "exported model. Masked tasks are fitted on their masked-in rows.")
flags.DEFINE_string("calibration_files", None,
                    "Glob(s) of the calibration split --calibrate fits on: neither training "
                    "nor eval data. Default without --train_files: the built-in data's "
                    "calibration-* split.")
flags.DEFINE_float("negative_sampling", None,
                   "Train on this fraction R (0 < R <= 1) of the negatives of the first "
                   "binary task, the engagement task (e.g. click=0 impressions; a seeded, "
                   "deterministic choice), and serve its probability corrected by "
                   "p / (p + (1 - p) / R) inside the model, before any calibrator. Eval and "
                   "calibration data are never sampled. Tasks masked by the engagement label "
                   "(cvr) keep all their rows, those with a positive engagement label; other "
                   "tasks would be biased and are refused. Default: every negative.")
flags.DEFINE_string("task_weights", None, "Loss weight of each task, over the schema's, "
                    "e.g. 'ctr=1,cvr=0.5' (what `python -m mtl_zoo.tune` searches). "
                    "Default: the schema's loss weights.")
flags.DEFINE_integer("synthetic_requests", 12_000, "Training requests (10 impressions "
                     "each) of the default synthetic log.", lower_bound=1)


# Every balancer's options, from the registry (e.g. --dwa_temperature).
for _balancer, _cls in balancers.BALANCERS.items():
  for _option, (_default, _help) in _cls.OPTIONS.items():
    flags.DEFINE_float(_option, _default, f"--loss_weighting={_balancer}: {_help}")

# Architecture hyper-parameters: flag -> parse. Refused for an architecture
# whose builder does not take them (config.RunConfig.validate).
ARCHITECTURE_FLAGS = ("num_experts", "num_task_experts", "num_shared_experts",
                      "num_levels", "expert_units", "bottom_units", "tower_units",
                      "dropout", "embeddings_l2", "cross_layers", "l2_distance_weight",
                      "cross_stitch_self_weight")
UNIT_FLAGS = ("expert_units", "bottom_units", "tower_units")


def _units(values: List[str], flag: str) -> List[int]:
  try:
    units = [int(v) for v in values if v.strip()]
  except ValueError:
    raise app.UsageError(f"--{flag} takes comma-separated integers, got "
                         f"{','.join(values)!r}.") from None
  if any(u < 1 for u in units):
    raise app.UsageError(f"--{flag} units must be positive, got {units}.")
  return units


def hyperparameters(architecture: str) -> dict:
  """The architecture flags for `architecture`: those given, and the CLI's
  defaults of those its builder takes (a given flag it does not take is left
  in, for the config to refuse by name)."""
  accepted = models.builder_arguments(architecture)
  return {flag: (_units(FLAGS[flag].value, flag) if flag in UNIT_FLAGS
                 else FLAGS[flag].value)
          for flag in ARCHITECTURE_FLAGS if FLAGS[flag].present or flag in accepted}


def config_from_flags() -> RunConfig:
  """The run's RunConfig from the parsed flags. Options of a strategy, a
  balancer or the export that were not given stay unset (None), so that only a
  flag given for the wrong strategy or balancer is refused."""
  def given(flag):
    return FLAGS[flag].value if FLAGS[flag].present else None

  architecture = RunConfig(strategy=FLAGS.strategy, model=FLAGS.model).architecture
  return RunConfig(
      strategy=FLAGS.strategy, model=FLAGS.model, train_files=FLAGS.train_files,
      eval_files=FLAGS.eval_files, schema=FLAGS.schema, tasks=FLAGS.tasks,
      **{option: given(option) for option in STRATEGY_OPTIONS},
      output_dir=FLAGS.output_dir, model_dir=FLAGS.model_dir, export_dir=FLAGS.export_dir,
      loss_weighting=FLAGS.loss_weighting,
      balancer_options={option: FLAGS[option].value for option in balancers.option_owners()
                        if FLAGS[option].present},
      balance_on=FLAGS.balance_on, masked_loss=FLAGS.masked_loss,
      fusion=FLAGS.fusion, keep=given("keep"), serving_task=given("serving_task"),
      serving_threads=FLAGS.serving_threads,
      max_epochs=FLAGS.max_epochs, monitor=FLAGS.monitor,
      patience=FLAGS.patience, batch_size=FLAGS.batch_size,
      steps_per_epoch=FLAGS.steps_per_epoch, distribution=FLAGS.distribution,
      ps_shards=FLAGS.ps_shards, ps_min_shard_bytes=FLAGS.ps_min_shard_bytes,
      cpu_replicas=FLAGS.cpu_replicas,
      backup_every_steps=FLAGS.backup_every_steps, learning_rate=FLAGS.learning_rate,
      learning_rate_decay_steps=FLAGS.learning_rate_decay_steps,
      hyperparameters=hyperparameters(architecture), seed=FLAGS.seed, cache=FLAGS.cache,
      cache_memory_mb=FLAGS.cache_memory_mb,
      shuffle_block=FLAGS.shuffle_block, bad_records=FLAGS.bad_records, source=FLAGS.source,
      source_options=({"synthetic_requests": FLAGS.synthetic_requests}
                      if FLAGS.source == "synthetic" else {}),
      calibrate=FLAGS.calibrate, calibration_files=FLAGS.calibration_files,
      negative_sampling=FLAGS.negative_sampling, task_weights=FLAGS.task_weights,
      beyond_k=FLAGS.beyond_k)


def check_source_flags() -> None:
  """--synthetic_requests sizes the synthetic source only (pipelines.convert
  takes every source's options)."""
  if FLAGS["synthetic_requests"].present and FLAGS.source != "synthetic":
    raise app.UsageError(f"--synthetic_requests belongs to --source=synthetic; this run "
                         f"has --source={FLAGS.source}. Convert other sources' data with "
                         "`python -m pipelines.convert` and pass --train_files.")


def train(argv_rest: Optional[list] = None) -> dict:
  """Runs the whole job from FLAGS; returns its summary (paths and metrics)."""
  if argv_rest:
    raise app.UsageError(f"unexpected arguments {argv_rest}; flags look like --name=value.")
  check_source_flags()
  try:
    return runner.run(config_from_flags()).summary
  except ConfigError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  try:
    train(argv[1:])
  except (runner.DataError, runner.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console-script entry point (`mtl-zoo-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
