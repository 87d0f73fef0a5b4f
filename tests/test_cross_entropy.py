"""The cross-entropy objective's step: data parallel, compiled once, guarded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax import parallel
from capjax import train
from capjax.errors import UserError
from capjax.models import decoders
from capjax.objectives import cross_entropy
from conftest import init_model
from conftest import random_batch
from conftest import step_config


def _single_device_run(config, predict, tx, state, batches, rng, schedule):
  """The reference: one device holding the whole global batch."""
  step = jax.jit(jax.vmap(
      functools.partial(cross_entropy.train_step, predict=predict,
                        tx=lambda _: tx, config=config),
      in_axes=(None, 0, None, None), out_axes=0, axis_name=parallel.AXIS))
  for batch in batches:
    out, _ = step(state, jax.tree.map(lambda x: x[None], batch), rng,
                  schedule)
    state = jax.tree.map(lambda x: x[0], out)
  return state


@pytest.mark.parametrize('decoder', decoders.NAMES)
def test_data_parallel_equals_one_device(test_config, decoder):
  assert jax.device_count() == 8
  config = step_config(test_config)
  config.model.decoder.name = decoder
  predict, schedule, state = init_model(config)
  # Plain SGD: Adam divides by the gradients' own scale, which turns float
  # rounding (sums in another order on 8 devices) into visible differences
  # for parameters whose gradients are nearly zero.
  tx = optax.sgd(0.05)
  # On the host: each run below starts from it, and its step donates what
  # it is given.
  state = jax.device_get(state.replace(opt_state=tx.init(state.params)))
  batches = [random_batch(config, seed) for seed in range(3)]
  rng = jax.random.key(1)
  # The reference, once for both forms of the step.
  want = _single_device_run(config, predict, tx, state, batches, rng,
                            schedule)
  # The encoder trains too (frozen=False), so every parameter is compared.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       state.params, want.params)
  assert max(jax.tree.leaves(moved)) > 1e-4

  for kind in ('jit', 'pmap'):
    config.parallel = kind
    par = parallel.Parallel(config)
    step = par.step(functools.partial(cross_entropy.train_step,
                                      predict=predict, tx=lambda _: tx,
                                      config=config))
    got = par.put_state(state)
    for batch in batches:
      got, metrics = step(got, par.put_batch(batch), rng, schedule)
    got = par.get_state(got)
    assert int(got.step) == 3 and not bool(metrics['nonfinite']), kind
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5,
                                   atol=2e-6, err_msg=kind),
                 got.params, want.params)


def test_step_compiles_once(test_config):
  config = step_config(test_config)
  predict, schedule, state = init_model(config)
  traces = []

  def counted(*args):
    traces.append(1)
    return cross_entropy.train_step(*args, predict=predict, config=config)
  par = parallel.Parallel(config)
  step = par.step(counted)
  state = par.put_state(state)
  for seed in range(3):
    state, _ = step(state, par.put_batch(random_batch(config, seed)),
                    jax.random.key(0), schedule)
  assert len(traces) == 1


def test_nonfinite_step_is_skipped_and_stops_the_job(test_config):
  config = step_config(test_config)
  predict, schedule, state = init_model(config)
  par = parallel.Parallel(config)
  step = par.step(functools.partial(cross_entropy.train_step, predict=predict,
                                    config=config))
  batch = random_batch(config)
  # The model also takes float pixels; a NaN one poisons the loss.
  batch['image'] = batch['image'].astype(np.float32)
  batch['image'][0, 0, 0, 0] = np.nan
  before = jax.tree.map(np.array, state.params)
  new, metrics = step(par.put_state(state), par.put_batch(batch),
                      jax.random.key(0), schedule)
  assert bool(metrics['nonfinite']) and int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new.params, before)

  class Writer:
    def write_scalars(self, *args):
      raise AssertionError('no metrics are written for a failed step')
  with pytest.raises(UserError, match='NaN/Inf at step 12'):
    train._write_train_metrics(
        Writer(), config, 12, [{'nonfinite': np.bool_(True),
                                'loss': np.float32(np.nan)}])
