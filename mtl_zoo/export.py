"""`python -m mtl_zoo.export`: export a trained run (or several, combined) again.

  python -m mtl_zoo.export --model_dir=runs/mmoe
  python -m mtl_zoo.export --model_dir=runs/mmoe --export_base=exports \\
      [--model_name=ranker --warmup_files='data/eval-*' --keep=3 --fusion=...]

With only --model_dir, the run is exported as its training run would have
exported it (its metrics.json: export directory, serving task, fusion, kept
versions; warm-up from its eval data): the way to finish a run whose export
failed. Otherwise writes `<export_base>/<model_name>/<version>/` and, beside it,
models.config and batching_parameters.txt. The export itself is `mtl_zoo.serving`; combining
runs is `mtl_zoo.models.combine_runs`.
"""

import os
import sys

from absl import app, flags

import tensorflow as tf

from mtl_zoo import distribute, layers, models, runner, serving
from mtl_zoo._keras import keras
from pipelines import files
from pipelines import schema as schema_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so importing this
  module next to another CLI is safe."""
  flags.DEFINE_list("model_dir", None, "A training run's --model_dir (model.keras, "
                    "schema.json); several, comma-separated, export as one combined model "
                    "(e.g. one single-objective run per task, fused with --fusion).",
                    required=True)
  flags.DEFINE_string("export_base", None, "Writes <export_base>/<model_name>/<version>/ "
                      "and, beside it, models.config and batching_parameters.txt. Default "
                      "(one --model_dir, no other export flag): the run's own export "
                      "settings from its metrics.json.")
  flags.DEFINE_string("model_name", None, "Serving name (default: the Keras model's name).")
  flags.DEFINE_string("serving_task", None, "Task behind classify/regress (default: first).")
  flags.DEFINE_string("warmup_files", None, "Training-layout TFRecords to take warm-up "
                      "examples from (e.g. the eval split).")
  flags.DEFINE_integer("warmup_examples", 32, "Examples in the warm-up request.")
  flags.DEFINE_integer("keep", None, "Keep only the newest N versions.", lower_bound=1)
  flags.DEFINE_string("fusion", None, "Adds the rank signature, e.g. "
                      "'product:ctr=1,cvr=0.5,price=1' or 'sum:ctr=1,cvr=2'.")
  flags.DEFINE_string("serving_root", "/models", "--export_base as the server sees it, "
                      "for models.config (the tensorflow/serving image's /models).")
  flags.DEFINE_integer("serving_threads", None, "num_batch_threads in "
                       "batching_parameters.txt (default: TF Serving's, one per core of "
                       "the serving machine).", lower_bound=1)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def export_as_trained(model_dirs, trained) -> None:
  """Exports one run with the export settings its training run recorded."""
  chosen = [name for name in ("model_name", "serving_task", "warmup_files", "keep", "fusion",
                              "serving_threads") if FLAGS[name].present]
  if len(model_dirs) != 1 or chosen:
    _fail("--export_base is needed to combine runs or to export with other settings ("
          + ", ".join(f"--{name}" for name in chosen or ["several --model_dir"]) + ").")
  path = files.join(model_dirs[0], "metrics.json")
  try:
    summary = files.read_json(path)
    if not summary["export_settings"]["export_dir"]:
      raise KeyError("export_dir")
  except (OSError, ValueError, KeyError, tf.errors.OpError):
    _fail(f"{path} does not say where the run exports (its training run had "
          "--export_dir=''); give --export_base.")
  model, schema = trained[0]
  exported = runner.export_run(model, schema, summary, bad_records=summary.get(
      "bad_records", {}).get("policy", "fail"))
  summary.update(exported)
  files.write_json(path, summary)
  for backup_dir in summary.get("backups", []):  # kept for this export; the run is complete
    distribute.remove_backup(backup_dir)
  print(f"SavedModel: {exported['export']}")
  print("Serving configs: " + ", ".join(exported["serving_configs"]))


def main(argv):
  del argv
  trained = []
  for model_dir in FLAGS.model_dir:
    try:
      trained.append((keras.models.load_model(files.join(model_dir, "model.keras")),
                      schema_lib.Schema.load(files.join(model_dir,
                                                        schema_lib.SCHEMA_FILENAME))))
    except (OSError, ValueError) as e:
      _fail(f"--model_dir={model_dir} does not hold a trained model (model.keras and "
            f"schema.json, as `python -m mtl_zoo.train` writes them): {e}")
  if FLAGS.export_base is None:
    export_as_trained(FLAGS.model_dir, trained)
    return
  if len(trained) == 1:
    model, schema = trained[0]
  else:
    try:
      model, schema = models.combine_runs(trained, FLAGS.model_name or "combined")
    except (ValueError, schema_lib.SchemaError) as e:
      _fail(f"--model_dir runs cannot be combined: {e}")
  export_dir = files.join(FLAGS.export_base, FLAGS.model_name or model.name)
  warmup = None
  if FLAGS.warmup_files:
    from pipelines import reader
    warmup = schema.serving_examples(reader.read_columns(FLAGS.warmup_files, schema,
                                                         limit=FLAGS.warmup_examples))
  fusion = layers.parse_fusion(FLAGS.fusion) if FLAGS.fusion else None
  path = serving.export_saved_model(model, schema, export_dir,
                                    serving_task=FLAGS.serving_task,
                                    warmup_examples=warmup, keep=FLAGS.keep, fusion=fusion)
  configs = serving.write_serving_configs(export_dir, FLAGS.serving_root,
                                          num_batch_threads=FLAGS.serving_threads)
  print(f"SavedModel: {os.path.abspath(path) if '://' not in path else path}")
  print("Serving configs: " + ", ".join(configs))


if __name__ == "__main__":
  define_flags()
  app.run(main)
