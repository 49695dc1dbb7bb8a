"""CSV files with a header row, plus a schema template you write -> TFRecords.

  python -m pipelines.convert --source=csv --csv_schema=my_schema.json \\
      --csv='train:data/train-*.csv,eval:data/eval.csv' --out_dir=data/mine

The template is the ordinary schema.json format with two conveniences for raw
CSV data:
  * a categorical feature without `vocab_size` holds strings; its vocabulary is
    built from the first split (most frequent first, ties in string order) and
    written into the output schema, and unseen strings map to the OOV row;
  * a categorical feature with `vocab_size` holds integer ids;
  * categorical_list cells hold values separated by `--csv_list_separator` ("|").
Numeric statistics come from the first split. Label columns hold numbers; an
empty numeric cell is NaN ("missing"). Each split is a file pattern; its files
are read in sorted order.

Streaming, so memory does not grow with the data: a first pass over the first
split counts the vocabularies' strings and the rows, a second reads every
split again block by block (pyarrow's CSV reader: parsing and conversions
vectorised in C++), encodes each block and appends it to the shards. A cell
that is not a number where one is needed stops the conversion with an error
naming the file, the row (the header is row 1) and the column.

Reading and encoding live in csv_reading.py, shared with the census source
and the Beam pipeline (csv_beam.py), so every converter writes the same records.
"""

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from pipelines import progress as progress_lib
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import base
from pipelines.sources import csv_reading as reading


class CsvSource(base.Source):
  """CSV files with a header row, described by a schema template."""

  name = "csv"
  description = "CSV files with a header row plus a schema template you write"
  options = (
      base.Option("csv_schema", None, str, "csv: schema template JSON (see "
                  "pipelines/sources/csv.py)."),
      base.Option("csv", None, list, "csv: split:file_pattern pairs; the first split gives "
                  "vocabularies and statistics."),
      base.Option("csv_list_separator", "|", str, "csv: what separates the values of a "
                  "categorical_list cell."),
  )
  runs_on_beam = True

  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, csv_schema: Optional[str], csv: Optional[list],
              csv_list_separator: str) -> schema_lib.Schema:
    del seed  # the rows are written as they are
    if not csv_schema or not csv:
      raise ValueError("the csv source needs a schema template and the files: "
                       "--csv_schema=my_schema.json --csv=train:data/train-*.csv,...")
    template = reading.load_template(csv_schema)
    splits = [(name, reading.match_files(name, pattern))
              for name, pattern in reading.parse_splits(csv)]
    needed = reading.needed_columns(template)
    string_features = reading.vocabulary_features(template)
    # The template is checked before the first pass reads anything.
    reading.schema_with_vocabularies(template, {name: [] for name in string_features})
    vocabularies, first_rows = self._vocabularies(splits[0], string_features, needed[0],
                                                  csv_list_separator)
    schema = reading.schema_with_vocabularies(template, vocabularies)
    encoder = reading.Encoder(schema, vocabularies, csv_list_separator)
    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split=splits[0][0], verbose=True) as w:
      for i, (name, paths) in enumerate(splits):
        w.write_chunks(name, self._encoded(paths, needed, encoder),
                       first_rows if i == 0 else None, num_shards if i == 0 else 1)
    return w.schema

  @staticmethod
  def _vocabularies(split: Tuple[str, List[str]], string_features: Dict[str, str],
                    any_column: str, list_separator: str) -> Tuple[Dict[str, List[str]], int]:
    """The first pass: the vocabularies of the string features of the first
    split, and its row count."""
    name, paths = split
    counts = {feature: reading.TokenCounts() for feature in string_features}
    progress = progress_lib.Progress(f"{name}: counted vocabularies of")
    for path in paths:
      for batch in reading.read_blocks(path, list(string_features) or [any_column]):
        for feature, kind in string_features.items():
          counts[feature].add(reading.tokens(batch.column(feature), kind, list_separator)[0])
        progress.add(batch.num_rows)
    progress.done()
    return {feature: c.vocabulary() for feature, c in counts.items()}, progress.rows

  @staticmethod
  def _encoded(paths: Sequence[str], needed: Sequence[str],
               encoder: reading.Encoder) -> Iterator[Dict[str, object]]:
    """The second pass: each block of each file, encoded."""
    for path in paths:
      first_row = 2  # the header is row 1
      for batch in reading.read_blocks(path, needed):
        yield encoder.encode({c: batch.column(i) for i, c in enumerate(needed)}, path,
                             first_row)
        first_row += batch.num_rows

  def build_beam(self, pipeline, out_dir: str, *, num_shards: int,
                 compression: Optional[str], csv_schema: Optional[str] = None,
                 csv: Optional[list] = None, csv_list_separator: str = "|") -> None:
    from pipelines.sources import csv_beam  # Beam is an optional dependency
    if not csv_schema or not csv:
      raise ValueError("the csv source needs --csv_schema and --csv=train:data/train-*.csv,...")
    csv_beam.build(pipeline, reading.load_template(csv_schema), reading.parse_splits(csv),
                   out_dir, num_shards, compression, csv_list_separator)
