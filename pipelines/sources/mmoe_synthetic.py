"""The MMoE paper's synthetic data with controllable task correlation
(Ma et al., KDD 2018, section 3.2; constants as in the PLE paper's variant).

  u1, u2: random orthonormal vectors in R^d
  w1 = c * u1,  w2 = c * (p * u1 + sqrt(1 - p^2) * u2)
  x ~ N(0, I_d)
  y_k = w_k . x + sum_{i=1..m} sin(alpha_i * w_k . x + beta_i) + eps,  eps ~ N(0, 0.01)

p is the Pearson correlation of the two linear parts. With c = 1, m = 10 and
alpha, beta ~ N(0, 1) shared by both tasks. One seed fixes the whole draw
(vectors, alpha, beta and examples), so every model of one setting sees the
same data.

Examples are drawn and written in chunks of CHUNK_EXAMPLES, so memory stays
bounded at any size: the first chunk from the seed's generator (after the
vectors, alpha and beta), chunk k > 0 from a generator seeded [seed, k]. Data
of up to CHUNK_EXAMPLES examples (train and test together; the experiment's
120,000 included) is therefore the single draw it always was.
"""

from typing import Dict, Iterator, Optional

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import base

CHUNK_EXAMPLES = 1 << 17


def make_schema(dims: int = 100) -> schema_lib.Schema:
  """The schema of `dims` numeric inputs and two regression tasks."""
  features = [schema_lib.Feature(f"x{i}", "numeric") for i in range(dims)]
  tasks = [schema_lib.Task("task1", "y1", schema_lib.REGRESSION),
           schema_lib.Task("task2", "y2", schema_lib.REGRESSION)]
  return schema_lib.Schema(features, ["y1", "y2"], tasks, name="mmoe_synthetic")


def generate(num_examples: int, correlation: float, seed: int, dims: int = 100,
             num_sines: int = 10, scale: float = 1.0) -> Iterator[Dict[str, np.ndarray]]:
  """Columns x0..x{d-1}, y1, y2 for one correlation, in chunks of CHUNK_EXAMPLES.

  Args:
    num_examples: examples in all.
    correlation: p, the Pearson correlation of the tasks' linear parts.
    seed: fixes the whole draw.
    dims: d, the inputs.
    num_sines: m, the sine terms.
    scale: c, the weight vectors' norm.

  Yields:
    Chunks of columns, in order.
  """
  if not -1.0 <= correlation <= 1.0:
    raise ValueError(f"correlation must be in [-1, 1], got {correlation}.")
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(dims, 2)))
  u1, u2 = u[:, 0], u[:, 1]
  w1 = scale * u1
  w2 = scale * (correlation * u1 + np.sqrt(1 - correlation ** 2) * u2)
  alpha, beta = rng.normal(size=num_sines), rng.normal(size=num_sines)
  for k, start in enumerate(range(0, num_examples, CHUNK_EXAMPLES)):
    n = min(CHUNK_EXAMPLES, num_examples - start)
    chunk_rng = rng if k == 0 else np.random.default_rng([seed, k])
    x = chunk_rng.normal(size=(n, dims))
    columns = {f"x{i}": x[:, i] for i in range(dims)}
    for name, w in (("y1", w1), ("y2", w2)):
      linear = x @ w
      columns[name] = (linear + np.sin(np.outer(linear, alpha) + beta).sum(axis=1)
                       + chunk_rng.normal(0.0, 0.1, n))
    yield columns


def _rows(chunks: Iterator[Dict[str, np.ndarray]], start: int, stop: int
          ) -> Iterator[Dict[str, np.ndarray]]:
  """Rows [start, stop) of a stream of chunks."""
  first = 0
  for columns in chunks:
    n = len(columns["y1"])
    if first < stop and first + n > start:
      yield writer_lib.slice_columns(columns, max(start - first, 0), min(stop - first, n))
    first += n


class MmoeSyntheticSource(base.Source):
  """The MMoE paper's synthetic regression tasks: `train` and `test` splits."""

  name = "mmoe_synthetic"
  description = "the MMoE paper's synthetic data with a chosen task correlation"
  options = (
      base.Option("mmoe_correlation", 0.5, float, "mmoe_synthetic: the tasks' correlation "
                  "p, in [-1, 1]."),
      base.Option("mmoe_train_examples", 100_000, int, "mmoe_synthetic: training examples.",
                  lower_bound=1),
      base.Option("mmoe_test_examples", 20_000, int, "mmoe_synthetic: test examples.",
                  lower_bound=1),
      base.Option("mmoe_dims", 100, int, "mmoe_synthetic: input dimensions.", lower_bound=2),
  )

  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, mmoe_correlation: float, mmoe_train_examples: int,
              mmoe_test_examples: int, mmoe_dims: int) -> schema_lib.Schema:
    total = mmoe_train_examples + mmoe_test_examples
    draw = lambda: generate(total, mmoe_correlation, seed, mmoe_dims)
    with writer_lib.DatasetWriter(out_dir, make_schema(mmoe_dims), compression, overwrite,
                                  statistics_split="train", verbose=True) as w:
      w.write_chunks("train", _rows(draw(), 0, mmoe_train_examples), mmoe_train_examples,
                     num_shards)
      # Drawn again and skipped to: cheaper than holding the draw.
      w.write_chunks("test", _rows(draw(), mmoe_train_examples, total), mmoe_test_examples)
    return w.schema
