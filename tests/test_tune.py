"""capjax.tune: sweeps checked, real SQLite and journal studies, trials that
train configs/test.py, pruning, kill -9 and resume, two workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest

from capjax import config as config_lib
from capjax import tune
from capjax.errors import UserError
from capjax.tuning import results
from capjax.tuning import storage as storage_lib
from capjax.tuning import study as study_lib
from capjax.tuning import sweep as sweep_lib
import preload
from conftest import REPO, chromium, chromium_flags, imported_modules

State = optuna.trial.TrialState
# The password in the storage URLs below: it must never be shown.
SECRET = 's3cret'


@pytest.fixture(autouse=True)
def no_storage_from_the_shell(monkeypatch):
  """A CAPJAX_STORAGE exported in the shell would take these tests'
  studies (and their tuner subprocesses') there."""
  monkeypatch.delenv(tune.STORAGE_ENV, raising=False)


def _sweep_file(tmp_path, body: str, name='sweep.py') -> str:
  path = tmp_path / name
  path.write_text('from capjax.tuning.sweep import *\n\n'
                  f'def get_sweep():\n  return {body}\n')
  return str(path)


def _tune(*args, data_dir, wait=True, python=(), **kwargs):
  cmd = [sys.executable, *python, '-m', 'capjax.tune',
         '--config=configs/test.py', f'--config.data.data_dir={data_dir}',
         *args]
  proc = preload.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, **kwargs)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def _study(workdir, storage=None) -> optuna.Study:
  return optuna.load_study(
      study_name='capjax',
      storage=storage or storage_lib.default_url(str(workdir)))


# --------------------------------------------------------- the sweep file


def test_shipped_sweeps_fit_their_configs():
  from configs import coco, shapes  # pylint: disable=g-import-not-at-top
  for name, config in (('shapes', shapes), ('coco', coco),
                       ('shapes_transformer', shapes)):
    sweep = sweep_lib.load(os.path.join(REPO, 'configs', 'sweeps',
                                        f'{name}.py'))
    base = sweep_lib.check(sweep, config.get_config())
    assert base.train.num_steps < config.get_config().train.num_steps
    # Trial 0 is the shipped config's own values of the whole space.
    shipped = {k: config_lib.field(config.get_config(), k)
               for k in sweep.space}
    assert sweep.enqueue[0] == shipped


@pytest.mark.parametrize('body, message', [
    ("Sweep(space={'train.learnig_rate': log_uniform(1e-4, 1e-2)})",
     r'--config.train.learnig_rate, which the config does not have; did '
     r'you mean train.learning_rate'),
    ('Sweep(space={})', 'the search space is empty'),
    ("Sweep(space={'batch_size': categorical(8, 16)}, metric='val_CIDEr-D')",
     r"optimises 'val_CIDEr-D', which training does not log; it logs "
     r'val_loss, .*val_CIDEr'),
    ("Sweep(space={'batch_size': categorical(8, 16)}, "
     "overrides={'evals.val.every_steps': -1})",
     'no validation evaluator runs during training'),
    ("Sweep(space={'train.learning_rate': uniform(0.1, 1.0)}, sampler='grid')",
     'the grid sampler needs a finite set of values'),
    ("Sweep(space={'batch_size': uniform(8.0, 16.0)})",
     r'--config.batch_size=8.0'),
    ("Sweep(space={'model.decoder.dropout': uniform(0.0, 1.0)})",
     r"space\['model.decoder.dropout'\] reaches 1.0: .*must be in \[0, 1\)"),
    ("Sweep(space={'batch_size': categorical(8)}, sampler='bayes')",
     "unknown sampler 'bayes'"),
    ("Sweep(space={'batch_size': [8, 16]})", 'not a distribution'),
    ("Sweep(space={'batch_size': categorical(8)}, "
     "enqueue=[{'batch_size': 8, 'seed': 1}])",
     r"enqueue\[0\] sets \['seed'\], which the space does not search"),
    ('dict(space={})', 'returned a dict, not a capjax.tuning.sweep.Sweep'),
    ("Sweep(space={'batch_size': categorical(8)}, heartbeat_seconds=60, "
     'grace_seconds=30)', r'0 < heartbeat_seconds \(60\) < grace_seconds'),
])
def test_a_bad_sweep_is_one_line(tmp_path, test_config, body, message):
  path = _sweep_file(tmp_path, body)
  with pytest.raises(UserError, match=message):
    sweep_lib.check(sweep_lib.load(path), test_config)


