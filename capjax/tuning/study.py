"""The study: created once, checked on every later start, and one worker's
loop over it.

Every worker (a `--workers` process, a SLURM array task, a rerun of the
tuner) runs the same loop on the shared storage: fail the stale trials
(Optuna queues their retries), then run a queued retry, or a new trial
while the study has fewer than `--trials` finished or running ones, or wait
for the running ones. Optuna hands each trial to one worker only.
"""

import json
import time
from typing import Callable
import warnings

from absl import logging
import ml_collections
import optuna

from capjax.errors import UserError
from capjax.tuning import sweep as sweep_lib
from capjax.tuning import trial as trial_lib

State = optuna.trial.TrialState
# The study's user attributes that hold what it was created with.
_RECORD = 'capjax'


def _record(sweep: sweep_lib.Sweep, config: ml_collections.ConfigDict
            ) -> dict:
  return {
      'space': sweep.space_json(),
      'objective': [sweep.metric, sweep.direction],
      'config': json.loads(config.to_json_best_effort()),
      'overrides': json.loads(json.dumps(sweep.overrides)),
  }


def _difference(old: dict, new: dict) -> str:
  """The first few differing fields of two records, as `field: old -> new`."""
  a, b = sweep_lib.flatten(old), sweep_lib.flatten(new)
  keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
  shown = [f'{k}: {a.get(k, "(none)")} -> {b.get(k, "(none)")}'
           for k in keys[:3]]
  return '; '.join(shown) + (f'; and {len(keys) - 3} more' if len(keys) > 3
                             else '')


def open_study(storage: optuna.storages.BaseStorage, name: str,
               sweep: sweep_lib.Sweep, config: ml_collections.ConfigDict,
               where: str, worker: int = 0) -> optuna.Study:
  """The study `name`, created with this sweep and `config` (before the
  sweep's overrides) if new. An existing one must have been created with
  the same search space, objective, overrides and config, or it is a
  UserError (and nothing is changed). `where` names the storage in those
  errors: a URL as `storage.shown` gives it, its password masked.

  Its sampler's seed is the sweep's plus `worker` and the trials so far:
  two workers, or a rerun, never draw the same random trials.
  """
  record = _record(sweep, config)
  try:
    study = optuna.create_study(storage=storage, study_name=name,
                                direction=sweep.direction,
                                load_if_exists=True)
  except ValueError as e:  # E.g. a damaged journal file.
    raise UserError(f'cannot read study {name!r} in {where}: '
                    f'{type(e).__name__}: {e}') from None
  saved = study.user_attrs.get(_RECORD)
  if saved is None:
    study.set_user_attr(_RECORD, record)
    for params in sweep.enqueue:
      study.enqueue_trial(params, skip_if_exists=True)
  elif saved != record:
    what = next(k for k in record if saved.get(k) != record[k])
    what = {'space': 'another search space', 'objective': 'another '
            'objective', 'config': 'another config',
            'overrides': 'other overrides'}[what]
    raise UserError(
        f'study {name!r} in {where} was created with {what} ('
        f'{_difference(saved, record)}); tune in another --workdir (or '
        '--study), or restore the sweep and config it was created with')
  seed = sweep.seed + 1000 * worker + len(study.get_trials(deepcopy=False))
  return optuna.load_study(study_name=name, storage=storage,
                           sampler=sampler(sweep, seed),
                           pruner=pruner(sweep, sweep_lib.apply(
                               config, sweep.overrides)))


def sampler(sweep: sweep_lib.Sweep, seed: int) -> optuna.samplers.BaseSampler:
  if sweep.sampler == 'grid':
    return optuna.samplers.GridSampler(sweep_lib.grid(sweep), seed=seed)
  if sweep.sampler == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(n_startup_trials=sweep.startup_trials,
                                    seed=seed)


def pruner(sweep: sweep_lib.Sweep, config: ml_collections.ConfigDict
           ) -> optuna.pruners.BasePruner:
  if sweep.pruner == 'median':
    return optuna.pruners.MedianPruner(
        n_startup_trials=sweep.pruner_startup_trials,
        n_warmup_steps=sweep.pruner_warmup_steps)
  if sweep.pruner == 'hyperband':
    # Resources are training steps: the first validation to the last step.
    first = min(e.every_steps for e in config.evals.values()
                if e.type == 'validation' and e.every_steps > 0)
    return optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=config.train.num_steps)
  return optuna.pruners.NopPruner()


def size(sweep: sweep_lib.Sweep, trials: int) -> int:
  """Trials the study runs: `trials`, or the grid's size if smaller."""
  if sweep.sampler != 'grid':
    return trials
  n = 1
  for values in sweep_lib.grid(sweep).values():
    n *= len(values)
  return min(trials, n)


def counts(study: optuna.Study) -> dict[str, int]:
  """Finished (complete, pruned, failed for good), running and queued
  trials; a failed trial that was retried is not counted."""
  trials = study.get_trials(deepcopy=False)
  retried = {n for t in trials for n in t.system_attrs.get('retry_history',
                                                           ())}
  out = {'finished': 0, 'running': 0, 'waiting': 0}
  for t in trials:
    if t.state == State.RUNNING:
      out['running'] += 1
    elif t.state == State.WAITING:
      out['waiting'] += 1
    elif t.state != State.FAIL or t.number not in retried:
      out['finished'] += 1
  return out


def _fail_stale(study: optuna.Study) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)


def _retry(study: optuna.Study, number: int) -> None:
  """Queues trial `number`, failed by a signal, as Optuna queues a stale
  one: same parameters and workdir, its reports inherited."""
  frozen = study.get_trials(deepcopy=False)[number]
  if frozen.state == State.FAIL:
    study._storage.get_heartbeat_stale_trial_callback()(  # pylint: disable=protected-access
        study, frozen)
    logging.warning('Trial %d stopped at a signal; its retry is queued and '
                    'resumes from its checkpoint.', number)


def work(study: optuna.Study, objective: trial_lib.Objective, total: int,
         poll_seconds: float, stopping: Callable[[], bool] = lambda: False
         ) -> bool:
  """Runs trials until the study has `total` finished; returns False if a
  signal stopped it first (a trial it stopped is queued again).
  `stopping()` says a stop was asked for between trials."""
  while not stopping():
    _fail_stale(study)
    n = counts(study)
    if not n['waiting'] and n['finished'] + n['running'] >= total:
      if not n['running']:
        return True
      # Running elsewhere, or left by a killed worker: wait until they end
      # or go stale, so that a retry is not left behind.
      deadline = time.monotonic() + poll_seconds
      while time.monotonic() < deadline and not stopping():
        time.sleep(0.5)
      continue
    try:
      study.optimize(objective, n_trials=1, gc_after_trial=True,
                     catch=(trial_lib.Failed, trial_lib.Interrupted))
    except KeyboardInterrupt:
      if objective.number is not None:
        _retry(study, objective.number)
      raise
    if objective.interrupted:
      _retry(study, objective.number)
      return False
  return False
