"""Training objectives, looked up by `config.train.objective`.

Each module has `check(config)` (its settings, checked before any work) and
`make(config, data) -> Objective` (its step and what that step needs).
"""

import ml_collections

from capjax.errors import UserError
from capjax.objectives import cross_entropy
from capjax.objectives import scst
from capjax.objectives.common import Objective

_MODULES = {'cross_entropy': cross_entropy, 'scst': scst}
NAMES = tuple(_MODULES)

__all__ = ['NAMES', 'Objective', 'check', 'make']


def _module(config: ml_collections.ConfigDict):
  name = config.train.objective
  if name not in _MODULES:
    raise UserError(f'unknown --config.train.objective={name!r}; choose one '
                    f'of {", ".join(NAMES)}')
  return _MODULES[name]


def check(config: ml_collections.ConfigDict) -> None:
  """A one-line UserError for settings the objective cannot train with."""
  _module(config).check(config)


def make(config: ml_collections.ConfigDict, data) -> Objective:
  """The objective of `config.train.objective`; `data` is `prepare.Data`."""
  return _module(config).make(config, data)
