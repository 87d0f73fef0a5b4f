"""One job at a time on something shared in the data dir.

`waiting(path, what)` holds an exclusive lock on the file `path` (flock,
which the kernel drops however the holder ends); a second job waits for
it, saying so, and then finds the work done instead of redoing it.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator

from absl import logging


@contextlib.contextmanager
def waiting(path: str, what: str) -> Iterator[None]:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      logging.info('Waiting for another job %s.', what)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
