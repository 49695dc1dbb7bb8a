"""MMoE on the built-in synthetic ads log with and without the position bias tower.

  python scripts/position_bias.py [--seeds=0,1] [--epochs=4] [--policy_taste=1]
      [--policy_item_error=0] [--learning_rate=2e-3 --learning_rate_decay_steps=0]

(Before the generator's version 3 the defaults were `--policy_taste=1
--policy_item_error=0`, the version-2 log's policy, and `--learning_rate=2e-3
--learning_rate_decay_steps=0`: the recorded tables give the flags of each row.)

Variants, all trained with the same settings on the same log:

  bias tower             position train-only: it feeds the bias tower in
                         training; the served model never sees it
  no position            position train-only but biasing no task (bias_labels
                         ["conversion"]: only the masked cvr learns conversions),
                         so nothing uses it
  position feature       position an ordinary input, scored at the logged
                         position (what eval reported before issue 13; a
                         server does not know it)
  position feature @0    the same model scored as a server would have to, with
                         every candidate at position 0

Each row: pCTR's AUC and per-request GAUC on the eval clicks, the ranking
score's (pCTR x pCVR) NDCG@10 by conversion and, what debiasing is for, how
well pCTR orders the eval impressions by their true relevance (the oracle's
P(click) without the position effect): Spearman's correlation over all
impressions and its mean within requests. Means over the seeds; a markdown table.
"""

import dataclasses
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import config as config_lib  # noqa: E402  (Keras 2 first)
from mtl_zoo import metrics, runner, strategies  # noqa: E402
from pipelines import oracle  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines.sources import SOURCES, synthetic_ads  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (the log is fixed: seed 0).")
flags.DEFINE_integer("epochs", 4, "Epochs per model.")
flags.DEFINE_integer("synthetic_requests", 12_000, "Training requests of the log.")
flags.DEFINE_float("policy_taste", synthetic_ads.POLICY_TASTE, "The log's "
                   "--synthetic_policy_taste: the share of each user's taste the logging "
                   "policy knows (1: all, as an oracle).")
flags.DEFINE_float("policy_item_error", synthetic_ads.POLICY_ITEM_ERROR, "The log's "
                   "--synthetic_policy_item_error: the logging policy's lasting error per "
                   "item (0: fresh in every request).")
flags.DEFINE_float("learning_rate", config_lib.RunConfig.learning_rate,
                   "Adam's learning rate (default: the train CLI's).")
flags.DEFINE_integer("learning_rate_decay_steps", config_lib.RunConfig.learning_rate_decay_steps,
                     "Inverse-time decay of the learning rate (0: constant; default: the "
                     "train CLI's).")

HPARAMS = {"num_experts": 8, "expert_units": [16], "tower_units": [8]}


def _with_position(schema: schema_lib.Schema, **changes) -> schema_lib.Schema:
  return schema.replace(features=[dataclasses.replace(f, **changes) if f.name == "position"
                                  else f for f in schema.features])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  ranks = [np.argsort(np.argsort(x, kind="mergesort")) for x in (a, b)]
  return float(np.corrcoef(*ranks)[0, 1])


def _rated(model, schema: schema_lib.Schema, columns: dict, relevance: np.ndarray) -> dict:
  outputs = metrics.predict_columns(model, schema, columns)
  score = strategies.ranking_score(outputs, columns, strategies.default_fusion(schema),
                                   schema)
  report = strategies.objective_report(score, columns, schema)
  within = [_spearman(outputs["ctr"][rows], relevance[rows])
            for rows in np.split(np.argsort(columns["request_id"], kind="mergesort"),
                                 np.flatnonzero(np.diff(np.sort(columns["request_id"]))) + 1)]
  return {"ctr_auc": metrics.auc(columns["click"], outputs["ctr"]),
          "ctr_gauc": metrics.gauc(columns["click"], outputs["ctr"], columns["request_id"]),
          "ndcg@10": report["ndcg@10"],
          "relevance_spearman": _spearman(outputs["ctr"], relevance),
          "relevance_spearman_in_request": float(np.nanmean(within))}


def main(argv):
  del argv
  source = SOURCES["synthetic"]
  options = {"synthetic_requests": FLAGS.synthetic_requests,
             "synthetic_policy_taste": FLAGS.policy_taste,
             "synthetic_policy_item_error": FLAGS.policy_item_error}
  defaults = {o.name: o.default for o in source.options}
  data = os.path.join("mtl_zoo_output", "data", f"synthetic-v{source.version}" + "".join(
      f"-{name}={value}" for name, value in options.items() if value != defaults[name])
      + "-seed0")
  source.write_if_missing(data, seed=0, **options)
  logged = schema_lib.Schema.load(data)
  columns = reader.read_columns(os.path.join(data, "eval-*"), logged)
  truth = oracle.find(os.path.join(data, "eval-*"))
  relevance = truth.columns["p_click_without_position"][
      truth.rows_of(columns["request_id"], columns["position"])]
  at_zero = {**columns, "position": np.zeros_like(columns["position"])}
  schemas = {"bias tower": _with_position(logged, train_only=True, bias_labels=None),
             "no position": _with_position(logged, train_only=True,
                                           bias_labels=["conversion"]),
             "position feature": _with_position(logged, train_only=False, bias_labels=None)}
  rows = {}
  for seed in map(int, FLAGS.seeds):
    for name, schema in schemas.items():
      with tempfile.TemporaryDirectory() as tmp:
        result = runner.run(config_lib.RunConfig(
            train_files=os.path.join(data, "train-*"), schema=schema, model="mmoe",
            hyperparameters=HPARAMS, max_epochs=FLAGS.epochs, batch_size=1024,
            learning_rate=FLAGS.learning_rate,
            learning_rate_decay_steps=FLAGS.learning_rate_decay_steps, seed=seed, model_dir=tmp,
            export_dir="", quiet=True))
      rows.setdefault(name, []).append(_rated(result.model, schema, columns, relevance))
      if name == "position feature":
        rows.setdefault("position feature @0", []).append(
            _rated(result.model, schema, at_zero, relevance))
      print(f"seed {seed} {name}: {rows[name][-1]}", flush=True)
  keys = ["ctr_auc", "ctr_gauc", "ndcg@10", "relevance_spearman",
          "relevance_spearman_in_request"]
  print(f"\nMMoE, synthetic ads log ({options}), {FLAGS.epochs} epochs, learning rate "
        f"{FLAGS.learning_rate} (decay steps {FLAGS.learning_rate_decay_steps}), seeds "
        f"{FLAGS.seeds}; means over seeds\n")
  print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
  for name, values in rows.items():
    print(f"| {name} | " + " | ".join(f"{np.mean([v[k] for v in values]):.4f}"
                                      for k in keys) + " |")
  for key in ("relevance_spearman", "relevance_spearman_in_request"):
    paired = [t[key] - n[key] for t, n in zip(rows["bias tower"], rows["no position"])]
    spread = np.std(paired, ddof=1) if len(paired) > 1 else 0.0
    print(f"\nbias tower - no position, {key}, per seed: "
          + " ".join(f"{d:+.4f}" for d in paired)
          + f"; mean {np.mean(paired):+.4f} (sd {spread:.4f})")


if __name__ == "__main__":
  app.run(main)
