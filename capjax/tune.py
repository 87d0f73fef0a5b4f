r"""Hyperparameter tuning: an Optuna study whose trials are training runs.

    python -m capjax.tune --config=configs/shapes.py \
        --sweep=configs/sweeps/shapes.py --workdir=runs/tune-shapes \
        [--trials=N] [--workers=K] [--storage=URL]
    python -m capjax.tune --workdir=runs/tune-shapes --mode=report

Each trial trains in WORKDIR/trials/N; the study lives in --storage or
$CAPJAX_STORAGE (SQLite in WORKDIR by default). Run it again, or on more
machines, and it continues the same study. See capjax/tuning/ and the README.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import garbage

if __name__ == '__main__':
  garbage.collect_rarely()  # Before the imports below (capjax/garbage.py).

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from capjax import cli
from capjax.errors import UserError
from capjax.tuning import results
from capjax.tuning import storage as storage_lib
from capjax.tuning import study as study_lib
from capjax.tuning import sweep as sweep_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The config every trial starts from, e.g. '
    'configs/shapes.py (--config.FIELD=VALUE overrides work as for '
    'capjax.main).', lock_config=True)
SWEEP = flags.DEFINE_string('sweep', None, 'The sweep file, e.g. '
                            'configs/sweeps/shapes.py.')
WORKDIR = flags.DEFINE_string('workdir', None, 'The study\'s directory: '
                              'trials/, study.db, results.')
MODE = flags.DEFINE_enum('mode', 'tune', ['tune', 'report'], 'tune: run '
                         'trials until the study has --trials. report: '
                         'write the table, best config and plots of the '
                         'study as it is now (needs --workdir only).')
TRIALS = flags.DEFINE_integer('trials', None, 'Trials in the study '
                              '(finished ones count); default: the sweep\'s.')
WORKERS = flags.DEFINE_integer('workers', 1, 'Trials at once on this machine,'
                               ' each in its own process with its share of '
                               'the CPU cores and GPUs.')
# Read here, not in the library: the entry point owns the environment.
STORAGE_ENV = 'CAPJAX_STORAGE'
STORAGE = flags.DEFINE_string('storage', '', 'Where the study lives: '
                              'a database URL or journal:PATH (a journal '
                              'file on a shared filesystem); default: '
                              f'${STORAGE_ENV}, else sqlite:///WORKDIR/'
                              'study.db. Give a URL with a password in '
                              f'${STORAGE_ENV}: a flag is in the process '
                              'list, for every user to see. Logs and errors '
                              'show the password masked.')
STUDY = flags.DEFINE_string('study', 'capjax', 'The study\'s name in the '
                            'storage.')
WORKER = flags.DEFINE_integer('worker', 0, 'This worker\'s index (a SLURM '
                              'array passes its task id): it seeds the '
                              'sampler.')
REPORT = flags.DEFINE_bool('report', True, 'Write the results when the study '
                           'is done.')
flags.mark_flags_as_required(['workdir'])


def _given() -> str:
  """The storage URL the user gave: --storage, else $CAPJAX_STORAGE."""
  return STORAGE.value or os.environ.get(STORAGE_ENV, '')


def _url(workdir: str) -> str:
  return _given() or storage_lib.default_url(workdir)


def report(workdir: str) -> None:
  """--mode=report: the study as it is, without running anything."""
  import optuna  # pylint: disable=g-import-not-at-top
  if not _given() and not os.path.exists(os.path.join(workdir, 'study.db')):
    raise UserError(f'no study in --workdir={workdir} (no study.db); give '
                    f'--storage (or ${STORAGE_ENV}) if it lives elsewhere')
  url = _url(workdir)
  storage = storage_lib.open_storage(url)
  try:
    study = optuna.load_study(study_name=STUDY.value, storage=storage)
  except KeyError:
    raise UserError(f'no study {STUDY.value!r} in '
                    f'{storage_lib.shown(url)}') from None
  print(results.report(study, workdir), flush=True)


def _child_argv(argv: list[str], index: int) -> list[str]:
  """This command for worker `index`: one worker, no report, and no
  --storage, which may hold a password that `ps` would show to every user
  of the machine: the worker reads it from $CAPJAX_STORAGE."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    # absl reads -flag as --flag, and --flag VALUE as --flag=VALUE.
    match = re.fullmatch(r'--?(workers|worker|report|noreport|storage)'
                         r'(=.*)?', arg)
    if match:
      skip = match[2] is None and match[1] in ('workers', 'worker',
                                               'storage')
      continue
    out.append(arg)
  return [sys.executable, '-m', 'capjax.tune', *out, '--workers=1',
          f'--worker={index}', '--noreport']


def _gpus() -> list[str]:
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip()]
  if not shutil.which('nvidia-smi'):
    return []
  out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                       check=False).stdout
  return [str(i) for i, line in enumerate(out.splitlines())
          if line.startswith('GPU ')]


