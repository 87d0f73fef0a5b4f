"""The jit and pmap wrappers of the per-device steps (capjax.parallel)."""

import jax
import numpy as np
import pytest

from capjax import config as config_lib
from capjax import parallel
from capjax.errors import UserError


def _step(state, batch, rng):
  noise = jax.random.uniform(jax.random.fold_in(rng, state['step']))
  total = jax.lax.psum(batch['x'].sum(), parallel.AXIS)
  return {'step': state['step'] + 1, 'w': state['w'] + total}, noise


@pytest.mark.parametrize('kind', ['jit', 'pmap'])
def test_the_rng_stays_on_the_device(kind):
  config = config_lib.defaults()
  config.parallel = kind
  config.batch_size = 8
  par = parallel.Parallel(config)
  step = par.step(_step)
  state = par.put_state({'step': np.int32(0), 'w': np.zeros((), np.float32)})
  batch = par.put_batch({'x': np.ones((8, 2), np.float32)})
  if kind == 'pmap':  # Already on the devices, as a prefetched batch would be.
    batch = jax.pmap(lambda x: x)(batch)
  rng = jax.random.key(0)
  state, first = step(state, batch, rng)  # Compiles.
  # State, batch and key are all on the devices: nothing may come from the
  # host. (CPUs guard only this direction.)
  with jax.transfer_guard_host_to_device('disallow'):
    for _ in range(2):
      state, noise = step(state, batch, rng)
  assert float(par.get_state(state)['w']) == 48.0
  assert float(noise) != float(first)  # A new draw at every step.


def test_batch_must_divide_over_devices(test_config):
  test_config.batch_size = 12
  with pytest.raises(UserError, match='not divisible by the 8 devices'):
    parallel.Parallel(test_config)
