"""Checksums of a state's arrays, computed where the arrays are (on device).

orbax (OCDBT, zarr) keeps no checksum of the array bytes it writes: a
checkpoint whose data changed on disk (a flaky disk, a bad copy between
clusters) restores without a word. `Checkpoints` therefore stores
`tree(state)` with every step and compares it with `tree(restored)` on
every restore.

Each leaf gets 64 bits: two sums, modulo 2^32, over its 32-bit words w_i,

    s1 = sum_i fmix(w_i XOR i*K)      s2 = sum_i w_i * (2i + 1)

where fmix is MurmurHash3's 32-bit finaliser, a bijection that spreads
every input bit over the output, and 2i + 1 is odd, so invertible modulo
2^32. Changing any one word therefore always changes both sums; damage to
several words leaves both equal with a chance of about 2^-64 (the mixed sum
and the linear one are fooled by unrelated patterns). The sums do not
depend on the order of the additions, so the value is the same however the
array is sharded, on any device count or backend, and the work is one
fused elementwise pass and a reduction: memory-bound, and on an
accelerator far cheaper than copying the state to the host to hash it
there. (A cryptographic hash would be needed against tampering, not
against corruption; neither hashlib nor XLA offers one on device.)

16- and 8-bit types (bfloat16, bool) are widened word by word, so every bit
still counts; 64-bit types are split into two words.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INDEX_MULTIPLIER = 0x9E3779B1  # 2^32 / golden ratio: spreads the index.


def _fmix(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser on uint32 (wrapping arithmetic)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, [n]."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits < 32:
    x = jax.lax.bitcast_convert_type(
        x, {8: jnp.uint8, 16: jnp.uint16}[bits]).astype(jnp.uint32)
  else:  # 64-bit types become [..., 2] words.
    x = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return x.reshape(-1)


def _leaf(x: jax.Array) -> jax.Array:
  """uint32 [2]: the leaf's two sums."""
  w = _words(x)  # [n]
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  mixed = _fmix(w ^ (i * jnp.uint32(_INDEX_MULTIPLIER)))
  weighted = w * (i * jnp.uint32(2) + jnp.uint32(1))
  return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32),
                    jnp.sum(weighted, dtype=jnp.uint32)])


@jax.jit
def _sums(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf(x) for x in leaves]) if leaves else jnp.zeros(
      (0, 2), jnp.uint32)  # [leaves, 2]


class Pending:
  """Checksums being computed: `start` returns at once (JAX dispatches the
  work asynchronously), `result` waits for them."""

  def __init__(self, paths: list[str], sums: jax.Array):
    self._paths = paths
    self._sums = sums  # uint32 [leaves, 2], on device until `result`.

  def result(self) -> dict[str, str]:
    """{leaf path: 16 hex digits}."""
    sums = np.asarray(jax.device_get(self._sums))
    return {path: f'{a:08x}{b:08x}' for path, (a, b) in zip(self._paths, sums)}


def start(tree_: Any) -> Pending:
  """Starts the checksums of every array leaf of `tree_`: one jitted pass
  over all the leaves. The arrays may be sharded over devices and processes
  (every process gets the same value) or be host arrays."""
  paths_leaves = jax.tree_util.tree_leaves_with_path(tree_)
  return Pending([jax.tree_util.keystr(path) for path, _ in paths_leaves],
                 _sums([x for _, x in paths_leaves]))


def tree(tree_: Any) -> dict[str, str]:
  """{leaf path: 16 hex digits} of every array leaf of `tree_`."""
  return start(tree_).result()


def mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """The leaves of `restored` whose checksum is not the saved one.

  Leaves `saved` lacks are not compared (a partial restore reads fewer).
  """
  return [path for path, value in restored.items()
          if path in saved and saved[path] != value]
