"""What a job holds in its workdir: for now, the one-trainer lock.

Two trainers on one workdir would restore the same checkpoint and race to
write the same steps. Process 0 of a training job therefore holds an
exclusive lock on `WORKDIR/train.lock` while it runs: an OS file lock
(`fcntl.flock`), which the kernel releases however the process ends, even
by `kill -9`, so a lock can never be left stale. The file also names its
holder (host, pid), for the message a second trainer gets, and for the
warning when a trainer takes over from one that died without cleaning up.
"""

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from absl import logging

from capjax.errors import UserError

LOCK = 'train.lock'


def _holder_alive(holder: dict) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # Cannot tell; the OS lock has the last word anyway.
  try:
    os.kill(int(holder['pid']), 0)
  except (OSError, KeyError, ValueError):
    return False
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's training lock, or raises a UserError naming its
  holder."""
  path = os.path.join(workdir, LOCK)
  f = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      try:
        holder = json.loads(f.read())
      except ValueError:
        holder = {}
      raise UserError(
          f'{workdir} is being trained by another job (pid '
          f'{holder.get("pid", "?")} on {holder.get("host", "?")}); wait for '
          'it to end or stop it, or use another --workdir') from None
    f.seek(0)
    try:
      previous = json.loads(f.read() or 'null')
    except ValueError:
      previous = None
    if previous and not _holder_alive(previous):
      logging.warning('%s: taking over from pid %s on %s, which ended '
                      'without releasing it.', path, previous.get('pid'),
                      previous.get('host'))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()  # Released cleanly: nothing to take over.
      f.flush()
      fcntl.flock(f, fcntl.LOCK_UN)
  finally:
    f.close()
