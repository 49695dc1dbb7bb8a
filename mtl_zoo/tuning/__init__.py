"""Hyper-parameter search over training runs (`python -m mtl_zoo.tune`), on Optuna.

`space` says what a search varies, `study` runs the trials (each one
`runner.run`) in a resumable, shareable study database, `results` writes the
flagfiles, trials.json, tables and plots. Import the submodules.
"""
