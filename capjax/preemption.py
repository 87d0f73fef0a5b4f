"""Stopping a training job cleanly on SIGTERM / SIGINT.

A cluster preempts a job with SIGTERM (and a person with Ctrl-C). The
handler only notes it; the loop asks `stop(step)` after every step and, when
it says so, saves that step and exits.
"""

import signal
import threading


class Preemption:
  """Notes SIGTERM/SIGINT while installed; `restore` puts back the previous
  handlers."""

  def __init__(self):
    self.signal = None  # The name of the signal received, if any.
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def stop(self, step: int) -> bool:
    """Whether to save `step` and stop."""
    del step
    return self.signal is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
