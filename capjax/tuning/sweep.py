"""The sweep file: what a tuning study searches, and how.

A sweep is a Python file, like a config, whose `get_sweep()` returns a
`Sweep` (see configs/sweeps/):

    from capjax.tuning.sweep import Sweep, categorical, log_uniform

    def get_sweep():
      return Sweep(
          space={'train.learning_rate': log_uniform(1e-4, 1e-2),
                 'batch_size': categorical(32, 64)},
          overrides={'train.num_steps': 600})

The space's keys are config fields, spelt as after `--config.`; its values
are Optuna distributions (the helpers below make them).
"""

import dataclasses
import difflib
import importlib.util
import os
from typing import Any

import ml_collections
from optuna import distributions

from capjax import config as config_lib
from capjax.errors import UserError

Distribution = distributions.BaseDistribution

SAMPLERS = ('tpe', 'random', 'grid')
PRUNERS = ('median', 'hyperband', 'none')
DIRECTIONS = ('maximize', 'minimize')


def log_uniform(low: float, high: float) -> Distribution:
  """A float drawn uniformly in log space: learning rates, penalties."""
  return distributions.FloatDistribution(low, high, log=True)


def uniform(low: float, high: float) -> Distribution:
  """A float drawn uniformly in [low, high]: dropout, smoothing."""
  return distributions.FloatDistribution(low, high)


def integer(low: int, high: int, step: int = 1, log: bool = False
            ) -> Distribution:
  """An int in [low, high] (with `step`, or uniformly in log space)."""
  return distributions.IntDistribution(low, high, step=step, log=log)


def categorical(*choices) -> Distribution:
  """One of `choices`: batch sizes, architectures, on/off."""
  return distributions.CategoricalDistribution(choices)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A tuning study's settings; only `space` has no default."""
  # Config field (as after --config.) -> the Optuna distribution its values
  # come from.
  space: dict[str, Distribution]
  # The objective: a metric the training job's validation logs (as
  # <evaluator>_<metric>, e.g. val_CIDEr: the `val` evaluator's CIDEr-D;
  # val_loss, val_BLEU-4, ...), its value at the trial's last step.
  metric: str = 'val_CIDEr'
  direction: str = 'maximize'  # 'maximize' or 'minimize'.
  # Config fields set the same for every trial and not searched: shorter
  # runs, fewer checkpoints. The best trial's config file leaves them out.
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  trials: int = 20  # Trials in the study; the tuner's --trials overrides.
  # 'tpe' (Optuna's default), 'random', or 'grid' (every combination of
  # categorical and integer values, in random order; then the study ends).
  sampler: str = 'tpe'
  startup_trials: int = 10  # TPE's random trials before it models.
  seed: int = 0  # Of the sampler; each worker adds its index.
  # 'median' (stop a trial whose validation metric is worse than the
  # median of the earlier trials' at the same step), 'hyperband', 'none'.
  # Both are fed every validation the training job runs.
  pruner: str = 'median'
  pruner_startup_trials: int = 3  # Median: trials finished before pruning.
  pruner_warmup_steps: int = 0  # Median: no pruning before this step.
  # Parameter sets (space field -> value) tried first, e.g. the shipped
  # config's values, so that the study measures them on the same terms.
  enqueue: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # A trial whose worker stops beating this long is retried from its
  # checkpoint (preemption, kill -9, a lost node): the heartbeat's period,
  # the silence that makes a trial stale, and retries per trial.
  heartbeat_seconds: int = 60
  grace_seconds: int = 180
  max_retries: int = 3

  def space_json(self) -> dict[str, str]:
    """The space as Optuna's JSON per field: how a study records it."""
    return {k: distributions.distribution_to_json(v)
            for k, v in sorted(self.space.items())}