def test_a_sweep_file_that_fails_to_load(tmp_path):
  with pytest.raises(UserError, match='no such file'):
    sweep_lib.load(str(tmp_path / 'missing.py'))
  path = tmp_path / 'empty.py'
  path.write_text('X = 1\n')
  with pytest.raises(UserError, match='has no get_sweep'):
    sweep_lib.load(str(path))
  path.write_text('def get_sweep():\n  return 1 / 0\n')
  with pytest.raises(UserError, match='ZeroDivisionError'):
    sweep_lib.load(str(path))


def test_apply_sets_nested_fields_on_a_copy(test_config):
  out = sweep_lib.apply(test_config, {'train.learning_rate': 0.5,
                                      'evals.val.every_steps': 2})
  assert (out.train.learning_rate, out.evals.val.every_steps) == (0.5, 2)
  assert test_config.train.learning_rate != 0.5


# ----------------------------------------------------- storage and study


@pytest.mark.parametrize('url, message', [
    ('nosuchdb://user@host/db', r"cannot open --storage=nosuchdb://user@host/"
     r"db: NoSuchModuleError: Can't load plugin"),
    ('sqlite:////nonexistent/folder/study.db', 'cannot open --storage='
     'sqlite:////nonexistent/folder/study.db: OperationalError'),
    ('study.db', r'cannot open --storage=study.db: ArgumentError.*\(a '
     r'database URL, or journal:PATH\)'),
    ('journal:/nonexistent/folder/study.log', 'no folder /nonexistent'),
])
def test_a_storage_that_cannot_be_opened_is_one_line(url, message):
  with pytest.raises(UserError, match=message):
    storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)


@pytest.mark.parametrize('url, want', [
    ('postgresql://alice:s3cret@db.example:5432/study',
     'postgresql://alice:***@db.example:5432/study'),
    ('postgresql+psycopg://alice:s3cret%40x@h/db?sslmode=require',
     'postgresql+psycopg://alice:***@h/db?sslmode=require'),
    # Unescaped '@' and '/': SQLAlchemy would read 't@h' as the host.
    ('postgresql://alice:s3c/re@t@h/db', 'postgresql://alice:***@h/db'),
    ('postgresql://h/db?user=alice&password=s3cret',
     'postgresql://h/db?user=alice&password=***'),
    # What SQLAlchemy cannot parse: no scheme, a bad port, no '@host'.
    ('alice:s3cret@h/db', 'alice:***@h/db'),
    ('mysql://alice:s3cret@h:port/db', 'mysql://alice:***@h:port/db'),
    ('postgresql://alice:s3cret/db', 'postgresql://alice:***/db'),
    # Nothing to hide.
    ('postgresql://alice@h:5432/db', 'postgresql://alice@h:5432/db'),
    ('sqlite:////runs/tune@2/study.db', 'sqlite:////runs/tune@2/study.db'),
    ('journal:/shared/a:b@c/study.log', 'journal:/shared/a:b@c/study.log'),
    ('study.db', 'study.db'),
])
def test_a_storage_url_is_shown_without_its_password(url, want):
  assert storage_lib.shown(url) == want


