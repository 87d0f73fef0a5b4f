"""Where a study lives: `--storage`, opened with heartbeats.

  (default)          sqlite:///WORKDIR/study.db, beside the trials
  journal:PATH       Optuna's journal file: for a filesystem that several
                     machines share (a SLURM array), no database server
  URL                any SQLAlchemy URL, e.g. postgresql://user@host/db

Every worker records a heartbeat for its running trial. A trial whose
heartbeat stops for `grace_seconds` (preemption, kill -9, a lost node) is
marked failed by the next worker that looks, and Optuna's
RetryHeartbeatStaleTrialCallback queues it again with its parameters; the
retry trains in the same workdir, so it resumes from the last checkpoint.
"""

import os
import time
import warnings

import optuna
from optuna.storages import journal
# Optuna's journal storage has no heartbeat of its own (its RDB storage
# does); the class below gives it one, through this interface, so that
# Optuna's stale-trial handling and retry callback work on it unchanged.
from optuna.storages._heartbeat import BaseHeartbeat

from capjax.errors import UserError

JOURNAL = 'journal:'
# The trial's system attribute holding its last heartbeat (seconds since
# the epoch) in a journal.
_BEAT = 'capjax:heartbeat'


def default_url(workdir: str) -> str:
  return f'sqlite:///{os.path.abspath(os.path.join(workdir, "study.db"))}'


class _JournalWithHeartbeat(journal.JournalStorage, BaseHeartbeat):
  """A journal storage whose running trials beat in a system attribute."""

  def __init__(self, path: str, interval: int, grace: int, callback):
    super().__init__(journal.JournalFileBackend(path))
    self._interval, self._grace, self._callback = interval, grace, callback

  def record_heartbeat(self, trial_id: int) -> None:
    self.set_trial_system_attr(trial_id, _BEAT, time.time())

  def _get_stale_trial_ids(self, study_id: int) -> list[int]:
    now = time.time()
    running = self.get_all_trials(
        study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    # A trial not yet beating counts from its start.
    return [t._trial_id for t in running  # pylint: disable=protected-access
            if now - t.system_attrs.get(
                _BEAT, t.datetime_start.timestamp()) > self._grace]

  def get_heartbeat_interval(self) -> int:
    return self._interval

  def get_heartbeat_stale_trial_callback(self):
    return self._callback


def open_storage(url: str, *, interval: int | None = None,
                 grace: int | None = None, max_retries: int | None = None
                 ) -> optuna.storages.BaseStorage:
  """The storage at `url`, or a UserError saying why it cannot be opened.

  With `interval`, running trials beat every `interval` seconds and are
  retried up to `max_retries` times once silent for `grace`; without, the
  storage is for reading (--mode=report).
  """
  with warnings.catch_warnings():
    # Heartbeats and their retry callback are "experimental" since 2.8.
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    retry = interval and optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=max_retries, inherit_intermediate_values=True)
    return _open(url, interval, grace, retry or None)


def _open(url: str, interval: int | None, grace: int | None, retry
          ) -> optuna.storages.BaseStorage:
  if url.startswith(JOURNAL):
    path = os.path.abspath(url[len(JOURNAL):])
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
      raise UserError(f'--storage={url}: no folder {folder}')
    try:
      if interval is None:
        return journal.JournalStorage(journal.JournalFileBackend(path))
      return _JournalWithHeartbeat(path, interval, grace, retry)
    except OSError as e:
      raise UserError(f'--storage={url}: cannot open {path}: {e.strerror}'
                      ) from None
  try:
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=interval, grace_period=grace,
        heartbeat_stale_trial_callback=retry)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # SQLAlchemy's errors for a bad URL, a missing driver, a database that
    # refuses: their first line says which.
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UserError(f'cannot open --storage={url}: {type(e).__name__}: '
                    f'{first}' + ('' if '://' in url else
                                  f' (a database URL, or {JOURNAL}PATH)')
                    ) from None
