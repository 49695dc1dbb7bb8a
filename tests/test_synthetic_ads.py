"""The built-in synthetic ads log as a benchmark: skewed popularity, click-bait,
position bias, and its oracle beside the shards, reported next to the model."""

import os

import numpy as np
import pytest

from mtl_zoo import metrics, oracle_report, runner, strategies
from mtl_zoo.config import RunConfig
from mtl_zoo.models import esmm
from pipelines import oracle as oracle_lib
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines.sources import SOURCES, synthetic_ads

SMALL = {"synthetic_requests": 200, "synthetic_eval_requests": 60,
         "synthetic_calibration_requests": 40, "synthetic_users": 300, "synthetic_items": 120}


@pytest.fixture(scope="module")
def world_log():
  """4,000 requests of the default world (seed 0), in memory."""
  world = synthetic_ads.AdsWorld(5000, 2000, seed=0)
  columns, truth = world.sample_log(4000, 10, seed=1)
  return world, columns, truth


def _write(path, seed=1):
  SOURCES["synthetic"].write(str(path), num_shards=2, seed=seed, **SMALL)
  return str(path)


def test_the_same_seed_gives_the_same_log_and_oracle(tmp_path):
  a, b, c = _write(tmp_path / "a"), _write(tmp_path / "b"), _write(tmp_path / "c", seed=2)
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b)) == sorted(os.listdir(c))
  assert [n for n in names if n.startswith("oracle-")] == [
      "oracle-calibration.npz", "oracle-eval.npz", "oracle-train.npz"]
  for name in names:
    assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
  first, other = (oracle_lib.Oracle.load(os.path.join(d, "oracle-train.npz")) for d in (a, c))
  assert not np.array_equal(first.columns["p_click"], other.columns["p_click"])


def test_the_oracle_joins_the_records_of_every_split(tmp_path):
  data = _write(tmp_path / "ads")
  schema = schema_lib.Schema.load(data)
  seen = set()
  for split, requests in (("train", 200), ("eval", 60), ("calibration", 40)):
    columns = reader.read_columns(f"{data}/{split}-*", schema)
    truth = oracle_lib.find(f"{data}/{split}-*")
    assert len(truth) == requests * 10 == len(columns["click"])
    rows = truth.rows_of(columns["request_id"], columns["position"])
    np.testing.assert_array_equal(truth.columns["item_id"][rows], columns["item_id"])
    c = {name: values[rows] for name, values in truth.columns.items()}
    np.testing.assert_allclose(c["p_conversion"], c["p_click"] * c["p_conversion_given_click"],
                               rtol=1e-6)
    assert np.all(c["p_click"] <= c["p_click_without_position"])
    assert np.all(columns["conversion"] <= columns["click"])
    # The oracle is the truth the labels were drawn from: rates agree within 4 sigma.
    for label, p in (("click", c["p_click"]), ("conversion", c["p_conversion"])):
      assert abs(columns[label].mean() - p.mean()) < 4 * np.sqrt(p.mean() / len(p))
    ids = set(np.unique(columns["request_id"]))
    assert not ids & seen  # splits hold different requests
    seen |= ids
  # Records the oracle does not hold are named, not joined to a wrong row.
  with pytest.raises(KeyError, match="request_id 999999, position 3"):
    truth.rows_of(np.array([999999]), np.array([3]))


def test_popularity_is_skewed(world_log):
  _, columns, _ = world_log
  items = np.sort(np.bincount(columns["item_id"], minlength=2000))[::-1]
  assert items[:200].sum() > 0.6 * items.sum()  # top 10% of items: most impressions
  requests = np.sort(np.bincount(columns["user_id"][::10], minlength=5000))[::-1]
  assert requests[:500].sum() > 0.4 * requests.sum()
  assert requests[0] < 0.05 * requests.sum()  # no single user dominates
  assert (items > 0).sum() > 1000  # and a long tail is still shown


def test_click_bait_and_sleepers_are_a_real_share(world_log):
  world, columns, truth = world_log
  item = columns["item_id"]
  shown = np.bincount(item, minlength=2000)

  def per_item(values):
    return np.bincount(item, values, minlength=2000) / np.maximum(shown, 1)

  click_rate = per_item(truth.columns["p_click_without_position"])
  conversion_rate = per_item(truth.columns["p_conversion_given_click"])
  normal = (shown > 0) & ~world.is_bait & ~world.is_sleeper
  bait, sleeper = (shown > 0) & world.is_bait, (shown > 0) & world.is_sleeper
  assert click_rate[bait].mean() > 1.5 * click_rate[normal].mean()
  assert conversion_rate[bait].mean() < 0.5 * conversion_rate[normal].mean()
  assert click_rate[sleeper].mean() < click_rate[normal].mean()
  assert conversion_rate[sleeper].mean() > 1.5 * conversion_rate[normal].mean()
  assert shown[bait].sum() > 0.1 * shown.sum() and shown[sleeper].sum() > 0.02 * shown.sum()
  # Measured without the world's flags: of the items with the top quarter of
  # click rates, a third have the bottom quarter of conversion rates (if the
  # two were independent, a quarter would).
  top_clicks = (shown > 0) & (click_rate > np.quantile(click_rate[shown > 0], 0.75))
  low_conversion = conversion_rate < np.quantile(conversion_rate[shown > 0], 0.25)
  assert (top_clicks & low_conversion).sum() > top_clicks.sum() / 3


