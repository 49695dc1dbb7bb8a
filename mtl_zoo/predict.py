"""Score TFRecord files with an exported SavedModel, streaming, into CSV, TFRecord
or Parquet.

  python -m mtl_zoo.predict --saved_model=mtl_zoo_output/export/mmoe/<version> \\
      --input='data/eval-*' --output=scores.csv   # or scores.tfrecord, scores.parquet

Reads training-layout shards (as `pipelines.convert` writes them; labels are
ignored) or, with --input_layout=serving, files of serving-layout tf.Examples.
Writes one row per record, in file order: a running index, the request id when
the schema declares one, and one column per task (float32). The format follows
the output's extension (or --output_format): CSV; TFRecord of tf.Examples with
one feature per column; Parquet (needs pyarrow: `pip install "mtl_zoo[parquet]"`),
one row group per batch. The output is written under a temporary name and
renamed when complete. Progress and the final examples/second go to stderr.
"""

import csv
import io
import os
import posixpath
import sys
import time
from typing import Dict, Optional

import numpy as np
from absl import app, flags

import tensorflow as tf

from mtl_zoo import serving  # importing mtl_zoo pins Keras 2 first
from pipelines import files
from pipelines import schema as schema_lib
from pipelines import shards as shards_lib
from pipelines import tfdata

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so importing `score`
  next to another CLI (e.g. mtl_zoo.train, which also has --batch_size) is safe."""
  flags.DEFINE_string("saved_model", None, "An export version directory.", required=True)
  flags.DEFINE_string("input", None, "Glob(s) of TFRecord files to score.", required=True)
  flags.DEFINE_string("output", None, "File to write: .csv, .tfrecord or .parquet.",
                      required=True)
  flags.DEFINE_enum("output_format", None, list(OUTPUT_FORMATS),
                    "Output format, when the extension does not say.")
  flags.DEFINE_enum("input_layout", "training", ["training", "serving"],
                    "training: shards written by pipelines.convert; serving: tf.Examples "
                    "with one feature per schema feature.")
  flags.DEFINE_integer("batch_size", 4096, "Records scored per call.", lower_bound=1)


OUTPUT_FORMATS = ("csv", "tfrecord", "parquet")
_EXTENSIONS = {".csv": "csv", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord",
               ".parquet": "parquet"}


def format_of(path: str, output_format: Optional[str] = None) -> str:
  """The format to write `path` in: `output_format`, else the extension's."""
  if output_format:
    if output_format not in OUTPUT_FORMATS:
      raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
    return output_format
  extension = os.path.splitext(path)[1].lower()
  if extension not in _EXTENSIONS:
    raise ValueError(f"cannot tell the output format of {path!r} from its extension; name "
                     "it .csv, .tfrecord or .parquet, or pass --output_format.")
  return _EXTENSIONS[extension]


class _CsvSink:
  def __init__(self, path: str, columns: Dict[str, type]):
    # GFile writes "\r\n" as given, as open(newline="") would.
    self._file = tf.io.gfile.GFile(path, "w")
    self._writer = csv.writer(self._file)
    self._writer.writerow(list(columns))

  def write(self, batch: Dict[str, np.ndarray]) -> None:
    cells = [[f"{v:.6g}" for v in values] if values.dtype.kind == "f" else values.tolist()
             for values in batch.values()]
    self._writer.writerows(zip(*cells))

  def close(self) -> None:
    self._file.close()


class _TFRecordSink:
  """One tf.Example per record, one feature per column (int64 or float)."""

  def __init__(self, path: str, columns: Dict[str, type]):
    self._writer = tf.io.TFRecordWriter(path)
    # One message, refilled per record: ~2x faster than building a new one.
    self._example = tf.train.Example()
    features = self._example.features.feature
    self._lists = {name: (features[name].float_list if np.dtype(dtype).kind == "f"
                          else features[name].int64_list) for name, dtype in columns.items()}

  def write(self, batch: Dict[str, np.ndarray]) -> None:
    columns = [(self._lists[name], values.tolist()) for name, values in batch.items()]
    for i in range(len(columns[0][1])):
      for value_list, values in columns:
        value_list.value[:] = [values[i]]
      self._writer.write(self._example.SerializeToString())

  def close(self) -> None:
    self._writer.close()


class _GFileStream(io.RawIOBase):
  """A binary GFile as the file object pyarrow writes to: pyarrow's own
  filesystems do not know every TensorFlow filesystem (ram://, gs:// without
  gcsfs), and a GFile lacks the `closed` attribute pyarrow checks."""

  def __init__(self, path: str):
    super().__init__()
    self._file = tf.io.gfile.GFile(path, "wb")

  def writable(self) -> bool:
    return True

  def write(self, data) -> int:
    data = bytes(data)
    self._file.write(data)
    return len(data)

  def tell(self) -> int:
    return self._file.tell()

  def close(self) -> None:
    if not self.closed:
      self._file.close()
    super().close()


