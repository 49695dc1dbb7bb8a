"""Hyper-parameter search over training runs (`python -m mtl_zoo.tune`), on Optuna.

`space` says what a search varies, `study` runs the trials (each one
`runner.run`) in a resumable, shareable study database, `results` writes the
flagfiles, trials.json, tables and plots.
"""

from mtl_zoo.tuning import results, space, study

__all__ = ["results", "space", "study"]
