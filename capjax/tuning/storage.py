"""Where a study lives: `--storage`, opened with heartbeats.

  (default)          sqlite:///WORKDIR/study.db, beside the trials
  journal:PATH       Optuna's journal file: for a filesystem that several
                     machines share (a SLURM array), no database server
  URL                any SQLAlchemy URL, e.g. postgresql://user@host/db

A URL is shown (in logs and errors) only through `shown`, with its
password masked.

Every worker records a heartbeat for its running trial. A trial whose
heartbeat stops for `grace_seconds` (preemption, kill -9, a lost node) is
marked failed by the next worker that looks, and Optuna's
RetryHeartbeatStaleTrialCallback queues it again with its parameters; the
retry trains in the same workdir, so it resumes from the last checkpoint.
"""

import os
import re
import time
import warnings

import optuna
from optuna.storages import journal
# Optuna's journal storage has no heartbeat of its own (its RDB storage
# does); the class below gives it one, through this interface, so that
# Optuna's stale-trial handling and retry callback work on it unchanged.
from optuna.storages._heartbeat import BaseHeartbeat
import sqlalchemy
from sqlalchemy.engine import make_url

from capjax.errors import UserError

JOURNAL = 'journal:'
# The trial's system attribute holding its last heartbeat (seconds since
# the epoch) in a journal.
_BEAT = 'capjax:heartbeat'
# Query parameters that carry a secret, e.g. libpq's ?password=.
_SECRET_QUERY = re.compile(r'([?&][^=&]*(?:pass|pwd|secret|token)[^=&]*=)'
                           r'([^&]*)', re.IGNORECASE)
_MASK = '***'


def _parsed(url: str):
  """`url` as SQLAlchemy reads it, or None where it cannot."""
  try:
    return make_url(url)
  except Exception:  # pylint: disable=broad-exception-caught
    return None  # ArgumentError, a ValueError for a bad port, ...


def _password_span(url: str, parsed: bool) -> tuple[int, int] | None:
  """Where a password may be in `url`, by a rule that needs no parsing:
  from the first ':' after the scheme to the last '@' before the query,
  so that one holding '@', '/' or ':' is masked whole. In a URL that
  SQLAlchemy cannot read, without '@', up to the next '/': a password
  whose '@host' was left out (its error calls it a bad port). A path or
  port may be masked too: better than a password shown."""
  scheme = url.find('://')
  start = scheme + 3 if scheme >= 0 else 0
  end = url.find('?', start)
  end = len(url) if end < 0 else end
  at = url.rfind('@', start, end)
  if at < 0 and parsed:
    return None
  colon = url.find(':', start, end if at < 0 else at)
  if colon < 0:
    return None
  stop = at if at >= 0 else url.find('/', colon, end)
  stop = end if stop < 0 else stop
  return (colon + 1, stop) if stop > colon + 1 else None


def _secrets(url: str) -> list[str]:
  """The passwords in `url`, as they are written and as SQLAlchemy reads
  them."""
  parsed = _parsed(url)
  out = [m.group(2) for m in _SECRET_QUERY.finditer(url)]
  span = _password_span(url, parsed is not None)
  if span:
    out.append(url[span[0]:span[1]])
  if parsed is not None:
    out.append(parsed.password or '')
    if '@' in (parsed.host or ''):  # The tail of a password, in the host.
      out.append(parsed.host)
  return [s for s in out if s]


def shown(url: str) -> str:
  """`url` as it may be shown in logs, errors and files: its password
  masked. `journal:PATH` and SQLite URLs have none and stay as they are."""
  if url.startswith(JOURNAL):
    return url
  parsed = _parsed(url)
  # A password holding an unescaped '@' leaves its tail in the host: the
  # rule masks it whole.
  if (parsed is not None and parsed.password is not None
      and '@' not in (parsed.host or '')):
    out = parsed.render_as_string(hide_password=True)
  else:
    # No password that SQLAlchemy sees (the URL stays as written), or one
    # that it cannot see.
    span = _password_span(url, parsed is not None)
    out = url if span is None else url[:span[0]] + _MASK + url[span[1]:]
  return _SECRET_QUERY.sub(r'\1' + _MASK, out)


def _redacted(text: str, url: str) -> str:
  """`text` (e.g. a driver's error) with `url` and its passwords masked."""
  text = text.replace(url, shown(url))
  for secret in sorted(_secrets(url), key=len, reverse=True):  # Whole first.
    text = text.replace(secret, _MASK)
  return text


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
      raise UserError(f'--storage={shown(url)}: no folder {folder}')
    try:
      if interval is None:
        return journal.JournalStorage(journal.JournalFileBackend(path))
      return _JournalWithHeartbeat(path, interval, grace, retry)
    except OSError as e:
      raise UserError(f'--storage={shown(url)}: cannot open {path}: '
                      f'{e.strerror}') from None
  sqlite = url.startswith('sqlite')
  try:
    storage = optuna.storages.RDBStorage(
        url, heartbeat_interval=interval, grace_period=grace,
        heartbeat_stale_trial_callback=retry,
        # pysqlite's own transactions off: _serialize_sqlite begins them.
        engine_kwargs={'connect_args': {'isolation_level': None,
                                        'timeout': 60}} if sqlite else None)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # SQLAlchemy's errors for a bad URL, a missing driver, a database that
    # refuses: their first line says which. A driver may quote the URL.
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UserError(f'cannot open --storage={shown(url)}: '
                    f'{type(e).__name__}: {_redacted(first, url)}'
                    + ('' if '://' in url else
                       f' (a database URL, or {JOURNAL}PATH)')) from None
  if sqlite:
    _serialize_sqlite(storage.engine)
  return storage


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
  """Makes each transaction on `engine` take SQLite's write lock at once.

  Optuna hands a queued trial (an `enqueue`d one, a retry) to a worker by
  reading that it is waiting, then marking it running, in one transaction
  that asks the database to lock the row (SELECT ... FOR UPDATE). SQLite
  has no row locks, and pysqlite starts a transaction only at its first
  write: two workers read "waiting" together and both train the trial
  (the second's lost run then fails the first's). With BEGIN IMMEDIATE
  (SQLAlchemy's recipe for SQLite), the second reads after the first has
  written. Every transaction waits for the lock (up to the connection's
  60 s timeout); a study's are a few milliseconds each.
  """
  sqlalchemy.event.listen(
      engine, 'begin', lambda conn: conn.exec_driver_sql('BEGIN IMMEDIATE'))