def test_clicks_fall_with_position_for_fixed_relevance(world_log):
  _, columns, truth = world_log
  position = columns["position"]
  relevance = truth.columns["p_click_without_position"].astype(np.float64)
  ratio = truth.columns["p_click"] / relevance
  by_position = [ratio[position == k] for k in range(10)]
  assert by_position[0] == pytest.approx(1.0)
  for k in range(10):  # the position factor depends on the position only
    np.testing.assert_allclose(by_position[k], by_position[k][0], rtol=1e-5)
  assert all(a[0] > b[0] for a, b in zip(by_position, by_position[1:]))
  # Seen in the clicks too: equally relevant impressions get more clicks on top.
  bins = np.digitize(relevance, np.quantile(relevance, [0.25, 0.5, 0.75]))
  for b in range(4):
    top = (bins == b) & (position < 3)
    bottom = (bins == b) & (position >= 7)
    assert columns["click"][top].mean() > 1.3 * columns["click"][bottom].mean()


def _request_spearman(columns, values) -> float:
  """Mean over requests of the rank correlation of `values` with the slot
  order (top first), from the logged position."""
  top_first = -columns["position"].reshape(-1, 10)
  ranks = [np.argsort(np.argsort(v, axis=1), axis=1) for v in (values.reshape(-1, 10),
                                                               top_first)]
  centred = [r - r.mean(axis=1, keepdims=True) for r in ranks]
  return float(np.mean((centred[0] * centred[1]).sum(1)
                       / np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))))


def test_the_logging_policy_is_a_previous_ranker_unless_told_otherwise(world_log):
  world, columns, truth = world_log
  relevance = truth.columns["p_click_without_position"]
  item_error = world.policy_item_error[columns["item_id"]]
  # The default policy knows none of the users' taste and errs lastingly about
  # each item: the page order follows the item's error more than the true
  # relevance (measured 0.41 and 0.16).
  assert _request_spearman(columns, item_error) > 0.3
  assert 0.05 < _request_spearman(columns, relevance) < 0.25
  # The version-2 policy, an oracle with fresh noise per request, orders pages by
  # the true relevance (measured 0.48) and not by an item error; the world itself
  # (and so the truth) is the same.
  oracle_like = synthetic_ads.AdsWorld(5000, 2000, seed=0, policy_taste=1.0,
                                       policy_item_error=0.0)
  np.testing.assert_array_equal(oracle_like.item_weights, world.item_weights)
  other, other_truth = oracle_like.sample_log(4000, 10, seed=1)
  assert _request_spearman(other, other_truth.columns["p_click_without_position"]) > 0.4
  assert abs(_request_spearman(other, world.policy_item_error[other["item_id"]])) < 0.1
  with pytest.raises(ValueError, match="share of the users' taste"):
    SOURCES["synthetic"].write("unused", synthetic_policy_taste=1.5, **SMALL)


