"""Where parsed training data is cached after the first epoch: memory, a file, or nowhere.

Later epochs read parsed blocks from the cache instead of parsing records again
(the first epoch pays the parse). In memory is fastest, but a log too large
for memory would be killed by the kernel in its first epoch with no message;
so the choice is made from the data's record count (the converter's manifest
or the counting pass) and the memory available:

  memory   the parsed data fits in half of the memory available now
  file     it does not: a file cache in the run's directory (local disk speed)
  none     neither fits (or a parameter-server worker, whose reader index, which
           would name its file, is not known when the pipeline is built)
"""

import os
from typing import Optional, Tuple

from pipelines import schema as schema_lib

MODES = ("auto", "memory", "file", "none")
# Measured on the built-in log: ~165 bytes resident per cached example against
# 116 bytes of tensors (block and allocator overhead).
OVERHEAD = 1.5
MEMORY_SHARE = 0.5  # of the available memory; the rest is the model's and TF's


def parsed_bytes_per_example(schema: schema_lib.Schema) -> int:
  """Bytes of the parsed tensors of one training example, before overhead.

  Args:
    schema: the training schema.

  Returns:
    int64 ids and float32 values and labels, padded lists at full length.
  """
  ids = len(schema.categorical) + sum(f.max_len for f in schema.categorical_lists)
  return 8 * (ids + (1 if schema.request_id else 0)) + 4 * (len(schema.numeric)
                                                            + len(schema.labels))


def available_memory_bytes() -> Optional[int]:
  """Memory available to this process now (Linux MemAvailable), or None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def choose(requested: str, records: Optional[int], schema: schema_lib.Schema,
           budget_bytes: Optional[int] = None, file_possible: bool = True
           ) -> Tuple[str, str]:
  """The cache to use, and why, in words.

  Args:
    requested: "auto", or a mode the user chose ("memory", "file", "none").
    records: training examples in the data, or None when unknown.
    schema: the training schema.
    budget_bytes: memory the cache may take (default: half of what is available).
    file_possible: whether a file cache can be named for this reader.

  Returns:
    (mode, reason): the mode ("memory", "file" or "none") and one line for the log.
  """
  if requested != "auto":
    if requested == "file" and not file_possible:
      return "none", ("--cache=file: a parameter-server worker's file cache cannot be "
                      "named; not caching")
    return requested, f"--cache={requested}"
  if budget_bytes is None:
    available = available_memory_bytes()
    budget_bytes = int(available * MEMORY_SHARE) if available else None
  if records is None:
    if file_possible:
      return "file", "the number of training examples is unknown: cached in a file"
    return "none", "the number of training examples is unknown: not cached"
  needed = int(records * parsed_bytes_per_example(schema) * OVERHEAD)
  if budget_bytes is None or needed <= budget_bytes:
    return "memory", (f"~{needed / 2**20:,.0f} MiB of parsed training data cached in memory"
                      + (f" (budget {budget_bytes / 2**20:,.0f} MiB)" if budget_bytes else ""))
  mode = "file" if file_possible else "none"
  return mode, (f"~{needed / 2**20:,.0f} MiB of parsed training data exceeds the memory "
                f"budget of {budget_bytes / 2**20:,.0f} MiB: "
                + ("cached in a file in the run's directory" if mode == "file"
                   else "not cached") + "; --cache=memory|file|none overrides")
