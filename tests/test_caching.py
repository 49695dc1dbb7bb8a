"""The training cache's choice (memory, file, none) from the record count and the
memory budget, and a run whose data does not fit its budget."""

import io
import contextlib

import pytest

from conftest import mixed_schema
from mtl_zoo import runner
from mtl_zoo.config import ConfigError, RunConfig
from pipelines import caching


def test_parsed_size_counts_every_tensor_of_an_example():
  schema = mixed_schema()
  ids = len(schema.categorical) + sum(f.max_len for f in schema.categorical_lists)
  expected = 8 * (ids + (1 if schema.request_id else 0)) + 4 * (
      len(schema.numeric) + len(schema.labels))
  assert caching.parsed_bytes_per_example(schema) == expected > 0


def test_choice_follows_the_budget_and_the_users_word():
  schema = mixed_schema()
  per_example = caching.parsed_bytes_per_example(schema) * caching.OVERHEAD
  fits = int(per_example * 1000)
  assert caching.choose("auto", 1000, schema, budget_bytes=fits)[0] == "memory"
  mode, why = caching.choose("auto", 1001, schema, budget_bytes=fits)
  assert mode == "file" and "exceeds the memory budget" in why
  assert caching.choose("auto", 1001, schema, budget_bytes=fits,
                        file_possible=False)[0] == "none"
  assert caching.choose("auto", None, schema, budget_bytes=fits)[0] == "file"
  assert caching.choose("memory", 10**12, schema, budget_bytes=fits)[0] == "memory"
  assert caching.choose("none", 1, schema)[0] == "none"
  assert caching.available_memory_bytes() > 0


def test_unknown_cache_mode_is_refused():
  with pytest.raises(ConfigError, match="--cache=disk is not one of"):
    RunConfig(cache="disk").validate()


def test_data_larger_than_the_memory_budget_trains_from_a_file_cache(tmp_path):
  # 10,000 built-in impressions: ~1.7 MB parsed, over a 1 MB budget.
  config = RunConfig(output_dir=str(tmp_path), model_dir=str(tmp_path / "run"),
                     export_dir="", max_epochs=2, patience=0, cache_memory_mb=1,
                     source_options={"synthetic_requests": 1000}, model="shared_bottom")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = runner.run(config)
  assert "Cache: ~" in printed.getvalue() and "exceeds the memory budget of 1 MiB" in \
      printed.getvalue()
  assert result.summary["cache"] == "file"
  # Two epochs: the second read the file cache the first wrote; it is removed after.
  assert len(result.curve) == 2 and result.summary["eval"]["ctr"]["auc"] > 0.55
  assert not (tmp_path / "run" / "cache").exists()
  default = runner.run(RunConfig(output_dir=str(tmp_path), export_dir="", max_epochs=1,
                                 source_options={"synthetic_requests": 1000},
                                 model="shared_bottom", quiet=True))
  assert default.summary["cache"] == "memory"
