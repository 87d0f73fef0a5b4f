"""Stopping a job at a signal outside the training loop, with one line.

The loop stops at a safe point of its own (`capjax.preemption`): it saves
the step after the signal and exits 0. Everywhere else (start-up: flags,
the dataset and its copy, the vocabulary, the feature cache, restoring or
initialising the state, compiling; the decode, cache and prepare jobs) the
entry point's `Guard` turns SIGINT and SIGTERM into `Stopped`, and the entry
point ends the job with one line on stderr and the status 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM, as a shell reports a process that
a signal killed: a stop is neither a failure, 1, nor a success, 0).

Why neither Python's KeyboardInterrupt nor a handler that exits at once:

  * KeyboardInterrupt prints a traceback through whatever ran (JAX tracing
    the model: 70 lines), and then Python tears the interpreter down while
    the threads of XLA, tensorstore (orbax) and grain still run, which two
    times in three ended in a segmentation fault.
  * A handler that calls `os._exit` cuts a write short where it stands: a
    shard of the dataset's copy or of the feature cache left as a
    temporary file, TFDS's `incomplete.*` folder of a download.

So the handler raises `Stopped` in the main thread, the only thread Python
runs handlers in, between two bytecodes. It unwinds like KeyboardInterrupt
(a subclass, so that whatever cleans up after Ctrl-C does so after SIGTERM
too, and so that no `except Exception` takes it for an error: a checkpoint
restore would take it for a damaged checkpoint and set that aside): each
`finally` on the way removes what it was writing and releases its lock.
The entry point then prints the line and ends the process with `os._exit`,
skipping the interpreter's teardown and the segfault that came with it.
A second signal meanwhile does not cut the unwinding short.

Python may run the handler inside a garbage-collector callback (jax has
one) or a `__del__`, which drop what it raises ("Exception ignored"): the
guard's `sys.unraisablehook` then raises `Stopped` again, at the next
bytecode of the main thread.

A library may also catch the `Stopped` raised inside it, and raise an
error of its own or none: the code that takes a library's error for a fact
about a file (a checkpoint that does not read is set aside) asks
`raise_if_stopping` first, the training loop asks it before its first
step, and the entry point takes an error that follows a signal for the
stop.

Limits: a signal that arrives while the main thread is inside one long C
call (an XLA compile) acts when that call returns; and if the unwinding
itself takes more than `GRACE_SECONDS` (a library's clean-up that waits for
a process that is gone), the process ends anyway, with a line that says a
temporary file may be left (the next run that writes there removes it).
"""

import _thread
import os
import signal
import sys
import threading
from typing import NoReturn

# How long the main thread may take to unwind after a signal before the
# process ends without it.
GRACE_SECONDS = 30.0


def exit_code(signum: int) -> int:
  """The status a job stopped by signal `signum` exits with: 128 + it."""
  return 128 + signum


class Stopped(KeyboardInterrupt):
  """A signal stops the job: raised in the main thread, caught by the entry
  point, which ends the process with `code` and one line.

  Attributes:
    signal: the signal's name ('SIGINT'), or what stopped the job.
    code: the exit status.
    message: the line to end with, when whoever raised it knows what was
      done and what not (the end-of-run evaluators); None: the entry point
      says it.
    everywhere: every process of a multi-process job stops at this same
      point (the preemption sync point), not this one alone.
  """

  def __init__(self, signal_name: str, code: int, message: str | None = None,
               everywhere: bool = False):
    super().__init__(message or signal_name)
    self.signal = signal_name
    self.code = code
    self.message = message
    self.everywhere = everywhere


_exiting = threading.Lock()
_guard = None  # The entry point's `Guard`, once installed.


def raise_if_stopping() -> None:
  """Raises `Stopped` if the entry point's guard took a signal.

  For code that takes a library's error for a fact about its input (a
  checkpoint that does not read is set aside): a library may have turned
  the `Stopped` raised inside it into an error of its own, which must stop
  the job, not count as a damaged file.
  """
  guard = _guard
  # Only while it takes the signal: not once the training loop's handlers
  # took over, nor for a guard that an earlier test in this process made.
  if (guard is not None and guard.received is not None and
      signal.getsignal(guard.received) == guard._handler):  # pylint: disable=protected-access
    raise guard.stopped()


