"""Search an architecture's hyper-parameters: each trial is one training run.

Takes every `python -m mtl_zoo.train` flag as the base of all trials (a train
flag given here is fixed, not searched) plus the search's own:

  python -m mtl_zoo.tune --model=mmoe --train_files='data/train-*' \\
      --eval_files='data/validation-*' --trials=40 --output_dir=tune/mmoe
  python -m mtl_zoo.tune --objectives=ctr:auc,cvr:auc --trials=30   # a Pareto front
  python -m mtl_zoo.tune ... --space=space.json                     # narrow or widen
  python -m mtl_zoo.train --flagfile=tune/mmoe/best.flags           # reproduce the best

The study is kept in <output_dir>/study.db: run the same command again to resume
a killed search. Several processes or machines share a study through
--storage=<database URL> (e.g. postgresql://host/db); --trials is the total
they finish together. The eval files are the validation data every trial is
scored on; keep the test data out of the search.
"""

import sys
from typing import List

import optuna
from absl import app, flags, logging

from mtl_zoo import runner
from mtl_zoo import train  # the train flags: the base settings of every trial
from mtl_zoo.config import ConfigError
from mtl_zoo.tuning import results
from mtl_zoo.tuning import space as space_lib
from mtl_zoo.tuning import study as study_lib

FLAGS = flags.FLAGS
FLAGS.set_default("output_dir", "mtl_zoo_output/tune")

flags.DEFINE_integer("trials", 20, "Finished trials (complete, pruned or refused) the "
                     "study holds at the end, over every process sharing it.", lower_bound=1)
flags.DEFINE_string("objectives", None, "Multi-objective search, e.g. 'ctr:auc,cvr:auc' "
                    "(auc maximised, logloss/mse/ne/ece minimised): the result is the Pareto "
                    "front. Default: one objective, --monitor.")
flags.DEFINE_string("space", None, "JSON file of search-space entries that replace or add "
                    "to the architecture's default space (see mtl_zoo/tuning/space.py).")
flags.DEFINE_string("storage", None, "Database URL of the study (SQLAlchemy: sqlite:///..., "
                    "postgresql://..., mysql://...). Default: sqlite:///<output_dir>/study.db.")
flags.DEFINE_string("study_name", "mtl_zoo", "The study's name in the database.")
flags.DEFINE_enum("sampler", "tpe", list(study_lib.SAMPLERS), "tpe (Optuna's TPE, "
                  "multi-objective too) or random.")
flags.DEFINE_enum("pruner", "median", list(study_lib.PRUNERS), "median: stop a trial whose "
                  "monitor after an epoch is below the median of earlier trials at that "
                  "epoch (single objective only); none.")
flags.DEFINE_integer("prune_after_trials", 5, "Trials finished before any is pruned.",
                     lower_bound=0)
flags.DEFINE_integer("prune_warmup_epochs", 1, "Epochs every trial trains before it can be "
                     "pruned.", lower_bound=0)
flags.DEFINE_integer("heartbeat_seconds", 20, "A running trial's heartbeat period in the "
                     "study database.", lower_bound=1)
flags.DEFINE_integer("grace_seconds", 120, "A trial whose heartbeat stopped this long ago "
                     "(its process died on another machine) is marked interrupted and its "
                     "parameters run again. Dead processes of this machine are found at once.",
                     lower_bound=2)


def base_flags() -> List[str]:
  """The train flags given on the command line (and the output directory), as
  flag strings: the part of every trial's flagfile that the search does not set."""
  given = [f for f in FLAGS.get_flags_for_module(train) if f.present and f.name != "epochs"]
  return [f"--output_dir={FLAGS.output_dir}"] + [
      f.serialize() for f in given if f.name != "output_dir"]


def tune(argv_rest=None) -> None:
  """Runs the search from FLAGS and prints its result."""
  if argv_rest:
    raise app.UsageError(f"unexpected arguments {argv_rest}; flags look like --name=value.")
  if FLAGS["model_dir"].present:
    raise app.UsageError("--model_dir: every trial trains in <output_dir>/trials/trial-NNNN; "
                         "choose the study's directory with --output_dir.")
  train.check_source_flags()
  base = train.config_from_flags()
  settings = study_lib.Settings(
      output_dir=FLAGS.output_dir, trials=FLAGS.trials, objectives=FLAGS.objectives,
      storage=FLAGS.storage, study_name=FLAGS.study_name, sampler=FLAGS.sampler,
      pruner=FLAGS.pruner, prune_after_trials=FLAGS.prune_after_trials,
      prune_warmup_epochs=FLAGS.prune_warmup_epochs, seed=FLAGS.seed,
      heartbeat_seconds=FLAGS.heartbeat_seconds, grace_seconds=FLAGS.grace_seconds)
  try:
    base.validate()
    entries = space_lib.load_space_file(FLAGS.space) if FLAGS.space else None
    fixed = [f.name for f in FLAGS.get_flags_for_module(train) if f.present]
    schema = study_lib.data_schema(base)
    space = space_lib.make_space(
        base.architecture, schema.task_names, entries, fixed_flags=fixed,
        where=f"--space={FLAGS.space}", loss_weighting=base.loss_weighting,
        shares_parameters=space_lib.shares_parameters(base.architecture, schema))
    base, flags_list, objectives = study_lib.prepare(base, base_flags(), FLAGS.objectives,
                                                     schema)
    study = study_lib.run_search(
        base, flags_list, space, settings, objectives,
        after_trial=lambda s: results.write(s, objectives, flags_list, FLAGS.output_dir,
                                            plots=False))
  except (ConfigError, space_lib.SpaceError, study_lib.TuneError) as e:
    raise app.UsageError(str(e)) from None
  written = results.write(study, objectives, flags_list, FLAGS.output_dir)
  print("\n" + results.status_line(study))
  title = "Pareto front" if len(objectives) > 1 else "Best trial"
  print(f"\n{title}:\n" + results.front_table(study, objectives, FLAGS.output_dir))
  print("\n" + "\n".join(f"{name}: {path}" for name, path in written.items()))
  if "best" in written:
    print(f"Reproduce: python -m mtl_zoo.train --flagfile={written['best']}")


def main(argv):
  # Each trial prints one line; Optuna's and TensorFlow's own per-trial logs repeat them.
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  logging.set_verbosity(logging.WARNING)
  try:
    tune(argv[1:])
  except runner.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console-script entry point (`mtl-zoo-tune`)."""
  app.run(main)


if __name__ == "__main__":
  run()
