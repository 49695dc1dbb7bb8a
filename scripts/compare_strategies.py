"""The four ranking strategies side by side on the same data.

  python scripts/compare_strategies.py                  # built-in synthetic ads log
  python scripts/compare_strategies.py --data_dir=DIR   # any converted dataset whose
                                                        # schema has a click -> conversion
                                                        # funnel and request ids

Strategies (every model trained with the same settings: the training CLI's
defaults for --bottom_units, --tower_units, --num_experts, --expert_units; the
same epochs, batch and learning rate; no per-strategy tuning):

  fusion            one single_task model per objective, ranked by pCTR x pCVR
  sample weighting  one single_task model of "any event", weighted by the deepest
                    event (weights from the data's event counts)
  LTR listwise/pairwise  one single_task ranking model, grades click 1 < conversion 2
  MMoE              one model, ranked by pCTR x pCVR of its two heads
  ESMM              one model, ranked by pCTR x pCVR (its pCTCVR output)

Each strategy's ranking score is rated against every objective on the eval
split (`mtl_zoo.strategies.objective_report`), and where the schema names the
item and its category (the synthetic log does), beyond accuracy: catalog
coverage, category diversity and novelty of each request's top --beyond_k (3:
the log's requests hold 10 impressions, so their top 10 is every score's
same set). For the strategies with a CTR and
a CVR output, the fusion weight w of pCTR x pCVR^w is swept to draw their
CTR-vs-CVR trade-off curves. Writes results/strategies_<data>.md/.json/.png.
"""

import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import config as config_lib  # noqa: E402  (Keras 2 first)
from mtl_zoo import experiments, metrics, models, runner, strategies  # noqa: E402
from pipelines import files  # noqa: E402
from pipelines import reader, targets  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Converted data with train-* and eval-* shards and "
                    "schema.json. Default: the synthetic ads log (--synthetic_requests), "
                    "written under mtl_zoo_output/data/ on first use.")
flags.DEFINE_integer("synthetic_requests", 12_000, "Training requests of the synthetic log.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (the data is fixed).")
flags.DEFINE_integer("epochs", 3, "Epochs per model.")
flags.DEFINE_integer("batch_size", 2048, "Examples per step (LTR: whole requests).")
flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
flags.DEFINE_string("out_dir", "results", "Where the table, JSON and plot go.")
flags.DEFINE_integer("beyond_k", 3, "List length of catalog coverage, category diversity and "
                     "novelty: each request's top k. Below the impressions per request (10 "
                     "in the synthetic log), or every score shows the same items.")

HPARAMS = {"bottom_units": [128], "tower_units": [8], "num_experts": 8, "expert_units": [16]}
# name: (strategy, architecture, options)
STRATEGY_RUNS = {
    "fusion (2 single-task)": ("fusion", "single_task", {}),
    "sample weighting": ("sample_weighting", "single_task", {}),
    "LTR listwise": ("learning_to_rank", "single_task", {"ranking_loss": "listwise"}),
    "LTR pairwise": ("learning_to_rank", "single_task", {"ranking_loss": "pairwise"}),
    "MMoE": ("multi_task", "mmoe", {}),
    "ESMM": ("multi_task", "esmm", {}),
}
CURVE_WEIGHTS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
COLUMNS = [("ctr_auc", "CTR AUC"), ("cvr_auc", "CVR AUC (clicked)"),
           ("cvr_entire_auc", "CTCVR AUC"), ("gauc", "GAUC (click)"),
           ("ndcg@10", "NDCG@10 (conversion)"), ("coverage@{k}", "catalog coverage@{k}"),
           ("diversity@{k}", "category diversity@{k}"), ("novelty@{k}", "novelty@{k} (bits)"),
           ("train_seconds", "train s"), ("parameters", "parameters")]