def exit_now(line: str, code: int) -> NoReturn:
  """Prints `line` to stderr and ends the process now, whatever its threads
  do; a second caller (a timer, a watchdog) waits for the first's exit."""
  _exiting.acquire()  # pylint: disable=consider-using-with
  # Worker processes (grain's, with data.workers > 0) would outlive an
  # os._exit, which skips multiprocessing's own clean-up.
  try:
    import multiprocessing  # pylint: disable=g-import-not-at-top
    for child in multiprocessing.active_children():
      child.terminate()
  except Exception:  # pylint: disable=broad-except
    pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed, or a broken pipe.
      pass
  # The line, then the exit at once: other threads (JAX's coordination
  # client, which logs a peer's loss on its own) get no time to write
  # after it.
  try:
    sys.stderr.write(line + '\n')
    sys.stderr.flush()
  except (OSError, ValueError):
    pass
  os._exit(code)  # pylint: disable=protected-access


class Guard:
  """SIGINT and SIGTERM -> `Stopped`, for an entry point to install in its
  main thread (Python runs handlers there only).

  With `at_once_line`, while nothing has been written yet (the imports of
  the entry point), a signal ends the process with that line right away:
  there is nothing to unwind.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, at_once_line: str | None = None):
    self.received = None  # The first signal's number.
    self.at_once_line = at_once_line
    self._finished = False
    self._again = False
    self._handler = self._handle  # One bound method, to compare with.
    global _guard
    _guard = self
    # A signal the parent chose to ignore stays ignored, as Python leaves
    # it (a shell script's background jobs ignore Ctrl-C; the script
    # itself then passes SIGTERM on).
    self._signals = [s for s in self.SIGNALS
                     if signal.getsignal(s) is not signal.SIG_IGN]
    for sig in self._signals:
      signal.signal(sig, self._handler)
    # Python runs a handler wherever the main thread is, also inside a
    # garbage-collector callback (jax has one) or a __del__, where what it
    # raises is printed as "Exception ignored" and dropped: the job would go
    # on. Such a `Stopped` is raised again, once the main thread is out of
    # there: a moment later, as a signal that the handler raises again.
    previous = sys.unraisablehook

    def hook(unraisable):
      if isinstance(unraisable.exc_value, Stopped) and self.received:
        self._again = True
        again = threading.Timer(0.2, _thread.interrupt_main,
                                args=(self.received,))
        again.daemon = True
        again.start()
      else:
        previous(unraisable)
    sys.unraisablehook = hook

  def take_back(self, sig: int) -> None:
    """Handles `sig` again after a library installed a handler of its own
    in C (JAX's preemption notifier takes SIGTERM), which Python's
    `signal.getsignal` does not see."""
    if sig in self._signals:
      signal.signal(sig, self._handler)

  def stopped(self) -> Stopped:
    """The `Stopped` of the signal received (there must be one)."""
    return Stopped(signal.Signals(self.received).name,
                   exit_code(self.received))

  def finished(self) -> None:
    """The job's work is done: a signal now changes nothing."""
    self._finished = True

  def _handle(self, signum, frame):
    del frame
    if self._again:
      self._again = False
      raise Stopped(signal.Signals(signum).name, exit_code(signum))
    if self.received is not None or self._finished:
      return  # The first one's unwinding goes on; nothing to stop.
    self.received = signum
    name = signal.Signals(signum).name
    code = exit_code(signum)
    if self.at_once_line:
      exit_now(self.at_once_line.format(signal=name), code)
    timer = threading.Timer(GRACE_SECONDS, self._too_long, args=(
        f'capjax: stopped by {name}; its clean-up took over '
        f'{GRACE_SECONDS:.0f} s, so the process ended without it (a '
        'temporary file may be left, which the next run removes)', code))
    timer.daemon = True
    timer.start()
    raise Stopped(name, code)

  def _too_long(self, line: str, code: int) -> None:
    # Not if the job went on after all (a library dropped `Stopped` where
    # the hook above does not see it) and its loop handles signals now:
    # ending it in the middle of a checkpoint save would not be better.
    if self._finished or signal.getsignal(self.received) != self._handler:
      return
    exit_now(line, code)
