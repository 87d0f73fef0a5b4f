"""One trial: its config, its workdir, the training job, its reports.

A trial trains with `capjax.train.train_and_evaluate` in WORKDIR/trials/N,
so it has what any run has: checkpoints, exact resume, TensorBoard logs,
the decode job. Each validation's metric goes to Optuna (`trial.report`),
whose pruner may stop the run there. A retried trial (see storage.py)
trains in the workdir of the trial it retries, so it resumes from that
trial's last checkpoint.
"""

import os
import socket
from typing import Callable

from absl import logging
import ml_collections
import optuna

from capjax.errors import UserError
from capjax.tuning import sweep as sweep_lib

TRIALS = 'trials'


class Interrupted(Exception):
  """The training job stopped at a signal (SIGTERM, Ctrl-C) before its last
  step, its checkpoint saved: the trial is to be retried, not scored."""


class Failed(Exception):
  """The training job refused or failed (a UserError): not retried."""


def number_of(trial: optuna.trial.FrozenTrial) -> int:
  """The trial's own number, or that of the trial it retries."""
  origin = trial.system_attrs.get('failed_trial')
  return trial.number if origin is None else origin


def workdir_of(root: str, trial: optuna.trial.FrozenTrial) -> str:
  return os.path.join(root, TRIALS, f'{number_of(trial):04d}')


def suggest(trial: optuna.trial.Trial, sweep: sweep_lib.Sweep) -> dict:
  """The trial's values of the sweep's space (config field -> value)."""
  out = {}
  for name, d in sweep.space.items():
    if isinstance(d, optuna.distributions.FloatDistribution):
      out[name] = trial.suggest_float(name, d.low, d.high, step=d.step,
                                      log=d.log)
    elif isinstance(d, optuna.distributions.IntDistribution):
      out[name] = trial.suggest_int(name, d.low, d.high, step=d.step,
                                    log=d.log)
    else:
      out[name] = trial.suggest_categorical(name, d.choices)
  return out


class Objective:
  """Optuna's objective: trains one trial, returns its metric."""

  def __init__(self, study: optuna.Study, sweep: sweep_lib.Sweep,
               base: ml_collections.ConfigDict, root: str,
               train: Callable[..., object]):
    self._study = study
    self._sweep = sweep
    self._base = base
    self._root = root
    self._train = train
    self.number = None  # The trial running now.
    self.interrupted = False

  def __call__(self, trial: optuna.trial.Trial) -> float:
    self.number = trial.number
    # What the storage holds of it: a retry's origin, inherited reports.
    frozen = self._study.get_trials(deepcopy=False)[trial.number]
    assert frozen.number == trial.number
    values = suggest(trial, self._sweep)
    config = sweep_lib.apply(self._base, values)
    workdir = workdir_of(self._root, frozen)
    trial.set_user_attr('workdir', workdir)
    trial.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')
    metric, last = self._sweep.metric, config.train.num_steps
    # A retry starts with the values its trial reported (Optuna copies them).
    reported = dict(frozen.intermediate_values)
    logging.info('Trial %d in %s: %s', trial.number, workdir, values)

    def on_evaluated(step: int, metrics: dict[str, float]) -> None:
      if metric not in metrics:
        return
      if step not in reported:
        trial.report(metrics[metric], step)
        reported[step] = metrics[metric]
      if step < last and trial.should_prune():
        trial.set_user_attr('steps', step)
        raise optuna.TrialPruned(f'{metric}={metrics[metric]:.4f} at step '
                                 f'{step}')

    try:
      self._train(config, workdir, on_evaluated)
    except UserError as e:
      trial.set_user_attr('error', str(e))
      raise Failed(str(e)) from None
    if last not in reported:
      # Stopped by a signal: the checkpoint is saved, the step not reached.
      self.interrupted = True
      raise Interrupted(f'trial {trial.number} stopped before step {last}')
    trial.set_user_attr('steps', last)
    return reported[last]
