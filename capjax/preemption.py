"""Stopping a training job cleanly on SIGTERM / SIGINT.

A cluster preempts a job with SIGTERM (and a person with Ctrl-C). Nothing
stops at the signal itself: the loop asks `stop(step)` after every step and,
when it says so, saves that step and exits.

In a job of several processes every process must stop at the same step: the
checkpoint is one collective save, and a process that saves alone waits for
the others forever. Yet a cluster may signal one host only, or the hosts a
few steps apart. JAX's distributed runtime agrees on that step for us: its
preemption sync manager (on by default, `jax_enable_preemption_service`),
started by `jax.distributed.initialize`, installs a SIGTERM handler of its
own (in C++), and once any process gets the signal, threads in the
background of every process publish the step each has last asked about and
settle on the one after the furthest. `stop` then only reads that number
under a lock (`multihost_utils.reached_preemption_sync_point`, well under a
microsecond): no collective, nothing waits on the devices, so the steps stay
asynchronous. It works on the CPU with gloo as on GPUs and TPUs. So, with
`jax.distributed`:

  * SIGTERM is left to JAX's handler. A Python handler would replace it
    (Python does not chain a handler installed from C, and `signal.signal`
    does not even return it), and JAX would never hear of the signal.
  * SIGINT, which JAX does not watch, is handed on to it as a SIGTERM.
  * A second SIGTERM, during the save or later, changes nothing.

The sync manager keeps one step per process, the last one it was asked
about, so `stop` must be its only caller: orbax's CheckpointManager asks it
too, from its save-finalizing thread about a step the loop has passed, and
a notice arriving just then would settle on a step that process is beyond.

One process without `jax.distributed` notes both signals itself and stops at
the step after the signal, as does a second signal until `restore`.

Outside the loop (start-up, the other jobs) a signal stops the job at once
with one line: see `capjax.stopping`, whose handlers `restore` puts back.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

# What `signal` says when the job stops for a notice JAX handled: the SIGTERM
# may have reached this process or another one.
_ANY_PROCESS = 'SIGTERM (to this process or another)'


def _sync_manager_running() -> bool:
  """Whether JAX's preemption sync manager watches SIGTERM here."""
  return (jax.distributed.is_initialized() and
          jax.config.jax_enable_preemption_service)


class Preemption:
  """Notes SIGTERM/SIGINT while installed; `restore` puts back the previous
  handlers. Install it in the main thread: Python runs signal handlers
  there only, so elsewhere it installs none and stops only for a SIGTERM
  that JAX handled."""

  def __init__(self):
    # What stopped the job, for its log: the name of the signal received.
    self.signal = None
    self._previous = {}
    self._shared = _sync_manager_running()
    self._first_step = True
    if threading.current_thread() is not threading.main_thread():
      return
    if self._shared:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT,
                                                    self._hand_on)
    elif jax.process_count() > 1:
      # Each process would stop at a step of its own and wait in the save.
      # Killed instead, the job can at least resume from its last checkpoint.
      logging.warning('jax_enable_preemption_service is off: SIGTERM and '
                      'SIGINT stop this job without saving a checkpoint.')
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._note)

  def _note(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def _hand_on(self, signum, frame):
    self._note(signum, frame)
    signal.raise_signal(signal.SIGTERM)  # To JAX's handler.

  def stop(self, step: int) -> bool:
    """Whether to save `step` and stop; the same answer on every process.

    Call it after every step, with the same steps on every process.
    """
    if not self._shared:
      return self.signal is not None
    early = False
    if self._first_step:
      self._first_step = False
      # A notice that came before any process reached the loop (while it
      # compiled, say) set the stop at step 1, which a resumed job has
      # passed: every process sees that here, at its first step, and stops.
      # (Asking about step 1 moves this process's step back until the next
      # line; a notice settled in that instant, with no process yet past
      # its first step, would stop none of them.)
      early = step > 1 and multihost_utils.reached_preemption_sync_point(1)
    if multihost_utils.reached_preemption_sync_point(step) or early:
      self.signal = self.signal or _ANY_PROCESS
      return True
    return False

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