def _spawn_workers(k: int, url: str) -> int:
  """Runs `k` workers on the study at `url`, each a process with its share
  of the cores (and GPUs); waits for them. A signal to this process goes
  to them all, and they die with it."""
  cores = sorted(os.sched_getaffinity(0))
  gpus = _gpus()
  if gpus and len(gpus) % k:
    raise UserError(f'--workers={k} cannot share {len(gpus)} GPUs evenly')
  libc = ctypes.CDLL(None, use_errno=True)
  procs = []
  for i in range(k):
    env = dict(os.environ)
    env[STORAGE_ENV] = url  # Only this user can read a process's environment.
    # Contiguous blocks: neighbouring GPUs share links, cores caches.
    if gpus:
      n = len(gpus) // k
      env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[i * n:(i + 1) * n])
    n = len(cores) // k
    mine = set(cores[i * n:(i + 1) * n])

    def setup(mine=mine):
      os.sched_setaffinity(0, mine)  # XLA sizes its thread pools by it.
      libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the tuner.

    procs.append(subprocess.Popen(_child_argv(sys.argv[1:], i), env=env,
                                  preexec_fn=setup))
  logging.info('%d workers: pids %s.', k, [p.pid for p in procs])

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if signum == signal.SIGTERM
                      else signal.SIGINT)

  previous = {s: signal.signal(s, forward)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return max(codes, key=abs)


def tune(config, workdir: str) -> None:
  """--mode=tune: this process's worker(s), then the results."""
  if SWEEP.value is None:
    raise UserError('--sweep is required to tune (e.g. '
                    '--sweep=configs/sweeps/shapes.py)')
  if (TRIALS.value is not None and TRIALS.value < 1) or WORKERS.value < 1:
    raise UserError('--trials and --workers must be at least 1')
  if WORKERS.value > len(os.sched_getaffinity(0)):
    raise UserError(f'--workers={WORKERS.value} is more than the '
                    f'{len(os.sched_getaffinity(0))} CPU cores')
  sweep = sweep_lib.load(SWEEP.value)
  base = sweep_lib.check(sweep, config)
  trials = sweep.trials if TRIALS.value is None else TRIALS.value
  os.makedirs(workdir, exist_ok=True)
  url = _url(workdir)
  storage = storage_lib.open_storage(
      url, interval=sweep.heartbeat_seconds, grace=sweep.grace_seconds,
      max_retries=sweep.max_retries)
  study = study_lib.open_study(storage, STUDY.value, sweep, config,
                               storage_lib.shown(url), worker=WORKER.value)
  total = study_lib.size(sweep, trials)
  logging.info('Study %r in %s: %s of %d trials finished.', STUDY.value,
               storage_lib.shown(url), study_lib.counts(study)['finished'],
               total)
  if WORKERS.value > 1:
    code = _spawn_workers(WORKERS.value, url)
    if code:
      sys.exit(f'capjax: error: a worker exited with {code}; rerun the same '
               'command to continue the study')
    done = study_lib.counts(study)['finished'] >= total
  else:
    # Only here, where trials train: a tuner that starts --workers, or
    # reports, needs neither JAX nor orbax (1 s of imports, and the
    # TensorFlow that the training logs import).
    # pylint: disable=g-import-not-at-top
    import jax
    from capjax import checkpoint
    from capjax import train
    from capjax.tuning import trial as trial_lib
    # pylint: enable=g-import-not-at-top
    checkpoint.quiet_reported_failures()
    logging.info('Worker %d; devices: %s', WORKER.value, jax.local_devices())
    objective = trial_lib.Objective(study, sweep, base, workdir,
                                    train.train_and_evaluate)
    # SIGTERM outside a training run (which saves and stops at its own)
    # ends the worker before its next trial.
    terms = []
    previous = signal.signal(signal.SIGTERM, lambda *_: terms.append(1))
    try:
      done = study_lib.work(study, objective, total,
                            poll_seconds=sweep.heartbeat_seconds,
                            stopping=lambda: bool(terms))
    except KeyboardInterrupt:  # Ctrl-C; its trial was queued again.
      done = False
    finally:
      signal.signal(signal.SIGTERM, previous)
  if not done:
    if REPORT.value:  # Not a --workers child: the tuner says it once.
      print('Stopped by a signal, the running trial\'s checkpoint saved; '
            'run the same command again to continue the study.', flush=True)
    return
  if REPORT.value:
    print(results.report(study, workdir), flush=True)


def main(argv):
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    if MODE.value == 'report':
      report(WORKDIR.value)  # Reads the study only: no JAX, no orbax.
    else:
      if CONFIG.value is None:
        raise UserError('--config is required to tune (e.g. '
                        '--config=configs/shapes.py)')
      tune(cli.load_config(CONFIG), WORKDIR.value)
  except UserError as e:
    sys.exit(f'capjax: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
