"""Evaluators: what is measured of a model, each built from a config entry.

`config.evals` holds one entry per evaluator, by name, each with a `type`
(a key of `TYPES`) and `every_steps` (run every that many training steps and
at the last; 0: once, after training, with the final state; -1: never).
Each evaluator has `run(state, step, writer, stop=None) -> metrics` (`stop()`
asked after every batch may end it with `Interrupted`) and `done(step)`
(whether its results of `step` are written already); the training loop
runs them, and the evaluation jobs (`capjax.evaluate`) run `DecodeSplit`.
"""

import ml_collections

from capjax import parallel
from capjax.evaluators.common import Interrupted
from capjax.evaluators.decode_split import DecodeSplit
from capjax.evaluators.validation import Validation

TYPES = {'validation': Validation, 'decode_split': DecodeSplit}

__all__ = ['DecodeSplit', 'Interrupted', 'TYPES', 'Validation', 'build']


def build(config: ml_collections.ConfigDict, *, par: parallel.Parallel,
          predict, data, workdir: str) -> dict[str, Validation | DecodeSplit]:
  """The evaluators of `config.evals` that ever run, by name; `predict` is
  the model's `models.Predict`, all they know of the model."""
  out = {}
  for name, settings in config.evals.items():
    if settings.every_steps < 0:
      continue
    kind = TYPES[settings.type]  # Names checked by config.check.
    out[name] = kind(name, settings, config=config, par=par, predict=predict,
                     data=data, workdir=workdir)
  return out
