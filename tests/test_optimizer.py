"""The optimizer: its schedule as a step input, equal to optax's own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax import optimizer
from capjax import parallel
from capjax.errors import UserError
from capjax.objectives import cross_entropy
from conftest import init_model
from conftest import random_batch
from conftest import step_config


def _optax_schedule(config, peak, start=0):
  """The schedule as optax's own schedules compose it."""
  t = config.train
  warmup = optax.linear_schedule(0.0, peak, max(t.warmup_steps, 1))
  decay_steps = max(t.num_steps - start - t.warmup_steps, 1)
  decay = {
      'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps),
      'step': lambda: optax.exponential_decay(
          peak, t.step_every_steps, t.step_factor, staircase=True),
      'constant': lambda: optax.constant_schedule(peak),
  }[t.schedule]()
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def _optax_make(config, params, start):
  """AdamW per part as optax composes it, with optax's schedules."""
  t = config.train
  adamw = lambda lr: optax.adamw(lr, b2=t.b2, weight_decay=t.weight_decay,
                                 mask=lambda p: jax.tree.map(
                                     lambda x: x.ndim > 1, p))
  encoder = adamw(_optax_schedule(config, t.encoder_learning_rate, start))
  if start:
    encoder = optax.transforms.conditionally_mask(
        encoder, lambda count: count >= start)
  labels = {k: jax.tree.map(
      lambda _, n=('encoder' if k == 'encoder' else 'decoder'): n, v)
            for k, v in params.items()}
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.multi_transform({
          'decoder': adamw(_optax_schedule(config, t.learning_rate)),
          'encoder': encoder}, labels))


@pytest.mark.parametrize('kind', optimizer.SCHEDULES)
@pytest.mark.parametrize('warmup', [0, 1, 30])
def test_the_schedule_is_optaxs(test_config, kind, warmup):
  t = test_config.train
  t.update(schedule=kind, warmup_steps=warmup, num_steps=200,
           step_every_steps=25, learning_rate=3e-4, encoder_from_step=40,
           encoder_learning_rate=2e-5)
  counts = jnp.arange(230)  # Past the end: the schedule holds its last value.
  for part, peak, start in (('decoder', 3e-4, 0), ('encoder', 2e-5, 40)):
    want = jax.vmap(_optax_schedule(test_config, peak, start))(counts)
    # In the step (traced) and on the host (NumPy, for the logs).
    in_step = jax.jit(jax.vmap(optimizer.learning_rate(test_config, part,
                                                       xp=jnp)))(counts)
    on_host = optimizer.learning_rate(test_config, part)(np.asarray(counts))
    assert isinstance(on_host, np.ndarray)
    # The same arithmetic; XLA may order it differently in either program,
    # and near the cosine's end 1 + cos(x) cancels digits.
    for got in (in_step, on_host):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * peak)


def test_the_optimizer_state_is_optaxs(test_config):
  # So that checkpoints written with optax's schedules restore.
  test_config.train.grad_clip_norm = 1.0
  for start in (0, 3):
    test_config.train.encoder_from_step = start
    # The structures only: shapes, never computed.
    state = jax.eval_shape(lambda: init_model(test_config)[2])
    got = jax.eval_shape(optimizer.make(test_config, state.params).init,
                         state.params)
    want = jax.eval_shape(
        _optax_make(test_config, state.params, start).init, state.params)
    assert jax.tree.structure(got) == jax.tree.structure(want)


def _lowered_step(config):
  predict, schedule, state = init_model(config)
  par = parallel.Parallel(config)
  step = par.step(functools.partial(cross_entropy.train_step, predict=predict,
                                    config=config), constant_argnums=(3,))
  return step.lower(par.put_state(state), par.put_batch(random_batch(config)),
                    jax.random.key(0), par.put_constant(schedule)).as_text()


def test_runs_that_differ_in_their_schedule_share_one_step(test_config):
  config = step_config(test_config)
  config.train.encoder_from_step = 2  # Both AdamWs, one of them masked.
  first = _lowered_step(config)
  config.train.update(num_steps=1000, warmup_steps=50, learning_rate=0.3,
                      encoder_learning_rate=0.01, encoder_from_step=7,
                      step_every_steps=9, step_factor=0.5)
  assert _lowered_step(config) == first
  config.train.schedule = 'step'  # Another kind is another program.
  assert _lowered_step(config) != first


@pytest.mark.parametrize('settings, message', [
    ({'schedule': 'linear'}, r"unknown --config.train.schedule='linear'"),
    ({'schedule': 'step', 'step_every_steps': 0},
     'step_every_steps must be positive for the step schedule, not 0'),
])
def test_a_bad_schedule_is_one_line(test_config, settings, message):
  test_config.train.update(settings)
  with pytest.raises(UserError, match=message):
    optimizer.schedule_values(test_config)