@pytest.mark.parametrize('url, message', [
    # Nothing listens there; without a PostgreSQL driver installed, the
    # driver is what is missing.
    ('postgresql://alice:s3cret@127.0.0.1:{port}/study',
     r'cannot open --storage=postgresql://alice:\*\*\*@127.0.0.1:\d+/study: '
     r'(ImportError: Failed to import DB access module|'
     r'OperationalError: .*refused)'),
    ('alice:s3cret@127.0.0.1/study', r'cannot open --storage=alice:\*\*\*@'
     r'127.0.0.1/study: ArgumentError: Could not parse'),
    # The error quotes what it took for a port.
    ('postgresql://alice:s3cret/study', r'cannot open --storage=postgresql://'
     r"alice:\*\*\*/study: ValueError: invalid literal .*: '\*\*\*'$"),
])
def test_a_storage_that_cannot_be_opened_hides_its_password(url, message):
  with socket.socket() as closed:  # Bound, not listening: refused.
    closed.bind(('127.0.0.1', 0))
    url = url.format(port=closed.getsockname()[1])
    with pytest.raises(UserError, match=message) as error:
      storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)
  assert SECRET not in str(error.value)
  assert '\n' not in str(error.value)


def _one_field_sweep(**kwargs) -> sweep_lib.Sweep:
  return sweep_lib.Sweep(
      space={'train.learning_rate': sweep_lib.log_uniform(1e-4, 1e-2)},
      **kwargs)


def test_a_study_refuses_another_space_objective_or_config(tmp_path,
                                                           test_config):
  url = storage_lib.default_url(str(tmp_path))
  storage = storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)
  sweep = _one_field_sweep()
  study = study_lib.open_study(storage, 'capjax', sweep, test_config, url)
  study.enqueue_trial({'train.learning_rate': 1e-3})
  before = os.path.getsize(tmp_path / 'study.db'), len(study.trials)
  other = sweep_lib.Sweep(
      space={'train.learning_rate': sweep_lib.log_uniform(1e-5, 1e-2)})
  with pytest.raises(UserError, match=r'created with another search space '
                     r'\(space.train.learning_rate: .*"low": 0.0001.* -> '
                     r'.*"low": 1e-05'):
    study_lib.open_study(storage, 'capjax', other, test_config, url)
  with pytest.raises(UserError, match='created with another objective'):
    study_lib.open_study(storage, 'capjax', _one_field_sweep(
        metric='val_loss', direction='minimize'), test_config, url)
  changed = sweep_lib.apply(test_config, {'batch_size': 16})
  with pytest.raises(UserError, match=r'created with another config '
                     r'\(config.batch_size: 8 -> 16\)'):
    study_lib.open_study(storage, 'capjax', sweep, changed, url)
  # Nothing was changed by the refusals; the same sweep opens it again.
  assert (os.path.getsize(tmp_path / 'study.db'), len(study.trials)) == before
  study_lib.open_study(storage, 'capjax', sweep, test_config, url)


@pytest.mark.filterwarnings('ignore:Heartbeat of storage is supposed')
@pytest.mark.parametrize('kind', ['sqlite', 'journal'])
def test_a_trial_whose_heartbeat_stops_is_queued_again(tmp_path, kind):
  url = (storage_lib.default_url(str(tmp_path)) if kind == 'sqlite' else
         f'journal:{tmp_path}/study.log')
  storage = storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)
  study = optuna.create_study(storage=storage, study_name='s')
  x = {'x': optuna.distributions.FloatDistribution(0, 1)}

  def beating(trial):  # Optuna's heartbeat thread runs meanwhile.
    trial.suggest_float('x', 0, 1)
    time.sleep(3.5)  # Longer than the grace period, but beating.
    study_lib._fail_stale(study)  # pylint: disable=protected-access
    assert study.trials[trial.number].state == State.RUNNING
    return 1.0

  study.optimize(beating, n_trials=1)
  assert study.trials[0].state == State.COMPLETE
  # A worker that dies: its trial beat once, then never again.
  trial = study.ask(x)
  trial.report(0.5, 3)
  storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access
  time.sleep(1)
  study_lib._fail_stale(study)  # pylint: disable=protected-access
  assert study.trials[1].state == State.RUNNING
  time.sleep(2)
  study_lib._fail_stale(study)  # pylint: disable=protected-access
  _, failed, retry = study.trials
  assert failed.state == State.FAIL and retry.state == State.WAITING
  assert retry.params == failed.params
  assert retry.system_attrs['failed_trial'] == 1
  assert retry.intermediate_values == {3: 0.5}
  assert study_lib.counts(study) == {'finished': 1, 'running': 0,
                                     'waiting': 1}


