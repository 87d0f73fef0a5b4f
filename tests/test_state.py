"""The train state: create, fresh, abstract, and the guarded update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax import models
from capjax import state as state_lib
from conftest import VOCAB_SIZE


def test_create_puts_the_given_encoder_weights_in(test_config):
  predict = models.Predict(models.build_captioner(
      test_config.model, VOCAB_SIZE))
  state = state_lib.create(test_config, predict, None, jax.random.key(0))
  assert int(state.step) == 0
  weights = {'params': jax.tree.map(jnp.ones_like, state.params['encoder']),
             'batch_stats': jax.tree.map(jnp.ones_like,
                                         state.batch_stats['encoder'])}
  loaded = state_lib.create(test_config, predict, None, jax.random.key(0),
                            weights)
  assert all(np.all(np.asarray(x) == 1)
             for x in jax.tree.leaves(loaded.params['encoder']))
  assert all(np.all(np.asarray(x) == 1)
             for x in jax.tree.leaves(loaded.batch_stats['encoder']))
  # The decoder is the random init's, the same for the same key.
  jax.tree.map(np.testing.assert_array_equal, loaded.params['decoder'],
               state.params['decoder'])


def test_abstract_has_the_shapes_of_create(test_config):
  predict = models.Predict(models.build_captioner(
      test_config.model, VOCAB_SIZE))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = state_lib.abstract(test_config, predict, device)
  real = state_lib.create(test_config, predict, None, jax.random.key(0))
  assert (jax.tree.structure(abstract) == jax.tree.structure(real))
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, device)


def test_fresh_starts_at_zero_with_a_new_optimizer():
  params = {'w': jnp.ones((2,))}
  state = state_lib.fresh(params, {}, optax.adam(0.1))
  assert int(state.step) == 0
  assert int(state.opt_state[0].count) == 0


def test_apply_gradients_skips_a_nonfinite_update():
  tx = optax.sgd(0.5)
  state = state_lib.fresh({'w': jnp.ones((2,))}, {}, tx)
  good, norm, finite = state_lib.apply_gradients(
      state, {'w': jnp.array([2.0, 0.0])}, jnp.float32(1.0), tx)
  assert bool(finite) and float(norm) == 2.0 and int(good.step) == 1
  np.testing.assert_allclose(good.params['w'], [0.0, 1.0])
  bad, _, finite = state_lib.apply_gradients(
      good, {'w': jnp.array([jnp.nan, 0.0])}, jnp.float32(1.0), tx)
  assert not bool(finite) and int(bad.step) == 2  # Counted, not applied.
  np.testing.assert_array_equal(bad.params['w'], good.params['w'])
  bad, _, finite = state_lib.apply_gradients(
      good, {'w': jnp.zeros(2)}, jnp.float32(jnp.inf), tx)
  assert not bool(finite)
  np.testing.assert_array_equal(bad.params['w'], good.params['w'])
