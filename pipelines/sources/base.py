"""What a data source is: a name, the options it takes, and how it writes a
dataset (sharded TFRecords, schema.json, manifest.json) and returns its Schema.

Every source writes with the same call,

  SOURCES[name].write(out_dir, num_shards=4, compression=None, overwrite=False,
                      seed=0, **options)

and declares its options (name, default, type, help), from which
`pipelines.convert` defines its command-line flags. An option's name is its
keyword here and its flag there (`--synthetic_requests`), so option names are
unique across sources: prefix them with the source's name.
"""

import abc
import dataclasses
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from pipelines import files
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib

OPTION_TYPES = (int, float, str, bool, list)


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting of a source.

  Attributes:
    name: the keyword of `Source.write` and the flag of `pipelines.convert`.
    default: the value when not given (None: none; the source may require it).
    type: int, float, str, bool, or list (of strings; comma-separated as a flag).
    help: what it sets, for --help.
    lower_bound: numbers: the smallest allowed value.
  """

  name: str
  default: Any
  type: type
  help: str
  lower_bound: Optional[float] = None

  def __post_init__(self):
    if self.type not in OPTION_TYPES:
      raise TypeError(f"option {self.name!r}: type must be one of "
                      f"{[t.__name__ for t in OPTION_TYPES]}, got {self.type!r}.")

  def check(self, value: Any, source: str) -> Any:
    """Checks a value given for this option.

    Args:
      value: the value (None: not given); a list may be a comma-separated string.
      source: the source's name, for errors.

    Returns:
      The value (a list as a list).

    Raises:
      ValueError: the value has another type, or is below `lower_bound`.
    """
    if value is None:
      return None
    if self.type is list and isinstance(value, str):
      value = [item for item in value.split(",") if item]
    if self.type is list:
      right = isinstance(value, (list, tuple))
    elif self.type in (int, float):  # bool is an int to Python, not here
      right = (isinstance(value, (int, np.integer) if self.type is int
                          else (int, float, np.integer, np.floating))
               and not isinstance(value, bool))
    else:
      right = isinstance(value, self.type)
    if not right:
      raise ValueError(f"source {source!r}: option {self.name} must be of type "
                       f"{self.type.__name__}, got {value!r}.")
    if self.lower_bound is not None and value < self.lower_bound:
      raise ValueError(f"source {source!r}: option {self.name} must be at least "
                       f"{self.lower_bound:g}, got {value!r}.")
    return list(value) if self.type is list else value


class Source(abc.ABC):
  """A data source; subclasses set `name`, `description` and `options`, and
  fill in `convert`. Those that can run as an Apache Beam pipeline set
  `runs_on_beam` and fill in `build_beam` too.

  Attributes:
    name: the key in SOURCES and the value of `--source`.
    description: one line, for --help.
    options: the Options the source takes.
    runs_on_beam: whether `build_beam` is filled in (`pipelines.beam_convert`).
    version: raised when the same options would write different data (a new
      generator), so data written by an earlier version is not reused as if it
      were this one's.
  """

  name: str = ""
  description: str = ""
  options: Tuple[Option, ...] = ()
  runs_on_beam: bool = False
  version: int = 1

  def option_values(self, given: Dict[str, Any]) -> Dict[str, Any]:
    """Every option's value: the given ones, checked, and the defaults.

    Raises:
      ValueError: an option this source does not take, or a value of the wrong
        type or below its bound.
    """
    known = {option.name: option for option in self.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"source {self.name!r} takes no option {unknown}; its options are "
                       f"{sorted(known) or 'none'}.")
    return {name: option.check(given[name], self.name) if name in given else option.default
            for name, option in known.items()}

  def write(self, out_dir: str, *, num_shards: int = 4, compression: Optional[str] = None,
            overwrite: bool = False, seed: int = 0, **options) -> schema_lib.Schema:
    """Writes the dataset into `out_dir`: shards, schema.json, manifest.json.

    Args:
      out_dir: the dataset directory to create.
      num_shards: shards of the training split (the others get fewer).
      compression: None or "GZIP".
      overwrite: replace an existing `out_dir`, once the new data is complete.
      seed: seed of generated data and of random splits.
      **options: the source's own options (see `options`).

    Returns:
      The written schema, with vocabularies and numeric statistics.
    """
    if compression not in writer_lib.COMPRESSION_SUFFIX:
      raise ValueError(f"compression must be None or 'GZIP', got {compression!r}.")
    if num_shards < 1:
      raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
    return self.convert(out_dir, num_shards=num_shards, compression=compression or None,
                        overwrite=overwrite, seed=seed, **self.option_values(options))

  def write_if_missing(self, out_dir: str, **kwargs) -> schema_lib.Schema:
    """Writes the dataset unless `out_dir` already holds one (its schema.json);
    returns its schema either way. Takes `write`'s arguments."""
    if tf.io.gfile.exists(files.join(out_dir, schema_lib.SCHEMA_FILENAME)):
      return schema_lib.Schema.load(out_dir)
    return self.write(out_dir, **kwargs)

  @abc.abstractmethod
  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, **options) -> schema_lib.Schema:
    """Writes the dataset (`write` has checked the arguments and filled in every
    option); typically through `writer.DatasetWriter`, with
    `statistics_split=` the training split and `verbose=True`."""

  def build_beam(self, pipeline, out_dir: str, *, num_shards: int,
                 compression: Optional[str], **options) -> None:
    """Adds the conversion into `out_dir` to a Beam pipeline: shards written by
    Beam's sinks, schema.json last. `num_shards` 0 lets the runner choose."""
    raise NotImplementedError(f"source {self.name!r} does not run on Beam.")

  def __repr__(self) -> str:
    return f"<source {self.name!r}: options {[o.name for o in self.options]}>"
