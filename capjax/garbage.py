"""Python's garbage collector, as capjax's commands set it.

A capjax process makes millions of objects that live as long as it does:
the modules of JAX, TensorFlow and flax, then JAX's traces and caches. At
Python's default thresholds the collector examined the young objects every
700 allocations and, every hundred of those, all of them: in a 6-step
training job of configs/test.py, 1,250 collections, 8 of them full, 1.4 s
of its 10 s of CPU, for the little garbage that has cycles. Every 10,000
allocations it collected 82 times, none full, in 0.4 s, and the job took
8.6 s of CPU against 9.9 s (medians of 3 runs each, in turn; 2 cores, AMD
EPYC). The older generations keep their thresholds, so garbage cycles are
still freed over a long run.
"""

import gc

YOUNG = 10_000


def collect_rarely() -> None:
  """The young generation collected every `YOUNG` allocations (net of
  deallocations), not 700. Before the heavy imports: they are most of it."""
  _, older, oldest = gc.get_threshold()
  gc.set_threshold(YOUNG, older, oldest)
