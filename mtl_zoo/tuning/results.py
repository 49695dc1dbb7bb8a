"""What a search leaves in its output directory, and the tables it prints.

  trials.json             every trial: state, values, flags, eval metrics, epochs;
                          the best trial or the Pareto front ("front")
  flags/trial-NNNN.flags  each finished trial, for `python -m mtl_zoo.train --flagfile=`
  best.flags              single objective: the best trial's
  pareto_front.md         multi-objective: the front (the trials no other beats on
                          every objective), also printed
  history.png             each objective per trial (pruned trials at their last epoch)
  pareto_front.png        multi-objective: the first two objectives, the front joined
"""

import io
from typing import Dict, List, Sequence

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from mtl_zoo import balancers
from mtl_zoo.tuning import study as study_lib
from pipelines import files


def trial_flags(trial: optuna.trial.FrozenTrial, base_flags: Sequence[str],
                output_dir: str) -> List[str]:
  """The train flags that reproduce `trial`: the base flags, those the trial
  set instead, and a model_dir of its own beside the study's.

  Args:
    trial: a finished trial (its flags are in its user attributes).
    base_flags: the train flags the search was started with.
    output_dir: the study's output directory.

  Returns:
    The flags, one per line of a flagfile.
  """
  own = trial.user_attrs.get("flags", [])
  names = {f.split("=", 1)[0] for f in own} | {"--model_dir"}
  balancer = next((f.split("=", 1)[1] for f in own if f.startswith("--loss_weighting=")),
                  None)
  kept = [f for f in base_flags if f.split("=", 1)[0] not in names
          and not (balancer and _other_balancer_option(f, balancer))]
  model_dir = files.join(output_dir, "retrained", f"trial-{trial.number:04d}")
  return [*kept, *own, f"--model_dir={model_dir}"]


def _other_balancer_option(flag: str, balancer: str) -> bool:
  owner = balancers.option_owners().get(flag.split("=", 1)[0].lstrip("-"))
  return owner is not None and owner != balancer


def summarise(study: optuna.Study, objectives: Sequence[study_lib.Objective],
              output_dir: str) -> List[dict]:
  """Every trial as a JSON-able dict, in number order."""
  rows = []
  trials = study.get_trials(deepcopy=False)
  retried = {t.user_attrs.get("retry_of") for t in trials}
  for t in trials:
    why = next((k for k in ("error", "interrupted", "withdrawn") if k in t.user_attrs), None)
    if t.state == TrialState.FAIL and not why and t.number in retried:
      why = "interrupted"  # failed by another process's heartbeat check
    row = {"number": t.number, "state": t.state.name,
           "finished": study_lib.counts_as_finished(t),
           "values": (dict(zip([o.name for o in objectives], t.values))
                      if t.state == TrialState.COMPLETE else None),
           "flags": t.user_attrs.get("flags"),
           "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())},
           "eval": t.user_attrs.get("eval"),
           "best_epoch": t.user_attrs.get("best_epoch"),
           "epochs_trained": t.user_attrs.get("epochs_trained"),
           "train_seconds": t.user_attrs.get("train_seconds"),
           "model_dir": t.user_attrs.get("model_dir"),
           "retry_of": t.user_attrs.get("retry_of"),
           "failed_because": why and (t.user_attrs[why] if why == "error" else why),
           "flagfile": (files.join(output_dir, "flags", f"trial-{t.number:04d}.flags")
                        if t.state == TrialState.COMPLETE else None)}
    rows.append(row)
  return rows


def front(study: optuna.Study) -> List[optuna.trial.FrozenTrial]:
  """The best trial (single objective) or the Pareto front, by trial number.

  Args:
    study: the study.

  Returns:
    The trials, empty while none has completed.
  """
  if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
    return []
  best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
  return sorted(best, key=lambda t: t.number)