def run(strategy: str, architecture: str, options: dict, schema: schema_lib.Schema,
        data_dir: str, columns: dict, event_weights: dict, seed: int,
        popularity: Optional[np.ndarray]) -> dict:
  """One strategy trained by the training runner (as the train CLI would), then
  its ranking score rated against every objective (beyond accuracy too, where
  the schema names the item: `popularity` gives novelty)."""
  with tempfile.TemporaryDirectory(prefix="mtl_zoo-strategy-") as output_dir:
    result = runner.run(config_lib.RunConfig(
        strategy=strategy, model=architecture, train_files=os.path.join(data_dir, "train-*"),
        schema=schema, output_dir=output_dir, export_dir="", max_epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
        learning_rate_decay_steps=0,  # a constant rate, as recorded in results/
        hyperparameters=models.hyperparameters_of(architecture, HPARAMS), seed=seed,
        event_weights=(",".join(f"{k}={v}" for k, v in event_weights.items())
                       if strategy == "sample_weighting" else None),
        list_size=10 if strategy == "learning_to_rank" else None, quiet=True, **options))
  outputs = metrics.predict_columns(result.model, result.schema, columns)
  seconds, parameters = result.summary["train_seconds"], result.model.count_params()
  fusion = (strategies.default_fusion(schema) if strategy in ("fusion", "multi_task")
            else None)
  score = strategies.ranking_score(outputs, columns, fusion, schema)
  result = strategies.objective_report(score, columns, schema, item_popularity=popularity,
                                       beyond_k=FLAGS.beyond_k)
  result.update(train_seconds=seconds, parameters=parameters)
  first, second = [t.name for t in strategies.funnel(schema)][:2]
  if first in outputs and second in outputs:
    result["curve"] = []
    for w in CURVE_WEIGHTS:
      fused = strategies.ranking_score(outputs, columns, {
          "mode": "product", "terms": [first, second], "weights": [1.0, w]}, schema)
      report = strategies.objective_report(fused, columns, schema)
      result["curve"].append({"weight": w, "ctr_auc": report[f"{first}_auc"],
                              "cvr_auc": report[f"{second}_auc"]})
  return result


def _columns(row: dict) -> list:
  """The COLUMNS, with --beyond_k, that a result row has (beyond-accuracy ones
  need the schema's item_id)."""
  columns = [(key.format(k=FLAGS.beyond_k), label.format(k=FLAGS.beyond_k))
             for key, label in COLUMNS]
  return [(key, label) for key, label in columns if key in row]


def summarize(runs: dict) -> dict:
  table = {}
  for name, results in runs.items():
    table[name] = {key: experiments.mean_interval([r[key] for r in results])
                   for key, _ in _columns(results[0])}
    if "curve" in results[0]:
      table[name]["curve"] = [
          {"weight": point["weight"],
           **{k: float(np.mean([r["curve"][i][k] for r in results]))
              for k in ("ctr_auc", "cvr_auc")}}
          for i, point in enumerate(results[0]["curve"])]
  return table


