"""Issue 15's measurements: the search against hand-chosen and default settings.

  python scripts/tune_experiments.py --experiment=census --search   # search, then compare
  python scripts/tune_experiments.py --experiment=ads --search
  python scripts/tune_experiments.py --experiment=census            # compare an existing study

census: MMoE on census Group 1 (scripts/census_mmoe.py's data), searched on the
validation half (`python -m mtl_zoo.tune`, --trials, 12 epochs at most); the
best trial's flagfile is then retrained with seeds 1 and 2 (seed 0 is the
trial's own model) and each model's test AUC is printed beside the hand-chosen
settings of scripts/census_mmoe.py. The test half is read only here, after the
search.

ads: the realistic ads log (the train CLI's default data), multi-objective on
ctr:auc and cvr:auc; every Pareto-front member and a run with the default flags
are scored on the eval split (what the search selected on) and on the
calibration split, which neither training nor the search reads. Writes
results/tune_<experiment>.md/.json (and for ads, the front beside the default
run as results/tune_ads_front.png).
"""

import json
import os
import subprocess
import sys

import optuna
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_zoo import metrics  # noqa: E402  (pins Keras 2 first)
from mtl_zoo._keras import keras  # noqa: E402
from pipelines import files  # noqa: E402
from pipelines import reader  # noqa: E402
from pipelines import schema as schema_lib  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "census", ["census", "ads"], "Which measurement.")
flags.DEFINE_bool("search", False, "Run (or resume) the search first; without it, compare "
                  "the study already in --study_dir.")
flags.DEFINE_integer("trials", None, "Search budget (default: census 30, ads 24).")
flags.DEFINE_string("study_dir", None, "The study's directory (default: "
                    "mtl_zoo_output/tune/<experiment>_mmoe).")
flags.DEFINE_string("census_dir", os.path.join(REPO, "..", "shared", "data", "census-income"),
                    "Folder with census-income.data.gz and census-income.test.gz.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds the best trial (census), the front "
                  "members and the default flags (ads) are trained with; 0 is the trial.")

CENSUS_DATA = os.path.join("mtl_zoo_output", "data", "census_group1")
# scripts/census_mmoe.py, Group 1, seeds 0-2 (results/census_mmoe_group1.txt): test AUC.
HAND_CHOSEN = {"settings": "--learning_rate=0.004 --batch_size=2048 --num_experts=8 "
                           "--expert_units=16 --tower_units=8, 12 epochs",
               "test_auc": {"income": [0.9462, 0.9458, 0.9467],
                            "marital": [0.9946, 0.9945, 0.9946]}}


def run(command):
  print("$ " + " ".join(command), flush=True)
  subprocess.run(command, cwd=REPO, check=True)


def evaluate(model_dir, pattern):
  """Task -> {auc, logloss} of the model saved in `model_dir` on `pattern`."""
  model = keras.models.load_model(os.path.join(model_dir, "model.keras"))
  schema = schema_lib.Schema.load(os.path.join(model_dir, schema_lib.SCHEMA_FILENAME))
  results = metrics.evaluate(model, schema, reader.make_dataset(pattern, schema, 8192,
                                                                shuffle=False),
                             metrics.predict_function(model))
  keras.backend.clear_session()
  return {t: {m: r[m] for m in ("auc", "logloss")} for t, r in results.items()}


# The recorded searches and runs (results/tune_*.md) trained at constant learning
# rates, the default before the fifth session's decay (BUILD_NOTES "Learning rate").
CONSTANT_RATE = ["--learning_rate_decay_steps=0"]


def trials_of(study_dir):
  return json.load(open(os.path.join(study_dir, "trials.json")))


def census(study_dir):
  SOURCES["census"].write_if_missing(CENSUS_DATA, census_dir=FLAGS.census_dir,
                                     census_group=1)
  if FLAGS.search:
    run([sys.executable, "-m", "mtl_zoo.tune", "--model=mmoe", *CONSTANT_RATE,
         f"--train_files={CENSUS_DATA}/train-*", f"--eval_files={CENSUS_DATA}/validation-*",
         "--max_epochs=12", f"--trials={FLAGS.trials or 30}",
         "--space=results/tune_census_space.json", f"--output_dir={study_dir}"])
  summary = trials_of(study_dir)
  done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
  best = max(done, key=lambda t: t["values"]["auc"])
  test = f"{CENSUS_DATA}/test-*"
  tuned = {}
  for seed in (int(s) for s in FLAGS.seeds):
    model_dir = best["model_dir"] if seed == 0 else os.path.join(
        study_dir, "seeds", f"trial-{best['number']:04d}-seed{seed}")
    if seed:
      run([sys.executable, "-m", "mtl_zoo.train", f"--flagfile={best['flagfile']}", *CONSTANT_RATE,
           f"--seed={seed}", f"--model_dir={model_dir}", "--export_dir="])
    tuned[seed] = {"validation": evaluate(model_dir, f"{CENSUS_DATA}/validation-*"),
                   "test": evaluate(model_dir, test)}
    print(f"seed {seed}: " + json.dumps(tuned[seed]), flush=True)
  lines = [f"MMoE on census Group 1: {len(done)} complete trials of "
           f"{sum(t['finished'] for t in summary['trials'])} finished "
           f"({sum(t['state'] == 'PRUNED' for t in summary['trials'])} pruned); best trial "
           f"{best['number']} (validation mean AUC {best['values']['auc']:.4f}): "
           + " ".join(best["flags"]), "",
           "| task | settings | test AUC per seed (0, 1, 2) | mean |", "|---|---|---|---|"]
  for task in ("income", "marital"):
    hand = HAND_CHOSEN["test_auc"][task]
    found = [tuned[s]["test"][task]["auc"] for s in sorted(tuned)]
    lines.append(f"| {task} | hand-chosen | {', '.join(f'{v:.4f}' for v in hand)} | "
                 f"{sum(hand) / len(hand):.4f} |")
    lines.append(f"| {task} | tuned (trial {best['number']}) | "
                 f"{', '.join(f'{v:.4f}' for v in found)} | {sum(found) / len(found):.4f} |")
  report(lines, {"best_trial": best, "tuned": tuned, "hand_chosen": HAND_CHOSEN}, "census")