def write(study: optuna.Study, objectives: Sequence[study_lib.Objective],
          base_flags: Sequence[str], output_dir: str, plots: bool = True) -> Dict[str, str]:
  """Writes trials.json, the flagfiles, best.flags or pareto_front.md and the plots.

  Args:
    study: the study.
    objectives: its objectives, in order.
    base_flags: the train flags every trial started from.
    output_dir: the study's directory.
    plots: also draw history.png and pareto_front.png.

  Returns:
    Name -> path of what was written.
  """
  rows = summarise(study, objectives, output_dir)
  written = {"trials": files.join(output_dir, "trials.json")}
  files.write_json(written["trials"], {"objectives": [o.name for o in objectives],
                                       "directions": [o.direction for o in objectives],
                                       "front": [t.number for t in front(study)],
                                       "trials": rows})
  flagfiles = {}
  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
    header = f"# Trial {t.number} of study {study.study_name!r}: " + ", ".join(
        f"{o.name} {v:.6g}" for o, v in zip(objectives, t.values))
    flagfiles[t.number] = "\n".join([header, *trial_flags(t, base_flags, output_dir)]) + "\n"
    files.write_text(files.join(output_dir, "flags", f"trial-{t.number:04d}.flags"),
                     flagfiles[t.number])
  best = front(study)
  if best and len(objectives) == 1:
    written["best"] = files.join(output_dir, "best.flags")
    files.write_text(written["best"], flagfiles[best[0].number])
  elif best:
    written["front"] = files.join(output_dir, "pareto_front.md")
    files.write_text(written["front"], front_table(study, objectives, output_dir) + "\n")
  if plots and best:
    written["history"] = files.join(output_dir, "history.png")
    _write_png(written["history"], _history_figure(study, objectives))
    if len(objectives) > 1:
      written["pareto_front"] = files.join(output_dir, "pareto_front.png")
      _write_png(written["pareto_front"], _front_figure(study, objectives))
  return written


def front_table(study: optuna.Study, objectives: Sequence[study_lib.Objective],
                output_dir: str) -> str:
  """The best trial or the Pareto front as a Markdown table: values, flags, flagfile."""
  lines = ["| trial | " + " | ".join(o.name for o in objectives) + " | settings | flagfile |",
           "|---" * (len(objectives) + 3) + "|"]
  for t in front(study):
    lines.append(f"| {t.number} | " + " | ".join(f"{v:.4f}" for v in t.values) + " | "
                 + " ".join(t.user_attrs.get("flags", [])) + " | "
                 + files.join(output_dir, "flags", f"trial-{t.number:04d}.flags") + " |")
  return "\n".join(lines)


def status_line(study: optuna.Study) -> str:
  """How many trials are in each state."""
  trials = study.get_trials(deepcopy=False)
  counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
  return (f"{sum(map(study_lib.counts_as_finished, trials))} finished trials: "
          + ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n))


def _history_figure(study, objectives):
  figure = Figure(figsize=(5.5 * len(objectives), 4))
  axes = figure.subplots(1, len(objectives), squeeze=False)
  trials = study.get_trials(deepcopy=False)
  for i, (objective, axis) in enumerate(zip(objectives, axes[0])):
    done = [(t.number, t.values[i]) for t in trials if t.state == TrialState.COMPLETE]
    axis.plot(*zip(*done), "o", color="tab:blue", label="complete")
    if len(objectives) == 1:
      pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)])
                for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
      if pruned:
        axis.plot(*zip(*pruned), "x", color="tab:red", label="pruned (last epoch)")
      pick = max if objective.direction == "maximize" else min
      best, running = [], None
      for number, value in done:
        running = value if running is None else pick(running, value)
        best.append((number, running))
      axis.step(*zip(*best), where="post", color="tab:orange", label="best so far")
    axis.set_xlabel("trial")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(objective.name + f" ({objective.direction})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.suptitle(f"Study {study.study_name}: optimisation history")
  figure.tight_layout()
  return figure


def _front_figure(study, objectives):
  done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  best = front(study)
  figure = Figure(figsize=(6, 4.5))
  axis = figure.subplots()
  axis.plot([t.values[0] for t in done], [t.values[1] for t in done], "o", color="0.7",
            label="trial")
  best = sorted(best, key=lambda t: t.values[0])
  axis.plot([t.values[0] for t in best], [t.values[1] for t in best], "o-",
            color="tab:red", label="Pareto front")
  for t in best:
    axis.annotate(str(t.number), (t.values[0], t.values[1]), fontsize=8,
                  xytext=(3, 3), textcoords="offset points")
  axis.set_xlabel(f"{objectives[0].name} ({objectives[0].direction})")
  axis.set_ylabel(f"{objectives[1].name} ({objectives[1].direction})")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  axis.set_title(f"Study {study.study_name}: {len(done)} trials, {len(best)} on the front"
                 + (" (first two objectives)" if len(objectives) > 2 else ""))
  figure.tight_layout()
  return figure


def _write_png(path: str, figure: Figure) -> None:
  FigureCanvasAgg(figure)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110)
  with files.atomic_open(path, "wb") as f:
    f.write(buffer.getvalue())
