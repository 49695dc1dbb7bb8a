"""Data sources: one module per source behind one protocol (`base.Source`), and
the SOURCES table that `pipelines.convert`, `pipelines.beam_convert` and the
train runner's built-in data all look names up in.

  from pipelines.sources import SOURCES
  schema = SOURCES["synthetic"].write("data/ads", num_shards=4, seed=0,
                                      synthetic_requests=12_000)

A new source is a module with a `Source` subclass, plus one line here; one
defined elsewhere is registered the same way (`SOURCES["toy"] = ToySource()`)
before anything looks it up (for `pipelines.convert`'s flags: before it is
imported).
"""

from typing import Dict

from pipelines.sources.base import Option, Source
from pipelines.sources.census import CensusSource
from pipelines.sources.csv import CsvSource
from pipelines.sources.mmoe_synthetic import MmoeSyntheticSource
from pipelines.sources.synthetic_ads import SyntheticAdsSource

SOURCES: Dict[str, Source] = {
    "synthetic": SyntheticAdsSource(),
    "census": CensusSource(),
    "csv": CsvSource(),
    "mmoe_synthetic": MmoeSyntheticSource(),
}
