"""Hyper-parameter search over training runs (`python -m mtl_zoo.tune`), on Optuna.

`space` says what a search varies, `study` runs the trials (each one
`runner.run`) in a resumable, shareable study database, `results` writes the
flagfiles, trials.json, tables and plots. Import the submodules.
"""

try:
  import optuna  # noqa: F401
except ImportError as e:  # an extra, not a core dependency
  raise ImportError("the search (mtl_zoo.tuning, python -m mtl_zoo.tune) needs Optuna: "
                    "python -m pip install -e '.[tune]'") from e
