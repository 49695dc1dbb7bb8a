"""Gate diagnostics for expert models: how each task spreads its weight over experts.

A collapsed gate (all weight on one expert) or a starved expert (no gate uses
it) is invisible in task metrics but wastes capacity; these summaries make it
visible in metrics.json and TensorBoard.
"""

from typing import Dict, List

import numpy as np
import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo._keras import keras

# An expert is "starved" when a gate's mean weight on it is below this fraction
# of the uniform weight 1/num_experts.
STARVED_FRACTION = 0.1


def gate_layers(model: keras.Model) -> List[layers.SoftmaxGate]:
  return [l for l in model.layers if isinstance(l, layers.SoftmaxGate)]


def summarize(mean_weights: np.ndarray) -> Dict[str, object]:
  """Summary of one gate's mean expert weights."""
  n = mean_weights.size
  p = np.clip(mean_weights, 1e-12, 1.0)
  entropy = float(-(p * np.log(p)).sum() / np.log(n)) if n > 1 else 1.0
  return {"mean_weights": [round(float(w), 6) for w in mean_weights],
          "normalized_entropy": round(entropy, 6),
          "starved_experts": [int(i) for i in np.flatnonzero(
              mean_weights < STARVED_FRACTION / n)]}


class GateProbe:
  """Reads every gate of a model; build once, `report` after each epoch."""

  def __init__(self, model: keras.Model):
    self.gates = gate_layers(model)
    if self.gates:
      probe = keras.Model(model.inputs, {g.name: g.output for g in self.gates})
      self._predict = tf.function(lambda features: probe(features, training=False),
                                  reduce_retracing=True)

  def report(self, dataset: tf.data.Dataset) -> Dict[str, dict]:
    """Mean gate weights over a (features, ...) dataset, per gate layer ({} without
    gates). `normalized_entropy` is 1 for a gate that weighs all experts equally
    and 0 for one collapsed onto a single expert."""
    if not self.gates:
      return {}
    sums = {g.name: 0.0 for g in self.gates}
    count = 0
    for batch in dataset:
      features = batch[0] if isinstance(batch, tuple) else batch
      for name, weights in self._predict(features).items():
        sums[name] = sums[name] + tf.reduce_sum(weights, axis=0).numpy()
      count += int(tf.shape(next(iter(features.values())))[0])
    return {name: summarize(total / max(count, 1)) for name, total in sums.items()}


def gate_report(model: keras.Model, dataset: tf.data.Dataset) -> Dict[str, dict]:
  """One-off `GateProbe(model).report(dataset)`."""
  return GateProbe(model).report(dataset)


def write_summaries(report: Dict[str, dict], writer, step: int) -> None:
  """Per-gate expert weights and entropy as TensorBoard scalars."""
  with writer.as_default(step=step):
    for gate, summary in report.items():
      tf.summary.scalar(f"gates/{gate}/normalized_entropy", summary["normalized_entropy"])
      for i, w in enumerate(summary["mean_weights"]):
        tf.summary.scalar(f"gates/{gate}/expert_{i}", w)
