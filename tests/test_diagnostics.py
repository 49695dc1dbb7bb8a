import os

import numpy as np
import pytest

import mtl_zoo
from mtl_zoo import diagnostics, metrics
from pipelines import reader


def test_summary_flags_collapsed_gates_and_starved_experts():
  uniform = diagnostics.summarize(np.full(4, 0.25))
  assert uniform["normalized_entropy"] == pytest.approx(1.0)
  assert uniform["starved_experts"] == []
  collapsed = diagnostics.summarize(np.array([0.97, 0.01, 0.01, 0.01]))
  assert collapsed["normalized_entropy"] < 0.15
  assert collapsed["starved_experts"] == [1, 2, 3]


def test_gate_report_averages_gate_weights_over_the_data(ads_dir, ads_schema):
  model = mtl_zoo.build_mmoe(ads_schema, num_experts=3)
  ds = reader.make_dataset(os.path.join(ads_dir, "eval-*"), ads_schema, 256, shuffle=False)
  logits = model.get_layer("gates")._logits  # gate_ctr's 3 logits, then gate_cvr's
  # Force the ctr gate onto expert 2 whatever the input.
  kernel = logits.kernel.numpy()
  kernel[:, :3] = 0.0
  logits.kernel.assign(kernel)
  logits.bias.assign([0.0, 0.0, 20.0, 0.0, 0.0, 0.0])
  probe = diagnostics.with_gate_outputs(model)
  collected = metrics.collect(probe, ds)
  report = diagnostics.gate_report(collected)
  # The same pass also serves the task metrics.
  assert collected["ctr"]["prediction"].shape == (1000,)
  assert sorted(report) == ["gate_ctr", "gate_cvr"]
  np.testing.assert_allclose(report["gate_ctr"]["mean_weights"], [0, 0, 1], atol=1e-5)
  assert report["gate_ctr"]["starved_experts"] == [0, 1]
  assert sum(report["gate_cvr"]["mean_weights"]) == pytest.approx(1.0, abs=1e-5)
  plain = mtl_zoo.build_shared_bottom(ads_schema)
  assert diagnostics.with_gate_outputs(plain) is plain
  assert diagnostics.gate_report(metrics.collect(plain, ds)) == {}
