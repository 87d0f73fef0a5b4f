"""Checksums of a state's arrays (capjax.checksums)."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from capjax import checksums


def _tree():
  rng = np.random.default_rng(0)
  return {'params': {'w': rng.standard_normal((64, 33)).astype(np.float32),
                     'h': jnp.asarray(rng.standard_normal(40), jnp.bfloat16)},
          'flags': np.array([True, False, True]),
          'step': np.int32(7)}


def test_one_changed_bit_anywhere_changes_that_leaf_only():
  tree = _tree()
  saved = checksums.tree(tree)
  assert set(saved) == {"['params']['w']", "['params']['h']", "['flags']",
                        "['step']"}
  assert all(len(v) == 16 for v in saved.values())
  for path in saved:
    leaf = next(x for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if jax.tree_util.keystr(p) == path)
    raw = np.array(leaf).reshape(-1).view(np.uint8)
    for position in (0, raw.size // 2, raw.size - 1):
      for bit in (0, 7):
        if np.asarray(leaf).dtype == np.bool_ and bit:
          continue  # A bool is one bit.
        changed = raw.copy()
        changed[position] ^= 1 << bit
        other = jax.tree_util.tree_map_with_path(
            lambda p, x, path=path, changed=changed: (
                changed.view(np.asarray(x).dtype).reshape(np.shape(x))
                if jax.tree_util.keystr(p) == path else x), tree)
        assert checksums.mismatches(saved, checksums.tree(other)) == [path]


def test_the_same_on_host_on_device_and_sharded():
  tree = _tree()
  on_host = checksums.tree(jax.tree.map(np.asarray, tree))
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  assert jax.device_count() == 8
  sharded = dict(tree, params=dict(
      tree['params'], w=jax.device_put(tree['params']['w'],
                                       NamedSharding(mesh, P('data')))))
  assert checksums.tree(sharded) == on_host


def test_order_dtype_and_shape_count():
  a = np.arange(8, dtype=np.float32)
  assert checksums.array(a) != checksums.array(a[::-1])
  assert checksums.array(a) != checksums.array(a.view(np.int32))
  assert checksums.array(a) != checksums.array(a.reshape(2, 4))
  assert checksums.array(a.reshape(2, 4).T) == checksums.array(
      np.ascontiguousarray(a.reshape(2, 4).T))


@pytest.mark.parametrize('restored,expected', [
    ({'a': '1', 'b': '2'}, []),
    ({'a': '1', 'b': '3'}, ['b']),
    ({'a': '1', 'c': '9'}, []),  # A leaf not saved is not compared.
])
def test_mismatches(restored, expected):
  assert checksums.mismatches({'a': '1', 'b': '2'}, restored) == expected
