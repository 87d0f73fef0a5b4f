"""Real signals at every phase of a job, and a process of a job killed.

Each test starts `python -m capjax.main` (or two of them), waits for a line
of its log that marks the phase, signals or kills, and checks the end: one
line on stderr and no traceback, the exit status, nothing left half-written
(no temporary file, the checkpoints intact). Every wait is bounded, and every
process runs in its own process group, killed when the test ends.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from capjax import stopping
import preload
from conftest import REPO
from conftest import copy_build
from conftest import saved_state
from conftest import xla_flags

# The phases are short on the tiny build: a job that misses its moment (a
# slow machine) fails its wait, never hangs.
_PHASE_SECONDS = 120
_STOP_SECONDS = 60


class _Job:
  """One `python -m capjax.main` (or a script standing in for it), its
  stderr in a file to poll."""

  def __init__(self, tmp_path, args, name='job', env=None, prelude=None):
    self.err_path = tmp_path / f'{name}.err'
    self.out_path = tmp_path / f'{name}.out'
    if prelude:  # Code run before capjax.main, as if it were the module.
      cmd = [sys.executable, '-c', prelude +
             '\nimport runpy, sys\nsys.argv = ["capjax.main"] + sys.argv[1:]'
             '\nrunpy.run_module("capjax.main", run_name="__main__")', *args]
    else:
      cmd = [sys.executable, '-m', 'capjax.main', *args]
    with open(self.err_path, 'w') as err, open(self.out_path, 'w') as out:
      self.proc = preload.Popen(
          cmd, cwd=REPO, env=dict(os.environ, **env or {}),
          stdout=out, stderr=err, start_new_session=True)

  @property
  def err(self) -> str:
    return self.err_path.read_text()

  def wait_for(self, text: str, timeout: float = _PHASE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while text not in self.err:
      assert self.proc.poll() is None, (
          f'ended ({self.proc.returncode}) before {text!r}:\n'
          + self.err[-3000:])
      assert time.monotonic() < deadline, f'no {text!r} in:\n{self.err[-3000:]}'
      time.sleep(0.05)

  def signal(self, sig) -> float:
    self.proc.send_signal(sig)
    return time.monotonic()

  def finish(self, timeout: float = _STOP_SECONDS) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pytest.fail(f'still running {timeout} s later:\n{self.err[-3000:]}')

  def kill(self) -> None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def jobs():
  started = []
  yield lambda *args, **kwargs: started.append(_Job(*args, **kwargs)) or (
      started[-1])
  for job in started:
    job.kill()


def _base(workdir, data_dir, *extra):
  return ['--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}',
          '--config.evals.val.num_batches=1', *extra]


def _assert_stopped(job, rc: int, code: int, *wanted: str) -> str:
  """One line at the end of stderr, with `wanted` in it; no traceback."""
  err = job.err
  assert rc == code, err[-3000:]
  for bad in ('Traceback', 'Fatal Python error', 'KeyboardInterrupt',
              'Segmentation fault', 'Check failure'):
    assert bad not in err, err[-3000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith('capjax: '), err[-3000:]
  assert [l for l in err.splitlines() if l.startswith('capjax: ')] == [line]
  for want in wanted:
    assert want in line, err[-3000:]
  return line


def _temporaries(*folders) -> list[str]:
  """What a write cut short would leave: capjax's `.tmp-` files, orbax's
  unfinished steps, TFDS's `incomplete.` folders."""
  found = []
  for folder in folders:
    for root, dirs, names in os.walk(folder):
      found += [os.path.join(root, n) for n in dirs + names
                if '.tmp' in n or 'orbax-checkpoint-tmp' in n
                or n.startswith('incomplete.')]
  return found