def markdown(table: dict, header: str) -> str:
  columns = _columns(next(iter(table.values())))
  lines = [header, "", "| strategy | " + " | ".join(label for _, label in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for name, row in table.items():
    cells = []
    for key, _ in columns:
      stat = row[key]
      if key == "parameters":
        cells.append(f"{stat['mean']:,.0f}")
      elif key == "train_seconds":
        cells.append(f"{stat['mean']:.1f}")
      else:
        cells.append(f"{stat['mean']:.4f} ± {stat['ci95']:.4f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(table: dict, path: str, title: str) -> None:
  import matplotlib  # plotting only: an optional dependency of the scripts
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  for i, (name, row) in enumerate(table.items()):
    color = f"C{i}"
    if "curve" in row:
      xs = [p["ctr_auc"] for p in row["curve"]]
      ys = [p["cvr_auc"] for p in row["curve"]]
      ax.plot(xs, ys, "--", color=color, alpha=0.6)
      for p in row["curve"]:
        ax.annotate(f"w={p['weight']:g}", (p["ctr_auc"], p["cvr_auc"]), fontsize=6,
                    color=color, alpha=0.8)
    ax.errorbar(row["ctr_auc"]["mean"], row["cvr_auc"]["mean"],
                xerr=row["ctr_auc"]["ci95"], yerr=row["cvr_auc"]["ci95"], fmt="o",
                color=color, label=name, capsize=3)
  ax.set_xlabel("CTR AUC of the ranking score (all impressions)")
  ax.set_ylabel("CVR AUC of the ranking score (clicked impressions)")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with files.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)


def main(argv):
  del argv
  if FLAGS.data_dir:
    data_dir, data_name = FLAGS.data_dir, os.path.basename(os.path.normpath(FLAGS.data_dir))
  else:
    data_name = "synthetic"
    changed = ("" if FLAGS.synthetic_requests == 12_000
               else f"-synthetic_requests={FLAGS.synthetic_requests}")
    data_dir = os.path.join(REPO, "mtl_zoo_output", "data",  # where the train CLI puts it
                            f"synthetic-v{SOURCES['synthetic'].version}{changed}-seed0")
    if not os.path.exists(os.path.join(data_dir, schema_lib.SCHEMA_FILENAME)):
      SOURCES["synthetic"].write(data_dir, synthetic_requests=FLAGS.synthetic_requests)
  data_label = os.path.basename(os.path.normpath(data_dir))
  schema = schema_lib.Schema.load(data_dir)
  columns = reader.read_columns(os.path.join(data_dir, "eval-*"), schema)
  event_weights = targets.event_weights_from_counts(targets.count_events(
      os.path.join(data_dir, "train-*"), schema, [t.label for t in strategies.funnel(schema)]))
  popularity = (metrics.popularity(reader.count_ids(os.path.join(data_dir, "train-*"), schema,
                                                    schema.item_id))
                if schema.item_id else None)
  start = time.perf_counter()
  runs = {}
  for name, (strategy, architecture, options) in STRATEGY_RUNS.items():
    runs[name] = []
    for seed in FLAGS.seeds:
      result = run(strategy, architecture, options, schema, data_dir, columns,
                   event_weights, int(seed), popularity)
      runs[name].append(result)
      print(f"{name} seed {seed}: " + ", ".join(
          f"{k} {result[k]:.4f}" for k, _ in COLUMNS[:5]), flush=True)
  minutes = (time.perf_counter() - start) / 60
  table = summarize(runs)
  header = (f"Ranking strategies on {data_label} ({len(columns[schema.labels[0]]):,} eval "
            f"impressions); mean ± 95% CI over seeds {','.join(FLAGS.seeds)}; "
            f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, lr {FLAGS.learning_rate}; "
            f"event weights {', '.join(f'{k}={v:.3f}' for k, v in event_weights.items())}; "
            f"coverage, diversity and novelty of each request's top {FLAGS.beyond_k}; "
            f"whole comparison {minutes:.1f} min.")
  text = markdown(table, header)
  print("\n" + text)
  stem = os.path.join(FLAGS.out_dir, f"strategies_{data_name}")
  files.write_text(stem + ".md", text)
  settings = {"seeds": FLAGS.seeds, "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size,
              "learning_rate": FLAGS.learning_rate, "hparams": HPARAMS,
              "beyond_k": FLAGS.beyond_k, "event_weights": event_weights, "data": data_label}
  files.write_json(stem + ".json", {"settings": settings, "table": table, "runs": runs})
  plot(table, stem + ".png", f"Ranking strategies on {data_label}: CTR vs CVR AUC of each "
       "ranking score\n(dashed: pCTR x pCVR^w for w in " +
       ", ".join(f"{w:g}" for w in CURVE_WEIGHTS) + ")")
  print(f"Wrote {stem}.md, .json, .png")


if __name__ == "__main__":
  app.run(main)