def test_a_default_run_reports_the_oracle_next_to_the_model(tmp_path):
  config = RunConfig(source_options=SMALL, max_epochs=2, batch_size=256, export_dir="",
                     output_dir=str(tmp_path), quiet=True)
  summary = runner.run(config).summary
  (data,) = os.listdir(tmp_path / "data")
  eval_files = str(tmp_path / "data" / data / "eval-*")
  columns = reader.read_columns(eval_files, schema_lib.Schema.load(os.path.dirname(eval_files)))
  truth = oracle_lib.Oracle.load(str(tmp_path / "data" / data / "oracle-eval.npz"))
  rows = truth.rows_of(columns["request_id"], columns["position"])
  clicked = columns["click"] > 0
  p_click = truth.columns["p_click"][rows]
  p_relevant = truth.columns["p_click_without_position"][rows]
  p_cvr = truth.columns["p_conversion_given_click"][rows]
  # The served (debiased) pCTR against the oracle without position; the pCTR as
  # trained, bias tower included, against the oracle at the logged positions.
  expected = {"ctr": (columns["click"], p_relevant, summary["eval"]["ctr"]),
              "ctr at logged positions": (columns["click"], p_click,
                                          summary["eval_at_logged_positions"]["ctr"]),
              "cvr": (columns["conversion"][clicked], p_cvr[clicked], summary["eval"]["cvr"])}
  report = summary["oracle"]
  assert list(report) == ["ctr", "ctr at logged positions", "cvr"]
  for row, (labels, probabilities, model) in expected.items():
    entry = report[row]
    assert entry["oracle_auc"] == pytest.approx(metrics.auc(labels, probabilities), abs=1e-9)
    assert entry["oracle_logloss"] == pytest.approx(metrics.log_loss(labels, probabilities),
                                                    abs=1e-6)
    assert entry["oracle_auc"] > 0.6
    assert entry["examples"] == model["examples"] == len(labels)
    assert entry["model_auc"] == model["auc"]
    assert entry["auc_gap"] == pytest.approx(entry["oracle_auc"] - entry["model_auc"])
  # Knowing the slot is worth AUC on logged clicks, to the oracle as to the model.
  assert report["ctr at logged positions"]["oracle_auc"] > report["ctr"]["oracle_auc"]
  assert report["ctr"]["oracle"] == "P(click) without position"
  assert report["cvr"]["oracle"] == "P(conversion | click)"
  printed = oracle_report.format_table(report)
  assert "| cvr | P(conversion \\| click) |" in printed
  assert "| ctr at logged positions | P(click) |" in printed


def test_the_oracle_scores_every_strategys_tasks(tmp_path):
  data = _write(tmp_path / "ads")
  schema = schema_lib.Schema.load(data)
  columns = reader.read_columns(f"{data}/eval-*", schema)
  truth = oracle_lib.find(f"{data}/eval-*")
  p = {name: values[truth.rows_of(columns["request_id"], columns["position"])]
       for name, values in truth.columns.items()}
  any_event = columns["click"] > 0  # a conversion needs a click
  cases = [  # (schema, task, what the oracle predicts, its AUC)
      (esmm.entire_space_schema(schema), "ctr_cvr", "P(conversion)",
       metrics.auc(columns["conversion"], p["p_conversion"])),
      (strategies.sample_weighting_schema(schema, {"click": 0.2, "conversion": 1.0}),
       "engagement", "P(click)", metrics.auc(any_event, p["p_click"])),
      (strategies.learning_to_rank_schema(schema, {"click": 1.0, "conversion": 2.0}),
       "relevance", "P(click)", metrics.auc(any_event, p["p_click"])),
  ]
  for task_schema, task, what, auc in cases:
    report = oracle_report.compare(task_schema, f"{data}/eval-*", {})
    assert report[task]["oracle"] == what
    assert report[task]["oracle_auc"] == pytest.approx(auc, abs=1e-9)
    assert report[task]["model_auc"] is None and report[task]["auc_gap"] is None
  assert "oracle_logloss" not in report["relevance"]  # ranking scores are not probabilities
  price = schema_lib.Schema(schema.features, schema.labels + ["price_paid"],
                            [schema_lib.Task("spend", "price_paid", schema_lib.REGRESSION)],
                            schema.request_id, schema.name)
  assert "regression" in truth.task_probabilities(price.tasks[0])
  # Without the position: only the first event (the click) changes.
  entire = esmm.entire_space_schema(schema)
  free = {t.name: truth.task_probabilities(t, without_position=True) for t in entire.tasks}
  c = truth.columns
  np.testing.assert_array_equal(free["ctr"], c["p_click_without_position"])
  np.testing.assert_array_equal(free["cvr"], c["p_conversion_given_click"])
  np.testing.assert_allclose(free["ctr_cvr"], c["p_click_without_position"]
                             * c["p_conversion_given_click"], rtol=1e-5)
  # A tower-shaped task's report compares the served model with the oracle
  # without position, and adds its row as trained at the logged positions.
  report = oracle_report.compare(schema, f"{data}/eval-*", {"ctr": {"auc": 0.6}},
                                 at_logged_positions={"ctr": {"auc": 0.7}})
  assert list(report) == ["ctr", "ctr at logged positions", "cvr"]
  assert report["ctr"]["oracle_auc"] == pytest.approx(metrics.auc(
      columns["click"], p["p_click_without_position"]), abs=1e-9)
  assert report["ctr at logged positions"]["auc_gap"] == pytest.approx(
      metrics.auc(columns["click"], p["p_click"]) - 0.7)
  (tmp_path / "ads" / "oracle-eval.npz").write_bytes(b"damaged")
  assert "oracle-eval.npz is not a readable oracle" in oracle_report.compare(
      schema, f"{data}/eval-*", {})["cvr"]["skipped"]  # the run goes on without it
  os.remove(tmp_path / "ads" / "oracle-eval.npz")
  assert oracle_report.compare(schema, f"{data}/eval-*", {}) == {}  # no oracle, no report
