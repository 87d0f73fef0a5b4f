"""Preemption: when `stop` says so, alone and with JAX's sync manager.

The real multi-process agreement (a SIGTERM to one of two processes) is in
test_multiprocess.py; here JAX's side is a stand-in that answers as its
sync manager does: True at one agreed step only.
"""

import os
import signal
import threading

from jax.experimental import multihost_utils
import pytest

from capjax import preemption


def _send(sig):
  os.kill(os.getpid(), sig)  # Python runs the handler before the next line.


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_one_process_stops_at_the_step_after_the_signal(sig):
  before = signal.getsignal(sig)
  p = preemption.Preemption()
  try:
    assert not p.stop(1) and not p.stop(2)
    _send(sig)
    assert p.stop(3) and p.signal == sig.name
    _send(sig)  # A second one, as during the save, only notes it again.
    assert p.stop(3)
  finally:
    p.restore()
  assert signal.getsignal(sig) is before


def test_no_handlers_outside_the_main_thread():
  made = []
  thread = threading.Thread(target=lambda: made.append(
      preemption.Preemption()))
  thread.start()
  thread.join()
  assert made[0]._previous == {}  # pylint: disable=protected-access
  assert not made[0].stop(1)


class _SyncManager:
  """Answers as JAX's does once the processes agreed on `sync_step`."""

  def __init__(self, sync_step=None):
    self.sync_step = sync_step
    self.calls = []

  def reached(self, step):
    self.calls.append(step)
    return step == self.sync_step


@pytest.fixture
def sync_manager(monkeypatch):
  manager = _SyncManager()
  monkeypatch.setattr(preemption, '_sync_manager_running', lambda: True)
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      manager.reached)
  return manager


def test_with_jax_the_agreed_step_stops(sync_manager):
  p = preemption.Preemption()
  try:
    assert not p.stop(7) and not p.stop(8)
    sync_manager.sync_step = 10  # A process elsewhere reached 9.
    assert not p.stop(9)
    assert p.stop(10) and p.signal == 'SIGTERM (to this process or another)'
  finally:
    p.restore()
  # Step 1 asked once, at the first step, for a notice before the loop.
  assert sync_manager.calls == [1, 7, 8, 9, 10]


def test_with_jax_a_notice_before_the_loop_stops_the_first_step(sync_manager):
  sync_manager.sync_step = 1  # Agreed while no process had reached the loop.
  p = preemption.Preemption()
  try:
    assert p.stop(7)
  finally:
    p.restore()


def test_with_jax_sigterm_is_left_to_jax_and_sigint_handed_on(sync_manager):
  del sync_manager
  received = []
  # Stands in for JAX's C++ handler, which Python does not see.
  jax_handler = lambda signum, frame: received.append(signum)
  before = signal.signal(signal.SIGTERM, jax_handler)
  before_int = signal.getsignal(signal.SIGINT)
  try:
    p = preemption.Preemption()
    try:
      assert signal.getsignal(signal.SIGTERM) is jax_handler
      _send(signal.SIGINT)
      assert received == [signal.SIGTERM] and p.signal == 'SIGINT'
      assert not p.stop(5)  # Until JAX's processes agree on a step.
    finally:
      p.restore()
    assert signal.getsignal(signal.SIGINT) is before_int
  finally:
    signal.signal(signal.SIGTERM, before)