# Takes queued trials as a worker does, from a go on stdin (so that all
# start together), until none is left; prints the numbers it got.
_POPPER = """
import json, sys, optuna
from capjax.tuning import storage as storage_lib
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name='s', storage=storage_lib.open_storage(
    sys.argv[1], interval=60, grace=120, max_retries=0))
print('ready', flush=True)
sys.stdin.readline()
got = []
while study.get_trials(deepcopy=False,
                       states=(optuna.trial.TrialState.WAITING,)):
  got.append(study.ask().number)
print(json.dumps(got))
"""


@pytest.mark.filterwarnings('ignore:Heartbeat of storage is supposed')
def test_workers_never_take_the_same_queued_trial(tmp_path):
  # The sweep's `enqueue` and every retry queue trials. On SQLite, Optuna
  # alone gave 3 of 30 of them to two workers at once.
  url = storage_lib.default_url(str(tmp_path))
  study = optuna.create_study(storage=storage_lib.open_storage(url),
                              study_name='s')
  for i in range(30):
    study.enqueue_trial({'x': float(i)})
  procs = [subprocess.Popen([sys.executable, '-c', _POPPER, url], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for _ in range(3)]
  for p in procs:
    assert p.stdout.readline() == 'ready\n', p.communicate()[1][-3000:]
  for p in procs:
    p.stdin.write('go\n')
    p.stdin.flush()
  taken = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    taken += json.loads(out)
  queued = [t for t in taken if t < 30]
  assert sorted(queued) == list(range(30))  # Each once, by one worker.


# ------------------------------------------------------------ the results


def test_results_table_and_best_config(tmp_path, test_config):
  url = storage_lib.default_url(str(tmp_path))
  storage = storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)
  sweep = sweep_lib.Sweep(
      space={'train.learning_rate': sweep_lib.log_uniform(1e-4, 1e-2),
             'batch_size': sweep_lib.categorical(8, 16)},
      overrides={'train.num_steps': 3})
  study = study_lib.open_study(storage, 'capjax', sweep, test_config, url)
  dists = sweep.space
  for value, lr, state in ((0.2, 1e-3, State.COMPLETE),
                           (0.7, 2e-3, State.COMPLETE),
                           (None, 3e-3, State.PRUNED),
                           (None, 4e-3, State.FAIL)):
    study.add_trial(optuna.create_trial(
        state=state, value=value, params={'train.learning_rate': lr,
                                          'batch_size': 16},
        distributions=dists, intermediate_values={3: value or 0.1},
        user_attrs={'workdir': str(tmp_path / 'trials' / f'{lr}'),
                    **({'error': 'bad | thing'} if state == State.FAIL
                       else {})}))
  text = results.report(study, str(tmp_path))
  rows = [l.split(' | ') for l in
          (tmp_path / 'results.md').read_text().splitlines()[2:]]
  assert [r[0] for r in rows] == ['| 1', '| 0', '| 2', '| 3']
  assert [r[5] for r in rows] == ['complete', 'complete', 'pruned',
                                  'failed: bad / thing']
  assert 'Best: trial 1, 0.7000' in text
  # The best config is a config file: the base config (not the sweep's
  # overrides) with the best trial's values.
  spec = {}
  exec((tmp_path / 'best_config.py').read_text(), spec)  # pylint: disable=exec-used
  got = spec['get_config']()
  want = sweep_lib.apply(test_config, {'train.learning_rate': 2e-3,
                                       'batch_size': 16})
  assert got.to_dict() == want.to_dict()
  assert got.train.num_steps == test_config.train.num_steps
  for name in ('optimization_history', 'intermediate_values',
               'parallel_coordinate', 'param_importances'):
    assert (tmp_path / 'plots' / f'{name}.png').read_bytes()[:4] == (
        b'\x89PNG')
    if chromium():  # The page draws its plot offline, beside plotly.min.js.
      dom = subprocess.run(
          [chromium(), *chromium_flags(), '--virtual-time-budget=5000',
           '--dump-dom', (tmp_path / 'plots' / f'{name}.html').as_uri()],
          capture_output=True, text=True, timeout=120, check=False).stdout
      assert 'class="main-svg"' in dom, name


