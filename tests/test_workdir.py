"""The one-trainer lock of a workdir (capjax.workdir)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from capjax import train
from capjax import workdir
from capjax.errors import UserError
from conftest import REPO

_HOLD = '''
import sys, time
from capjax import workdir
with workdir.lock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
'''


def _holder(path):
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_trainer_is_refused_until_the_first_ends(tmp_path,
                                                           test_config):
  first = _holder(tmp_path)
  try:
    with pytest.raises(UserError, match=(
        rf'being trained by another job \(pid {first.pid} on '
        rf'{socket.gethostname()}\)')):
      with workdir.lock(str(tmp_path)):
        pass
    # The training job itself, before it reads or writes anything.
    with pytest.raises(UserError, match=f'pid {first.pid}'):
      train.train_and_evaluate(test_config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [workdir.LOCK]
  finally:
    first.kill()  # kill -9: no clean release.
    first.wait()
  # The OS released the lock with the process; the file still names it.
  assert json.loads((tmp_path / workdir.LOCK).read_text())['pid'] == first.pid
  with workdir.lock(str(tmp_path)):
    assert json.loads(
        (tmp_path / workdir.LOCK).read_text())['pid'] == os.getpid()
  # Released cleanly: the file names nobody.
  assert (tmp_path / workdir.LOCK).read_text() == ''


def test_sigterm_releases_the_lock(tmp_path):
  first = _holder(tmp_path)
  first.send_signal(signal.SIGTERM)
  first.wait()
  deadline = time.monotonic() + 10
  while True:
    try:
      with workdir.lock(str(tmp_path)):
        break
    except UserError:
      assert time.monotonic() < deadline
      time.sleep(0.1)
