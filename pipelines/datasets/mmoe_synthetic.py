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
"""

from typing import Dict

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib


def make_schema(dims: int = 100) -> schema_lib.Schema:
  features = [schema_lib.Feature(f"x{i}", "numeric") for i in range(dims)]
  tasks = [schema_lib.Task("task1", "y1", schema_lib.REGRESSION),
           schema_lib.Task("task2", "y2", schema_lib.REGRESSION)]
  return schema_lib.Schema(features, ["y1", "y2"], tasks, name="mmoe_synthetic")


def generate(num_examples: int, correlation: float, seed: int, dims: int = 100,
             num_sines: int = 10, scale: float = 1.0) -> Dict[str, np.ndarray]:
  """Columns x0..x{d-1}, y1, y2 for one correlation."""
  if not -1.0 <= correlation <= 1.0:
    raise ValueError(f"correlation must be in [-1, 1], got {correlation}.")
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(dims, 2)))
  u1, u2 = u[:, 0], u[:, 1]
  w1 = scale * u1
  w2 = scale * (correlation * u1 + np.sqrt(1 - correlation ** 2) * u2)
  alpha, beta = rng.normal(size=num_sines), rng.normal(size=num_sines)
  x = rng.normal(size=(num_examples, dims))
  columns = {f"x{i}": x[:, i] for i in range(dims)}
  for name, w in (("y1", w1), ("y2", w2)):
    linear = x @ w
    columns[name] = (linear + np.sin(np.outer(linear, alpha) + beta).sum(axis=1)
                     + rng.normal(0.0, 0.1, num_examples))
  return columns


def write(out_dir: str, correlation: float, num_train: int = 100_000,
          num_test: int = 20_000, seed: int = 0, dims: int = 100,
          overwrite: bool = False) -> schema_lib.Schema:
  """Writes `train` and `test` splits for one correlation (one draw of the task)."""
  columns = generate(num_train + num_test, correlation, seed, dims)
  train = {k: v[:num_train] for k, v in columns.items()}
  test = {k: v[num_train:] for k, v in columns.items()}
  schema = writer_lib.with_numeric_statistics(make_schema(dims), train)
  with writer_lib.DatasetWriter(out_dir, schema, overwrite=overwrite) as w:
    w.write_split("train", train, num_shards=4)
    w.write_split("test", test)
  return schema
