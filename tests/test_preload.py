"""tests/preload.py: a forked job behaves as one in a new interpreter."""

import os
import signal
import subprocess
import sys

import pytest

import preload
from conftest import REPO


@pytest.fixture(autouse=True)
def _forking(monkeypatch):
  """These tests are of the fork itself, whichever way the suite runs."""
  monkeypatch.delenv(preload.NO_PRELOAD, raising=False)


_SCRIPTS = {
    'exit status': 'import sys; sys.exit(3)',
    'uncaught exception': 'raise ValueError("x")',
    'killed by a signal': 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)',
    'KeyboardInterrupt': 'raise KeyboardInterrupt',
    'atexit and threads at the end': (
        'import atexit, threading, time\n'
        'atexit.register(print, "atexit")\n'
        'threading.Thread(target=lambda: (time.sleep(0.3), print("thread"))).start()'),
    'argv, path, stdin and environment': (
        'import os, sys; print(sys.argv, sys.path[:3], __name__, '
        'sys.stdin.read(), os.environ["CAPJAX_X"], os.getcwd())'),
    # Nothing ran in the preloaded process but imports: no backend, no
    # flags parsed, no commands imported (they define their flags).
    'a fresh state': (
        'import sys\n'
        'from absl import flags\n'
        'print(flags.FLAGS.is_parsed(), "capjax.main" in sys.modules)\n'
        'import jax; from jax._src import xla_bridge\n'
        'print(len(xla_bridge._backends), jax.device_count())'),
}


@pytest.mark.parametrize('name', list(_SCRIPTS))
def test_a_forked_job_is_a_new_interpreters_twin(name):
  env = dict(os.environ, CAPJAX_X='late', PYTHONPATH=os.path.join(REPO, 'x'),
             XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
                 'device_count=8', 'device_count=2'))
  args = [sys.executable, '-c', _SCRIPTS[name], 'a', 'b']
  assert preload.forks(args, env=env)
  new, forked = (run(args, cwd=REPO, env=env, input='in', text=True,
                     capture_output=True, timeout=60)
                 for run in (subprocess.run, preload.run))
  assert forked.returncode == new.returncode
  assert forked.stdout == new.stdout
  assert (forked.stderr.strip().splitlines()[-1:]
          == new.stderr.strip().splitlines()[-1:])
  if name == 'a fresh state':
    assert new.stdout == 'False False\n0 2\n'


def test_a_module_runs_as_main():
  # As `python -m`: argv[0] the module's file, flags parsed by the command.
  args = [sys.executable, '-m', 'capjax.score', '--helpshort']
  assert preload.forks(args)
  new, forked = (run(args, cwd=REPO, text=True, capture_output=True,
                     timeout=60) for run in (subprocess.run, preload.run))
  assert (forked.returncode, forked.stdout) == (new.returncode, new.stdout)
  assert 'capjax/score.py:' in new.stdout  # The main module's flags.


def test_a_job_in_its_own_session_and_its_status():
  proc = preload.Popen(
      [sys.executable, '-c', 'import os, time; print(os.getsid(0), flush=True);'
       ' time.sleep(60)'], cwd=REPO, stdout=subprocess.PIPE, text=True,
      start_new_session=True)
  assert int(proc.stdout.readline()) == proc.pid
  assert proc.poll() is None
  with pytest.raises(subprocess.TimeoutExpired):
    proc.wait(timeout=0.2)
  os.killpg(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=30) == -signal.SIGTERM
  proc.stdout.close()


def test_what_a_fork_cannot_be_is_a_new_interpreter(tmp_path):
  code = ['-c', 'pass']
  # What libraries read at import (Hugging Face's cache, TMPDIR), Python's
  # own options, another folder, other programs.
  for args, kwargs in [
      ([sys.executable, *code], {'env': dict(os.environ, HF_HUB_OFFLINE='1')}),
      ([sys.executable, *code], {'env': dict(os.environ, TMPDIR='/x')}),
      ([sys.executable, '-X', 'importtime', *code], {}),
      ([sys.executable, *code], {'cwd': tmp_path}),
      ([sys.executable, *code], {'pass_fds': [1]}),
      (['true'], {}),
  ]:
    assert not preload.forks(args, **kwargs), (args, kwargs)
    with preload.Popen(args, **kwargs) as proc:
      assert type(proc) is subprocess.Popen  # pylint: disable=unidiomatic-typecheck
      assert proc.wait() == 0
