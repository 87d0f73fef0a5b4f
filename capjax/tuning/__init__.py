"""Hyperparameter tuning on Optuna: `python -m capjax.tune` (capjax/tune.py).

  sweep.py    the sweep file: search space, objective, sampler, pruner
  storage.py  where the study lives (SQLite, journal file, any RDB URL)
  study.py    the study: created or checked, and a worker's loop over it
  trial.py    one trial: a config, a workdir, the training job, its reports
  results.py  the table, the best trial's config file, the plots
"""