def _digest(folder) -> dict[str, str]:
  """Every file under `folder`, by path, with its content's hash."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      path = os.path.join(root, n)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


@pytest.fixture
def workdir(trained_workdir, tmp_path) -> str:
  """A copy of the workdir trained to step 6 (checkpoints 3 and 6)."""
  path = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, path)
  return path


def test_sigint_at_start_up_is_one_line(jobs, shapes_data_dir, tmp_path):
  workdir = tmp_path / 'new'
  job = jobs(tmp_path, _base(workdir, shapes_data_dir))
  job.wait_for('Initialising the model (compiling')
  sent = job.signal(signal.SIGINT)
  rc = job.finish()
  _assert_stopped(job, rc, 130, 'stopped by SIGINT during start-up; nothing '
                  'was written half-way; no checkpoint was written yet')
  assert time.monotonic() - sent < 10
  assert not _temporaries(workdir)
  assert os.listdir(workdir / 'checkpoints') == []


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM],
                         ids=['SIGINT', 'SIGTERM'])
def test_signal_while_restoring_keeps_the_checkpoints(jobs, workdir,
                                                      shapes_data_dir,
                                                      tmp_path, sig):
  before = _digest(os.path.join(workdir, 'checkpoints'))
  job = jobs(tmp_path, _base(workdir, shapes_data_dir,
                             '--config.train.num_steps=12'))
  job.wait_for('Vocabulary: ')  # Restoring (or compiling) comes next.
  job.signal(sig)
  rc = job.finish()
  _assert_stopped(job, rc, 128 + sig, f'stopped by {sig.name} during '
                  'start-up', 'the last checkpoint is step 6 (the same '
                  'command resumes from it)')
  assert _digest(os.path.join(workdir, 'checkpoints')) == before
  assert not _temporaries(workdir)


# A job's prelude: SIGINT arrives inside orbax's restore, and the restore
# (as a library may) makes of the guard's `Stopped` an error of its own, or
# drops it and goes on.
_RESTORE_MEETS_A_SIGNAL = '''
import os, signal
import orbax.checkpoint as ocp
_restore = ocp.CheckpointManager.restore
def _restore_with_a_signal(self, *args, **kwargs):
  try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100):  # Python runs the handler between two of these.
      pass
  except KeyboardInterrupt:
    if {error}:
      raise ValueError('interrupted') from None
  return _restore(self, *args, **kwargs)
ocp.CheckpointManager.restore = _restore_with_a_signal
'''


@pytest.mark.parametrize('error', [True, False],
                         ids=['turned_into_an_error', 'dropped'])
def test_a_signal_a_library_mishandles_still_stops_the_job(
    jobs, workdir, shapes_data_dir, tmp_path, error):
  # Not a checkpoint that did not read (which would be set aside and the
  # one before restored), nor a job that trains on.
  before = _digest(os.path.join(workdir, 'checkpoints'))
  job = jobs(tmp_path, _base(workdir, shapes_data_dir,
                             '--config.train.num_steps=12'),
             prelude=_RESTORE_MEETS_A_SIGNAL.format(error=error))
  _assert_stopped(job, job.finish(), 130, 'stopped by SIGINT during start-up',
                  'the last checkpoint is step 6')
  assert _digest(os.path.join(workdir, 'checkpoints')) == before
  assert 'unreadable' not in job.err


def _slowed(module: str, function: str) -> str:
  """A job's prelude that makes capjax.data.`module`.`function` take 20 ms
  more a call: long enough a phase to be signalled in the middle of it."""
  return (f'import time\nfrom capjax.data import {module}\n'
          f'_original = {module}.{function}\n'
          'def _slow(*args):\n  time.sleep(0.02)\n  return _original(*args)\n'
          f'{module}.{function} = _slow\n')


# The copy of the train split then lasts about 3 s.
_SLOW_COPY = _slowed('resized', '_encode_example')


def test_sigint_during_the_data_build_leaves_no_part(jobs, shapes_data_dir,
                                                     tmp_path):
  # A data dir of its own, without the copy at 32 px, which it makes.
  data_dir = tmp_path / 'tfds'
  copy_build(shapes_data_dir, data_dir)
  job = jobs(tmp_path, _base(tmp_path / 'run', data_dir), prelude=_SLOW_COPY)
  job.wait_for('Copying train (256 images)')
  time.sleep(1)  # In the middle of the shard.
  job.signal(signal.SIGINT)
  rc = job.finish()
  _assert_stopped(job, rc, 130, 'stopped by SIGINT during start-up; nothing '
                  'was written half-way')
  assert not _temporaries(data_dir, tmp_path / 'run')
  copy = [os.path.join(r, n) for r, _, names in os.walk(data_dir)
          for n in names if 'px' in r]
  assert not [p for p in copy if p.endswith('train.json')], copy


_SLOW_CACHE = _slowed('feature_cache', 'encode_record')


def test_sigterm_while_caching_features_leaves_no_part(jobs, shapes_data_dir,
                                                       tmp_path):
  data_dir = tmp_path / 'tfds'
  copy_build(shapes_data_dir, data_dir, copies=True)
  job = jobs(tmp_path, _base(
      tmp_path / 'run', data_dir, '--mode=cache_features',
      '--config.seed=17',  # An encoder, so a cache, of this test's own.
      '--config.model.encoder.frozen=True',
      '--config.train.allow_random_frozen_encoder=True',
      '--config.data.features.use=True'), prelude=_SLOW_CACHE)
  job.wait_for('Encoding train')
  time.sleep(1)
  job.signal(signal.SIGTERM)
  rc = job.finish()
  _assert_stopped(job, rc, 143, 'stopped by SIGTERM while caching features; '
                  'nothing was written half-way')
  assert not _temporaries(data_dir, tmp_path / 'run')


def test_sigint_in_the_loop_saves_and_exits_0(jobs, workdir, shapes_data_dir,
                                              tmp_path):
  job = jobs(tmp_path, _base(workdir, shapes_data_dir,
                             '--config.train.num_steps=100000',
                             '--config.train.log_every_steps=1',
                             # The only new checkpoint: the signal's.
                             '--config.train.checkpoint_every_steps=100000',
                             '--config.evals.val.every_steps=-1'))
  job.wait_for('] [7] train/')  # Resumed, compiled, stepping.
  job.signal(signal.SIGINT)
  rc = job.finish()
  err = job.err
  assert rc == 0, err[-3000:]
  assert 'Traceback' not in err and 'capjax: ' not in err
  saved = [l for l in err.splitlines() if 'SIGINT received: saved step' in l]
  assert len(saved) == 1, err[-3000:]
  step = int(saved[0].split('saved step ')[1].split(',')[0])
  assert step > 7
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')),
                key=int) == ['3', '6', str(step)]
  assert int(saved_state(workdir, step)['step']) == step  # Reads back.
  assert not _temporaries(workdir)


# configs/test.py with two end-of-run decodes, as configs/shapes.py has.
_TWO_DECODES = '''
from capjax import config as config_lib
from configs import test


def get_config():
  config = test.get_config()
  config.evals.test = config_lib.decode_split('test')
  config.evals.test_novel = config_lib.decode_split('test_novel')
  return config
'''


# Each decoded batch takes 0.5 s more: a split of 8 batches lasts about 4 s,
# long enough to be signalled in the middle of it (compiled, the tiny model
# decodes one in 0.2 s).
_SLOW_DECODE = '''
import time
from capjax.evaluators import common
_captions_of = common.captions_of
def _slow(*args):
  time.sleep(0.5)
  return _captions_of(*args)
common.captions_of = _slow
'''


def test_a_signal_in_the_final_decodes_keeps_those_done(jobs, workdir,
                                                        shapes_data_dir,
                                                        tmp_path):
  config = tmp_path / 'two_decodes.py'
  config.write_text(_TWO_DECODES)
  args = [f'--config={config}', f'--workdir={workdir}',
          f'--config.data.data_dir={shapes_data_dir}',
          '--config.evals.val.every_steps=-1']
  job = jobs(tmp_path, args, env={'PYTHONPATH': REPO}, prelude=_SLOW_DECODE)
  # Already trained: the end-of-run evaluators are all that runs.
  job.wait_for('End-of-run evaluator test_novel at step 6')
  job.signal(signal.SIGTERM)
  rc = job.finish()
  _assert_stopped(job, rc, 143, 'stopped by SIGTERM during the end-of-run '
                  'evaluators of step 6: test done, test_novel left undone; '
                  'the same command runs it')
  decoded = sorted(os.listdir(os.path.join(workdir, 'decode')))
  assert decoded == ['test_step6_beam3.json', 'test_step6_beam3_metrics.json']
  assert not _temporaries(workdir)

  # Run again, it decodes what was left, and only that.
  job = jobs(tmp_path, args, name='again', env={'PYTHONPATH': REPO})
  rc = job.finish(_PHASE_SECONDS)
  assert rc == 0, job.err[-3000:]
  assert 'Done at step 6 already: test.' in job.err
  assert job.out_path.read_text().startswith('test_novel at step 6, beam 3')
  assert len(os.listdir(os.path.join(workdir, 'decode'))) == 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(jobs, tmp_path, data_dir, *extra):
  """A 2-process job (2 CPU devices each), started here rather than by the
  launcher, which would stop the others itself when one ends."""
  port = _free_port()
  workdir = tmp_path / 'run'
  return [jobs(tmp_path, _base(
      workdir, data_dir, '--config.train.num_steps=100000', *extra,
      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
      f'--process_id={i}'), name=f'process_{i}',
      env={'XLA_FLAGS': xla_flags(2)})
          for i in range(2)]


@pytest.mark.parametrize('victim', [1, 0])
def test_a_killed_process_stops_the_other(jobs, shapes_data_dir, tmp_path,
                                          victim):
  procs = _two_processes(jobs, tmp_path, shapes_data_dir)
  for p in procs:
    p.wait_for('Vocabulary: ')  # Both in start-up, joined.
  procs[victim].kill()
  killed = time.monotonic()
  survivor = procs[1 - victim]
  rc = survivor.finish()
  seconds = time.monotonic() - killed
  _assert_stopped(survivor, rc, 1, f'process {victim} of 2 was lost; '
                  f'stopping process {1 - victim} too')
  assert seconds < 15, seconds  # JAX alone: 100 s, then an abort.


@pytest.mark.slow  # 40 s on 2 cores: both processes compile the step.
def test_a_process_killed_in_the_loop_stops_the_other(jobs, shapes_data_dir,
                                                      tmp_path):
  procs = _two_processes(jobs, tmp_path, shapes_data_dir,
                         '--config.train.log_every_steps=1',
                         '--config.evals.val.every_steps=-1')
  for p in procs:
    # Stepping past step 6, whose save began only once checkpoint 3 was
    # complete (orbax writes in the background, and a save waits for the
    # one before it): a checkpoint 3 still being written when one process
    # dies is never completed.
    p.wait_for('] [7] train/')
  procs[1].kill()  # Its share of the next step's gradient never comes.
  killed = time.monotonic()
  rc = procs[0].finish()
  seconds = time.monotonic() - killed
  steps = [int(n) for n in os.listdir(tmp_path / 'run' / 'checkpoints')
           if n.isdigit()]
  _assert_stopped(procs[0], rc, 1, 'process 1 of 2 was lost; stopping '
                  'process 0 too; the last checkpoint is step '
                  f'{max(steps)} (the same command resumes from it)')
  assert seconds < 15, seconds


def test_sigint_to_one_process_at_start_up_stops_both(jobs, shapes_data_dir,
                                                      tmp_path):
  procs = _two_processes(jobs, tmp_path, shapes_data_dir)
  for p in procs:
    p.wait_for('Vocabulary: ')
  procs[1].signal(signal.SIGINT)
  rcs = [p.finish() for p in procs]
  _assert_stopped(procs[1], rcs[1], 130,
                  'stopped by SIGINT during start-up')
  _assert_stopped(procs[0], rcs[0], 130, 'process 1 of 2 stopped by SIGINT '
                  'during start-up; stopping process 0 too')


def test_sigterm_to_one_process_in_the_final_decodes_stops_both(
    jobs, workdir, shapes_data_dir, tmp_path):
  config = tmp_path / 'two_decodes.py'
  config.write_text(_TWO_DECODES)
  port = _free_port()
  procs = [jobs(tmp_path, [
      f'--config={config}', f'--workdir={workdir}',
      f'--config.data.data_dir={shapes_data_dir}',
      '--config.evals.val.every_steps=-1',
      # Trained by one process: its data position does not carry over.
      '--config.train.discard_data_state=True',
      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
      f'--process_id={i}'], name=f'process_{i}', env={
          'PYTHONPATH': REPO,
          'XLA_FLAGS': xla_flags(2)},
                   prelude=_SLOW_DECODE)
           for i in range(2)]
  for p in procs:
    p.wait_for('End-of-run evaluator test_novel at step 6')
  procs[1].signal(signal.SIGTERM)  # JAX's preemption service tells process 0.
  rcs = [p.finish() for p in procs]
  for p, rc in zip(procs, rcs):
    _assert_stopped(p, rc, 143, 'stopped by SIGTERM (to this process or '
                    'another) during the end-of-run evaluators of step 6: '
                    'test done, test_novel left undone')
  assert sorted(os.listdir(os.path.join(workdir, 'decode'))) == [
      'test_step6_beam3.json', 'test_step6_beam3_metrics.json']


def test_exit_code_is_128_plus_the_signal():
  assert stopping.exit_code(signal.SIGINT) == 130
  assert stopping.exit_code(signal.SIGTERM) == 143


def test_the_guard_raises_stopped_once_and_then_notes(monkeypatch):
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  exits = []
  monkeypatch.setattr(stopping, 'exit_now',
                      lambda line, code: exits.append((line, code)))
  monkeypatch.setattr(stopping, 'GRACE_SECONDS', 0.5)
  before = {s: signal.getsignal(s) for s in stopping.Guard.SIGNALS}
  try:
    guard = stopping.Guard()
    with pytest.raises(stopping.Stopped) as e:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # The handler runs before this returns.
    assert (e.value.signal, e.value.code) == ('SIGTERM', 143)
    # Like Ctrl-C: past every `except Exception`.
    assert isinstance(e.value, KeyboardInterrupt)
    os.kill(os.getpid(), signal.SIGINT)  # The unwinding goes on.
    time.sleep(1)
    assert guard.received == signal.SIGTERM
    # An unwinding that takes longer than GRACE_SECONDS is cut short.
    assert len(exits) == 1 and exits[0][1] == 143
    assert exits[0][0].startswith('capjax: stopped by SIGTERM; its clean-up '
                                  'took over')
  finally:
    for s, handler in before.items():
      signal.signal(s, handler)


def test_a_signal_stops_later_code_only_while_the_guard_takes_it(
    monkeypatch):
  monkeypatch.setattr(stopping, 'exit_now', lambda line, code: None)
  before = {s: signal.getsignal(s) for s in stopping.Guard.SIGNALS}
  try:
    stopping.raise_if_stopping()  # Nothing received: nothing to stop.
    guard = stopping.Guard()
    try:  # A library that catches the `Stopped` and goes on.
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
    except stopping.Stopped:
      pass
    with pytest.raises(stopping.Stopped, match='SIGINT'):
      stopping.raise_if_stopping()
    # Another handler now: the training loop's, or this process's own
    # after the guard's job (the code runs on in-process).
    signal.signal(signal.SIGINT, before[signal.SIGINT])
    assert guard.received == signal.SIGINT
    stopping.raise_if_stopping()
  finally:
    for s, handler in before.items():
      signal.signal(s, handler)


class _Dropper:
  """Runs the signal's handler inside __del__, which drops what it raises,
  as a garbage-collector callback does."""

  def __del__(self):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10000):  # The handler runs here.
      pass


def test_a_stop_dropped_by_a_del_is_raised_again(monkeypatch):
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  monkeypatch.setattr(stopping, 'exit_now', lambda line, code: None)
  before = {s: signal.getsignal(s) for s in stopping.Guard.SIGNALS}
  try:
    stopping.Guard()
    with pytest.raises(stopping.Stopped) as e:
      _Dropper()  # Deleted at once.
      deadline = time.monotonic() + 5
      while time.monotonic() < deadline:  # Bytecodes, for the handler.
        pass
    assert e.value.signal == 'SIGINT'
  finally:
    for s, handler in before.items():
      signal.signal(s, handler)