def ads(study_dir):
  if FLAGS.search:
    run([sys.executable, "-m", "mtl_zoo.tune", "--objectives=ctr:auc,cvr:auc", *CONSTANT_RATE,
         f"--trials={FLAGS.trials or 24}", "--space=results/tune_ads_space.json",
         f"--output_dir={study_dir}"])
  summary = trials_of(study_dir)
  data = next(d for d in sorted(os.listdir(os.path.join(study_dir, "data")))
              if d.startswith("synthetic"))
  data_dir = os.path.join(study_dir, "data", data)
  splits = {"eval": f"{data_dir}/eval-*", "held-out": f"{data_dir}/calibration-*"}
  study = optuna.load_study(study_name="mtl_zoo", storage="sqlite:///" + os.path.abspath(
      os.path.join(study_dir, "study.db")))
  front = sorted(t.number for t in study.best_trials)
  # name -> (flags of a retraining, the seed-0 model: the trial's own, or a default run)
  runs = {"default flags": ([f"--output_dir={study_dir}"],
                            os.path.join(study_dir, "default_flags", "seed0"))}
  for t in summary["trials"]:
    if t["number"] in front:
      runs[f"trial {t['number']}"] = ([f"--flagfile={t['flagfile']}"], t["model_dir"])
  rows = {}
  for name, (train_flags, seed0_dir) in runs.items():
    rows[name] = {}
    for seed in (int(s) for s in FLAGS.seeds):
      model_dir = seed0_dir if seed == 0 else os.path.join(
          study_dir, "seeds", name.replace(" ", "_") + f"-seed{seed}")
      if not os.path.exists(os.path.join(model_dir, "metrics.json")):
        # The built-in data are drawn from --seed: other seeds train on seed 0's files.
        data_flags = [f"--train_files={data_dir}/train-*", f"--eval_files={data_dir}/eval-*"]
        run([sys.executable, "-m", "mtl_zoo.train", *train_flags, *CONSTANT_RATE,
             *(data_flags if seed else []), f"--seed={seed}", f"--model_dir={model_dir}",
             "--export_dir="])
      rows[name][seed] = {s: evaluate(model_dir, p) for s, p in splits.items()}
  seeds = ", ".join(FLAGS.seeds)
  lines = [f"Ads log ({os.path.basename(data_dir)}), MMoE, objectives ctr:auc and cvr:auc: "
           f"{sum(t['state'] == 'COMPLETE' for t in summary['trials'])} complete trials, "
           f"{len(front)} on the Pareto front (validation = the eval split). AUC, mean "
           f"(min-max) over seeds {seeds}; seed 0 is the trial itself.", "",
           "| run | ctr AUC eval | cvr AUC eval | ctr AUC held-out | cvr AUC held-out | "
           "settings |", "|---|---|---|---|---|---|"]
  flags_of = {f"trial {t['number']}": " ".join(t["flags"]) for t in summary["trials"]}
  for name, per_seed in rows.items():
    cells = []
    for split in ("eval", "held-out"):
      for task in ("ctr", "cvr"):
        values = [per_seed[s][split][task]["auc"] for s in per_seed]
        cells.append(f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})")
    lines.append(f"| {name} | " + " | ".join(cells)
                 + f" | {flags_of.get(name, 'python -m mtl_zoo.train (defaults)')} |")
  plot_front(summary, front, rows["default flags"][0]["eval"])
  report(lines, {"rows": rows, "front": front}, "ads")


def plot_front(summary, front, default):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(6, 4.5))
  FigureCanvasAgg(figure)
  axis = figure.subplots()
  done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
  axis.plot([t["values"]["ctr:auc"] for t in done], [t["values"]["cvr:auc"] for t in done],
            "o", color="0.7", label="trial")
  members = sorted((t for t in done if t["number"] in front),
                   key=lambda t: t["values"]["ctr:auc"])
  axis.plot([t["values"]["ctr:auc"] for t in members],
            [t["values"]["cvr:auc"] for t in members], "o-", color="tab:red",
            label="Pareto front")
  axis.plot([default["ctr"]["auc"]], [default["cvr"]["auc"]], "*", markersize=12,
            color="tab:blue", label="default flags")
  axis.set(xlabel="ctr AUC (eval)", ylabel="cvr AUC (eval)",
           title="Ads log: search front vs default flags")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  with files.atomic_open(os.path.join(REPO, "results", "tune_ads_front.png"), "wb") as f:
    figure.savefig(f, format="png", dpi=110)


def report(lines, data, name):
  text = "\n".join(lines)
  print("\n" + text)
  files.write_text(os.path.join(REPO, "results", f"tune_{name}.md"), text + "\n")
  files.write_json(os.path.join(REPO, "results", f"tune_{name}.json"), data)


def main(argv):
  del argv
  study_dir = FLAGS.study_dir or os.path.join("mtl_zoo_output", "tune",
                                              f"{FLAGS.experiment}_mmoe")
  census(study_dir) if FLAGS.experiment == "census" else ads(study_dir)


if __name__ == "__main__":
  app.run(main)
