"""Gate diagnostics for expert models: how each task spreads its weight over experts.

A collapsed gate (all weight on one expert) or a starved expert (no gate uses
it) is invisible in task metrics but wastes capacity; these summaries make it
visible in metrics.json and TensorBoard.
"""

from typing import Dict

import numpy as np
import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo._keras import dict_output, keras, outputs_by_name

# An expert is "starved" when a gate's mean weight on it is below this fraction
# of the uniform weight 1/num_experts.
STARVED_FRACTION = 0.1


def gate_outputs(model: keras.Model) -> Dict[str, tf.Tensor]:
  """Every gate's [batch, num_experts] weights in `model`'s graph, by gate name
  (a `SoftmaxGate` layer's name, or a name within a `SoftmaxGates` layer)."""
  found = {}
  for layer in model.layers:
    if isinstance(layer, layers.SoftmaxGate):
      found[layer.name] = layer.output
    elif isinstance(layer, layers.SoftmaxGates):
      found.update(dict_output(layer, layer.gate_names))
  return found


def summarize(mean_weights: np.ndarray) -> Dict[str, object]:
  """Summary of one gate's mean expert weights."""
  n = mean_weights.size
  p = np.clip(mean_weights, 1e-12, 1.0)
  entropy = float(-(p * np.log(p)).sum() / np.log(n)) if n > 1 else 1.0
  return {"mean_weights": [round(float(w), 6) for w in mean_weights],
          "normalized_entropy": round(entropy, 6),
          "starved_experts": [int(i) for i in np.flatnonzero(
              mean_weights < STARVED_FRACTION / n)]}


GATE_PREFIX = "gate:"


def with_gate_outputs(model: keras.Model) -> keras.Model:
  """`model` with every gate's weights as extra outputs (`gate:<layer name>`), so
  one pass over eval data yields task predictions and gate weights together."""
  gates = gate_outputs(model)
  if not gates:
    return model
  return keras.Model(model.inputs, {**outputs_by_name(model),
                                    **{GATE_PREFIX + name: g for name, g in gates.items()}})


def gate_report(collected: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, dict]:
  """Per gate, from `metrics.collect` over a `with_gate_outputs` model: mean
  expert weights, `normalized_entropy` (1 = uniform, 0 = collapsed onto one
  expert) and starved experts. {} for models without gates."""
  return {name[len(GATE_PREFIX):]: summarize(part["prediction"].mean(axis=0))
          for name, part in collected.items() if name.startswith(GATE_PREFIX)}


def write_summaries(report: Dict[str, dict], writer, step: int) -> None:
  """Per-gate expert weights and entropy as TensorBoard scalars."""
  with writer.as_default(step=step):
    for gate, summary in report.items():
      tf.summary.scalar(f"gates/{gate}/normalized_entropy", summary["normalized_entropy"])
      for i, w in enumerate(summary["mean_weights"]):
        tf.summary.scalar(f"gates/{gate}/expert_{i}", w)
