"""Score TFRecord files with an exported SavedModel, streaming, into a CSV file.

  python -m mtl_zoo.predict --saved_model=mtl_zoo_output/export/mmoe/<version> \\
      --input='data/eval-*' --output=scores.csv

Reads training-layout shards (as `pipelines.convert` writes them; labels are
ignored) or, with --input_layout=serving, files of serving-layout tf.Examples.
Writes one row per record, in file order: a running index, the request id when
the schema declares one, and one column per task. The CSV is written under a
temporary name and renamed when complete. Progress and the final examples/second
go to stderr.
"""

import csv
import os
import sys
import time

from absl import app, flags

import tensorflow as tf

from mtl_zoo import export  # importing mtl_zoo pins Keras 2 first
from pipelines import reader
from pipelines import schema as schema_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so importing `score`
  next to another CLI (e.g. mtl_zoo.train, which also has --batch_size) is safe."""
  flags.DEFINE_string("saved_model", None, "An export version directory.", required=True)
  flags.DEFINE_string("input", None, "Glob(s) of TFRecord files to score.", required=True)
  flags.DEFINE_string("output", None, "CSV file to write.", required=True)
  flags.DEFINE_enum("input_layout", "training", ["training", "serving"],
                    "training: shards written by pipelines.convert; serving: tf.Examples "
                    "with one feature per schema feature.")
  flags.DEFINE_integer("batch_size", 4096, "Records scored per call.", lower_bound=1)


def score(saved_model: str, pattern: str, output: str, layout: str = "training",
          batch_size: int = 4096, log=sys.stderr) -> dict:
  """Scores every record; returns {"examples": n, "seconds": s, "examples_per_second": r}."""
  schema = schema_lib.Schema.load(os.path.join(saved_model, export.SCHEMA_ASSET))
  loaded = tf.saved_model.load(saved_model)
  files = reader.list_files(pattern)
  ds = tf.data.TFRecordDataset(files, compression_type=reader.detect_compression(files) or "")
  ds = ds.batch(batch_size)
  if layout == "training":
    ds = ds.map(schema.parse_training_examples, num_parallel_calls=tf.data.AUTOTUNE)
    signature = loaded.signatures[export.FEATURES_SIGNATURE]
  else:
    signature = loaded.signatures[export.SERVING_DEFAULT]
  ds = ds.prefetch(tf.data.AUTOTUNE)
  with_request_id = layout == "training" and schema.request_id
  header = ["index"] + ([schema.request_id] if with_request_id else []) + schema.task_names
  tmp = output + ".tmp"
  count, start, last_report = 0, time.perf_counter(), time.perf_counter()
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for batch in ds:
      if layout == "training":
        features, columns = batch
        outputs = signature(**features)
      else:
        columns, outputs = {}, signature(examples=batch)
      scores = [outputs[t].numpy() for t in schema.task_names]
      ids = [columns[schema.request_id].numpy()] if with_request_id else []
      for i in range(len(scores[0])):
        writer.writerow([count + i] + [int(c[i]) for c in ids]
                        + [f"{s[i]:.6g}" for s in scores])
      count += len(scores[0])
      if time.perf_counter() - last_report > 5:
        last_report = time.perf_counter()
        print(f"  scored {count:,} records ({count / (last_report - start):,.0f}/s)",
              file=log, flush=True)
  os.replace(tmp, output)
  seconds = time.perf_counter() - start
  return {"examples": count, "seconds": seconds,
          "examples_per_second": count / seconds if seconds else float("nan")}


def main(argv):
  del argv
  try:
    stats = score(FLAGS.saved_model, FLAGS.input, FLAGS.output, FLAGS.input_layout,
                  FLAGS.batch_size)
  except (FileNotFoundError, schema_lib.SchemaError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except tf.errors.OpError as e:
    print(f"error: scoring {FLAGS.input} failed ({e.message.splitlines()[0]}); are the "
          f"records in the {FLAGS.input_layout} layout?", file=sys.stderr)
    sys.exit(1)
  except UnicodeDecodeError:
    # TensorFlow's error for bytes that are not a tf.Example quotes them; when they
    # are not text, its Python binding raises this instead.
    print(f"error: a record in {FLAGS.input} is not a serialized tf.Example; are the "
          f"records in the {FLAGS.input_layout} layout?", file=sys.stderr)
    sys.exit(1)
  print(f"Wrote {FLAGS.output}: {stats['examples']:,} records in {stats['seconds']:.1f}s "
        f"({stats['examples_per_second']:,.0f} examples/s)", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