# ------------------------------------------------------- tuning end to end


def test_a_three_trial_sweep_prunes_and_writes_its_results(
    tmp_path, shapes_data_dir, test_config):
  # Trial 0 learns, trial 1 cannot (a rate of 1e-9): at step 3 its
  # validation loss is above the median, so the pruner stops it there.
  sweep = _sweep_file(tmp_path, (
      "Sweep(space={'train.learning_rate': categorical(1e-2, 1e-9, 3e-3)}, "
      # No trial decodes the test split at its end: nothing here reads it.
      "overrides={'evals.test.every_steps': -1}, "
      "metric='val_loss', direction='minimize', trials=3, pruner='median', "
      'pruner_startup_trials=1, startup_trials=1, '
      "enqueue=[{'train.learning_rate': 1e-2}, "
      "{'train.learning_rate': 1e-9}])"))
  workdir = tmp_path / 'tune'
  code, out, err = _tune(f'--sweep={sweep}', f'--workdir={workdir}',
                         data_dir=shapes_data_dir)
  assert code == 0, err[-3000:]
  trials = _study(workdir).trials
  assert len(trials) == 3
  assert trials[0].state == State.COMPLETE
  assert trials[1].state == State.PRUNED
  assert max(trials[1].intermediate_values) == 3
  assert trials[0].value < trials[1].intermediate_values[3]
  assert 'Trial 1 pruned. val_loss=' in err
  # Each trial trained in its own workdir, with checkpoints (a pruned one's
  # up to the step it was stopped at).
  assert sorted(os.listdir(workdir / 'trials' / '0000' / 'checkpoints')) == [
      '3', '6']
  assert os.listdir(workdir / 'trials' / '0001' / 'checkpoints') == ['3']
  # The table, printed and written.
  table = (workdir / 'results.md').read_text()
  assert table in out
  assert table.splitlines()[0] == (
      '| trial | train.learning_rate | val_loss | steps | state | workdir |')
  assert '| 1 | 1e-09 |' in table and '| 3 | pruned | trials/0001 |' in table
  best = min((t for t in trials if t.state == State.COMPLETE),
             key=lambda t: t.value)
  spec = {}
  exec((workdir / 'best_config.py').read_text(), spec)  # pylint: disable=exec-used
  want = sweep_lib.apply(test_config, best.params)
  assert spec['get_config']().to_dict() == want.to_dict()
  for name in ('optimization_history', 'intermediate_values',
               'parallel_coordinate'):
    assert (workdir / 'plots' / f'{name}.png').stat().st_size > 1000
    assert (workdir / 'plots' / f'{name}.html').stat().st_size > 1000
  # --mode=report needs the workdir only, and writes the same table.
  os.remove(workdir / 'results.md')
  report = subprocess.run(
      [sys.executable, '-m', 'capjax.tune', '--mode=report',
       f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True,
      check=False)
  assert report.returncode == 0, report.stderr[-2000:]
  assert (workdir / 'results.md').read_text() == table


def test_a_killed_tuner_resumes_its_trial_from_the_checkpoint(
    tmp_path, shapes_data_dir):
  sweep = _sweep_file(tmp_path, (
      "Sweep(space={'train.learning_rate': log_uniform(1e-3, 1e-2)}, "
      "overrides={'train.num_steps': 12, 'train.checkpoint_every_steps': 2, "
      "'evals.val.every_steps': 4, 'evals.test.every_steps': -1}, trials=1, "
      "pruner='none', "
      'heartbeat_seconds=1, grace_seconds=4)'))
  workdir = tmp_path / 'tune'
  args = (f'--sweep={sweep}', f'--workdir={workdir}')
  proc = _tune(*args, data_dir=shapes_data_dir, wait=False)
  saved = workdir / 'trials' / '0000' / 'checkpoints'
  deadline = time.monotonic() + 400
  while not (saved.is_dir() and '4' in os.listdir(saved)):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  last = max(int(s) for s in os.listdir(saved) if s.isdigit())
  assert 4 <= last < 12
  assert [t.state for t in _study(workdir).trials] == [State.RUNNING]

  code, out, err = _tune(*args, data_dir=shapes_data_dir)
  assert code == 0, err[-3000:]
  trials = _study(workdir).trials
  # Trial 0 went stale, was failed, and its retry (trial 1) trained on in
  # its workdir from its last checkpoint to the end.
  assert [t.state for t in trials] == [State.FAIL, State.COMPLETE]
  assert trials[1].system_attrs['failed_trial'] == 0
  assert trials[1].params == trials[0].params
  assert trials[1].user_attrs['workdir'] == str(workdir / 'trials' / '0000')
  assert f'Restored step {last} from {saved}' in err
  assert set(trials[0].intermediate_values) <= set(
      trials[1].intermediate_values)
  assert max(trials[1].intermediate_values) == 12
  assert os.listdir(workdir / 'trials') == ['0000']
  assert 'interrupted; retried as 1' in out


def test_workers_get_the_storage_in_their_environment_not_argv(
    monkeypatch):
  url = f'postgresql://alice:{SECRET}@db.example/study'
  started = []

  class Worker:  # What _spawn_workers uses of a Popen.
    pid = 0

    def __init__(self, argv, env, preexec_fn):
      del preexec_fn  # It would pin this process to a core.
      started.append((argv, env))

    def poll(self):
      return 0

    def wait(self):
      return 0

  monkeypatch.setattr(tune.subprocess, 'Popen', Worker)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  # Every way absl takes the flag.
  monkeypatch.setattr(sys, 'argv', [
      'capjax/tune.py', '--config=configs/test.py', f'--storage={url}',
      '--storage', url, f'-storage={url}', '--workers=2', '--trials=4'])
  assert tune._spawn_workers(2, url) == 0  # pylint: disable=protected-access
  assert [argv[3:] for argv, _ in started] == [
      ['--config=configs/test.py', '--trials=4', '--workers=1',
       f'--worker={i}', '--noreport'] for i in range(2)]
  assert all(SECRET not in ' '.join(argv) for argv, _ in started)
  assert [env['CAPJAX_STORAGE'] for _, env in started] == [url, url]


def test_a_password_in_the_storage_url_stays_out_of_logs_and_results(
    tmp_path, shapes_data_dir, test_config):
  # SQLite ignores a URI parameter it does not know: a study whose URL
  # holds a password, as a database server's does.
  url = f'sqlite:///file:{tmp_path}/study.db?password={SECRET}&uri=true'
  path = _sweep_file(tmp_path, (
      "Sweep(space={'train.learning_rate': categorical(1e-2, 3e-3)}, "
      "trials=1)"))
  sweep = sweep_lib.load(path)
  storage = storage_lib.open_storage(url, interval=1, grace=2, max_retries=1)
  study = study_lib.open_study(storage, 'capjax', sweep, test_config,
                               'the test')
  workdir = tmp_path / 'tune'
  study.add_trial(optuna.create_trial(
      value=0.5, params={'train.learning_rate': 1e-2},
      distributions=sweep.space,
      user_attrs={'workdir': str(workdir / 'trials' / '0000')}))
  # The study has its trial: the tuner, given the URL in the environment,
  # logs where the study is and writes the results.
  code, out, err = _tune(f'--sweep={path}', f'--workdir={workdir}',
                         data_dir=shapes_data_dir,
                         env=dict(os.environ, CAPJAX_STORAGE=url))
  assert code == 0, err[-3000:]
  assert (f"Study 'capjax' in sqlite:///file:{tmp_path}/study.db?"
          'password=***&uri=true: 1 of 1 trials finished') in err
  written = [(workdir / name).read_text()
             for name in (results.TABLE, results.BEST_CONFIG)]
  assert all(SECRET not in text for text in [out, err, *written])
  # --storage wins over the environment (whose URL would not open).
  # (-X importtime: the report reads the study, and imports no JAX.)
  report = subprocess.run(
      [sys.executable, '-X', 'importtime', '-m', 'capjax.tune',
       '--mode=report', f'--workdir={workdir}', f'--storage={url}'], cwd=REPO,
      capture_output=True, text=True, check=False,
      env=dict(os.environ, CAPJAX_STORAGE='postgresql://bob:hunter2@'
               '127.0.0.1:1/study'))
  assert report.returncode == 0, report.stderr[-2000:]
  assert 'Best: trial 0, 0.5000' in report.stdout
  assert SECRET not in report.stdout + report.stderr
  imported = imported_modules(report.stderr)
  assert 'optuna' in imported
  assert not {'jax', 'orbax', 'tensorflow'} & imported


def _trained_once(workdir) -> bool:
  """One training job wrote this trial's logs: a second would have
  started another TensorBoard events file."""
  events = [f for f in os.listdir(workdir) if f.startswith('events.out')]
  return len(events) == 1


@pytest.mark.parametrize('how', ['workers', 'slurm_array'])
def test_two_workers_share_one_study(tmp_path, shapes_data_dir, how):
  sweep = _sweep_file(tmp_path, (
      "Sweep(space={'train.learning_rate': log_uniform(1e-3, 1e-2)}, "
      # Long enough that the second worker has started before the first
      # trial ends.
      "overrides={'train.num_steps': 12, 'evals.val.every_steps': 6, "
      "'train.checkpoint_every_steps': 6, 'evals.test.every_steps': -1}, "
      "trials=2, pruner='none', heartbeat_seconds=5, grace_seconds=60)"))
  workdir = tmp_path / 'tune'
  if how == 'workers':
    # (-X importtime, for this process only: the tuner that starts the
    # workers imports neither JAX nor orbax, nor TensorFlow.)
    code, _, err = _tune(f'--sweep={sweep}', f'--workdir={workdir}',
                         '--workers=2', data_dir=shapes_data_dir,
                         python=('-X', 'importtime'))
    assert code == 0, err[-3000:]
    imported = imported_modules(err)
    assert 'optuna' in imported
    assert not {'jax', 'orbax', 'tensorflow'} & imported
    storage = None
  else:
    # The SLURM script, as two array tasks would run it, on a journal file.
    env = dict(os.environ, CONFIG='configs/test.py', SWEEP=sweep,
               WORKDIR=str(workdir), PYTHON=sys.executable)
    procs = [subprocess.Popen(
        ['bash', 'launch/slurm_tune.sbatch',
         f'--config.data.data_dir={shapes_data_dir}'], cwd=REPO,
        env=dict(env, SLURM_ARRAY_TASK_ID=str(i)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
    storage = storage_lib.open_storage(f'journal:{workdir}/study.journal')
  trials = _study(workdir, storage).trials
  assert [t.state for t in trials] == [State.COMPLETE] * 2
  # Each trial ran once, in its own workdir, by its own worker process.
  workers = {t.user_attrs['worker'] for t in trials}
  assert len(workers) == 2, workers
  dirs = {t.user_attrs['workdir'] for t in trials}
  assert dirs == {str(workdir / 'trials' / n) for n in ('0000', '0001')}
  assert all(_trained_once(d) for d in dirs)
  assert trials[0].params != trials[1].params