class _ParquetSink:
  """One row group per batch."""

  def __init__(self, path: str, columns: Dict[str, type]):
    try:
      import pyarrow
      import pyarrow.parquet
    except ImportError:
      raise ImportError('Parquet output needs pyarrow: pip install "mtl_zoo[parquet]" '
                        "(or write .csv or .tfrecord).") from None
    self._pyarrow = pyarrow
    self._schema = pyarrow.schema([(name, pyarrow.from_numpy_dtype(dtype))
                                   for name, dtype in columns.items()])
    self._stream = _GFileStream(path)
    self._writer = pyarrow.parquet.ParquetWriter(self._stream, self._schema)

  def write(self, batch: Dict[str, np.ndarray]) -> None:
    self._writer.write_table(self._pyarrow.table(batch, schema=self._schema))

  def close(self) -> None:
    self._writer.close()
    self._stream.close()


SINKS = {"csv": _CsvSink, "tfrecord": _TFRecordSink, "parquet": _ParquetSink}


class OutputError(Exception):
  """The output file cannot be written (its directory, permissions)."""


def score(saved_model: str, pattern: str, output: str, layout: str = "training",
          batch_size: int = 4096, log=sys.stderr, output_format: Optional[str] = None) -> dict:
  """Scores every record into `output` (format: `output_format`, else its
  extension); returns {"examples": n, "seconds": s, "examples_per_second": r}."""
  sink_class = SINKS[format_of(output, output_format)]
  directory = posixpath.dirname(output)
  try:
    if directory:
      tf.io.gfile.makedirs(directory)
  except (OSError, tf.errors.OpError) as e:
    raise OutputError(f"cannot create the directory of --output={output}: {e}") from None
  if tf.io.gfile.isdir(output):
    raise OutputError(f"cannot write --output={output}: it is a directory; name a file.")
  schema = schema_lib.Schema.load(files.join(saved_model, serving.SCHEMA_ASSET))
  loaded = tf.saved_model.load(saved_model)
  shards = shards_lib.list_files(pattern)
  ds = tf.data.TFRecordDataset(shards,
                               compression_type=shards_lib.detect_compression(shards) or "")
  ds = ds.batch(batch_size)
  if layout == "training":
    # Plain TensorFlow ops: AutoGraph would only rewrite it (pipelines.shards).
    ds = ds.map(tf.autograph.experimental.do_not_convert(schema.parse_training_examples),
                num_parallel_calls=tf.data.AUTOTUNE)
    signature = loaded.signatures[serving.FEATURES_SIGNATURE]
  else:
    signature = loaded.signatures[serving.SERVING_DEFAULT]
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(tfdata.dataset_options())
  with_request_id = layout == "training" and schema.request_id
  columns = {"index": np.int64, **({schema.request_id: np.int64} if with_request_id else {}),
             **{task: np.float32 for task in schema.task_names}}
  start = time.perf_counter()
  with files.atomic_path(output) as tmp:
    try:
      sink = sink_class(tmp, columns)
    except (OSError, tf.errors.OpError) as e:  # pyarrow's and TensorFlow's file errors
      raise OutputError(f"cannot write --output={output}: {e}") from None
    try:
      count = _score_batches(ds, signature, schema, layout, with_request_id, sink, log)
    finally:
      sink.close()
  seconds = time.perf_counter() - start
  return {"examples": count, "seconds": seconds,
          "examples_per_second": count / seconds if seconds else float("nan")}


def _score_batches(ds: tf.data.Dataset, signature, schema: schema_lib.Schema, layout: str,
                   with_request_id: bool, sink, log) -> int:
  """Scores every batch of `ds` into `sink`; returns the number of records."""
  count, start, last_report = 0, time.perf_counter(), time.perf_counter()
  for batch in ds:
    if layout == "training":
      features, labels = batch
      outputs = signature(**{f.name: features[f.name] for f in schema.serving_features})
    else:
      labels, outputs = {}, signature(examples=batch)
    scores = {t: outputs[t].numpy().astype(np.float32) for t in schema.task_names}
    n = len(scores[schema.task_names[0]])
    rows = {"index": np.arange(count, count + n, dtype=np.int64)}
    if with_request_id:
      rows[schema.request_id] = labels[schema.request_id].numpy().astype(np.int64)
    sink.write({**rows, **scores})
    count += n
    if time.perf_counter() - last_report > 5:
      last_report = time.perf_counter()
      print(f"  scored {count:,} records ({count / (last_report - start):,.0f}/s)",
            file=log, flush=True)
  return count


def main(argv):
  del argv
  try:
    stats = score(FLAGS.saved_model, FLAGS.input, FLAGS.output, FLAGS.input_layout,
                  FLAGS.batch_size, output_format=FLAGS.output_format)
  except (FileNotFoundError, ImportError, ValueError, OutputError,
          schema_lib.SchemaError) as e:
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
