"""Checksums of a state's arrays: what `Checkpoints` verifies on restore.

orbax (OCDBT, zarr) keeps no checksum of the array bytes it writes: a
checkpoint whose data changed on disk (a flaky disk, a bad copy between
clusters) restores without a word. `Checkpoints` therefore stores
`tree(state)` with every step and compares it with `tree(restored)` on
every restore.

Each array gets XXH3-64 (xxHash) of its dtype, shape and bytes, hashed on
the host. XXH3 is a non-cryptographic hash made for this: any changed
byte changes the digest except with a chance of about 2^-64, and it runs
at about 10 GB/s on one CPU core. A position-weighted mix-and-sum in
jax.numpy, computed on the device, ran about 20 times slower on XLA's CPU
backend (2-core CPU), where the arrays are host memory anyway; on a GPU,
copying the state to the host costs about as much as hashing it. It guards against corruption, not tampering:
whoever can rewrite an array can rewrite its checksum.

An array sharded over several processes would hash differently on each;
capjax's state is replicated, so every process hashes the same bytes.
"""

from typing import Any

import jax
import numpy as np


def _host(x: Any) -> np.ndarray:
  """The whole array, C-contiguous, on this host (no copy where it is
  there already)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError('checksums need each array whole on every process; '
                         f'this one is sharded: {x.sharding}')
      x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def array(x: Any) -> str:
  """16 hex digits: XXH3-64 of the array's dtype, shape and bytes."""
  # Imported here: a bare GPU machine runs the benchmark's train and decode
  # steps without it.
  import xxhash  # pylint: disable=g-import-not-at-top
  a = _host(x)
  digest = xxhash.xxh3_64()
  digest.update(f'{a.dtype.str}{a.shape}'.encode())
  digest.update(a.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def tree(tree_: Any) -> dict[str, str]:
  """{leaf path: checksum} of every array leaf of `tree_`."""
  return {jax.tree_util.keystr(path): array(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree_)}


def mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """The leaves of `restored` whose checksum is not the saved one.

  Leaves `saved` lacks are not compared (a partial restore reads fewer).
  """
  return [path for path, value in restored.items()
          if path in saved and saved[path] != value]