def load(path: str) -> Sweep:
  """`get_sweep()` of the file at `path`, checked on its own (see `check`
  for what needs the config)."""
  if not os.path.isfile(path):
    raise UserError(f'--sweep={path}: no such file')
  spec = importlib.util.spec_from_file_location('capjax_sweep', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    sweep = module.get_sweep()
  except AttributeError as e:
    if not hasattr(module, 'get_sweep'):
      raise UserError(f'--sweep={path} has no get_sweep()') from None
    raise UserError(f'--sweep={path} failed to load: {e}') from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UserError(f'--sweep={path} failed to load: {type(e).__name__}: {e}'
                    ) from None
  if not isinstance(sweep, Sweep):
    raise UserError(f'get_sweep() of --sweep={path} returned a '
                    f'{type(sweep).__name__}, not a capjax.tuning.sweep.Sweep')
  _check_settings(sweep, path)
  return sweep


def _check_settings(sweep: Sweep, path: str) -> None:
  if not sweep.space:
    raise UserError(f'--sweep={path}: the search space is empty; name at '
                    'least one config field in Sweep(space={...})')
  for name, d in sweep.space.items():
    if not isinstance(d, Distribution):
      raise UserError(f'--sweep={path}: space[{name!r}] is {d!r}, not a '
                      'distribution; use log_uniform, uniform, integer or '
                      'categorical')
  for key, allowed in (('sampler', SAMPLERS), ('pruner', PRUNERS),
                       ('direction', DIRECTIONS)):
    if getattr(sweep, key) not in allowed:
      raise UserError(f'--sweep={path}: unknown {key} '
                      f'{getattr(sweep, key)!r}; choose one of '
                      f'{", ".join(allowed)}')
  if sweep.sampler == 'grid':
    for name, d in sweep.space.items():
      if isinstance(d, distributions.FloatDistribution):
        raise UserError(f'--sweep={path}: the grid sampler needs a finite '
                        f'set of values, and space[{name!r}] is a float '
                        'range; make it categorical(...)')
  if not 0 < sweep.heartbeat_seconds < sweep.grace_seconds:
    raise UserError(f'--sweep={path}: need 0 < heartbeat_seconds '
                    f'({sweep.heartbeat_seconds}) < grace_seconds '
                    f'({sweep.grace_seconds})')
  for i, params in enumerate(sweep.enqueue):
    extra = set(params) - set(sweep.space)
    if extra:
      raise UserError(f'--sweep={path}: enqueue[{i}] sets {sorted(extra)}, '
                      'which the space does not search')


def grid(sweep: Sweep) -> dict[str, list]:
  """The grid sampler's values per field."""
  out = {}
  for name, d in sweep.space.items():
    if isinstance(d, distributions.CategoricalDistribution):
      out[name] = list(d.choices)
    else:  # IntDistribution.
      out[name] = list(range(d.low, d.high + 1, d.step))
  return out


def _set(config: ml_collections.ConfigDict, name: str, value) -> None:
  *parents, last = name.split('.')
  node = config
  for part in parents:
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or last not in node:
    raise KeyError(name)
  node[last] = value


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """A nested dict as {'a.b.c': leaf}: config fields by their dotted name."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out |= flatten(v, f'{prefix}{k}.')
    else:
      out[f'{prefix}{k}'] = v
  return out


def apply(config: ml_collections.ConfigDict,
          values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `values` (config field -> value) set.

  Raises a UserError naming an unknown field (and the nearest real ones)
  or a value of the wrong type.
  """
  config = config.copy_and_resolve_references()
  for name, value in values.items():
    try:
      _set(config, name, value)
    except (KeyError, AttributeError):
      near = difflib.get_close_matches(name, list(flatten(config.to_dict())),
                                     n=3)
      raise UserError(
          f'the sweep sets --config.{name}, which the config does not have'
          + (f'; did you mean {", ".join(near)}?' if near else '')) from None
    except TypeError as e:
      raise UserError(f'the sweep sets --config.{name}={value!r}: {e}'
                      ) from None
  return config


def _extremes(d: Distribution) -> list:
  if isinstance(d, distributions.CategoricalDistribution):
    return list(d.choices)
  return [d.low, d.high]


def check(sweep: Sweep, config: ml_collections.ConfigDict
          ) -> ml_collections.ConfigDict:
  """Checks `sweep` against the base `config`; returns the config every
  trial starts from (`config` with the overrides).

  Each field must exist; the ends of each range and every choice must make
  a config the training job accepts; the metric must be one that
  validation logs during training.
  """
  both = set(sweep.space) & set(sweep.overrides)
  if both:
    raise UserError(f'the sweep both searches and overrides {sorted(both)}')
  base = apply(config, sweep.overrides)
  config_lib.check(base)
  # Every field first, so that a misspelt one is named as such.
  apply(base, {name: _extremes(d)[0] for name, d in sweep.space.items()})
  for name, d in sweep.space.items():
    for value in _extremes(d):
      try:
        config_lib.check(apply(base, {name: value}))
      except UserError as e:
        raise UserError(f'space[{name!r}] reaches {value!r}: {e}') from None
  logged = config_lib.validation_metrics(base)
  if sweep.metric not in logged:
    raise UserError(
        f'the sweep optimises {sweep.metric!r}, which training does not log'
        + (f'; it logs {", ".join(logged)}' if logged else
           ': no validation evaluator runs during training (set '
           '--config.evals.val.every_steps > 0)'))
  return base
