"""The optax optimizer: AdamW with warm-up and decay, clipping, and a frozen
or separately scheduled encoder.

The schedule's values (peak learning rates, warm-up and decay lengths) are an
input of the train step, not constants of its program: runs that differ only
in them (another `num_steps`, each trial of a learning-rate study) compile
the same program, which JAX's persistent compilation cache then serves.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capjax.errors import UserError

SCHEDULES = ('cosine', 'step', 'constant')

# The schedule's values, by part of the model ('decoder', and 'encoder' when
# it has an AdamW of its own): {name: float32 scalar}.
Values = dict[str, dict[str, Any]]
# What a train step may take instead of `make`: schedule -> transformation.
MakeTx = Callable[[Values], optax.GradientTransformation]


def _check(config: ml_collections.ConfigDict) -> None:
  t = config.train
  if t.schedule not in SCHEDULES:
    raise UserError(f'unknown --config.train.schedule={t.schedule!r}; choose '
                    f'one of {", ".join(SCHEDULES)}')
  if t.schedule == 'step' and t.step_every_steps <= 0:
    raise UserError('--config.train.step_every_steps must be positive for '
                    f'the step schedule, not {t.step_every_steps}')


def _part_values(config: ml_collections.ConfigDict, peak: float,
                 start: int = 0) -> dict[str, np.ndarray]:
  """One AdamW's schedule: its peak, the update it starts at, warm-up, and
  decay after warm-up."""
  t = config.train
  updates = t.num_steps // max(t.grad_accum_steps, 1)
  values = {'peak': peak, 'start': start, 'warmup': t.warmup_steps,
            'decay': max(updates - start - t.warmup_steps, 1),
            'every': t.step_every_steps, 'factor': t.step_factor}
  return {k: np.float32(v) for k, v in values.items()}


def schedule_values(config: ml_collections.ConfigDict) -> Values:
  """What the train step takes as its `schedule` input."""
  _check(config)
  t = config.train
  values = {'decoder': _part_values(config, t.learning_rate)}
  if not config.model.encoder.frozen:
    values['encoder'] = _part_values(config, t.encoder_learning_rate,
                                     t.encoder_from_step)
  return values


def _schedule(kind: str, v: dict[str, Any], count, xp=jnp) -> jax.Array:
  """The learning rate at update `count`: linear warm-up from 0 to the peak,
  then the decay of `kind`; computed with `xp` (jax.numpy in the step,
  NumPy on the host).

  optax's schedules compose this, but check their step counts in Python, so
  they cannot take them as traced inputs; this is their arithmetic (linear,
  cosine_decay and exponential_decay with staircase, joined at the warm-up's
  end) over arrays.
  """
  count = xp.asarray(count, xp.float32)
  warmup = xp.maximum(v['warmup'], 1.0)
  frac = 1.0 - xp.clip(count, 0.0, warmup) / warmup
  warm = -v['peak'] * frac + v['peak']
  after = count - v['warmup']
  if kind == 'cosine':
    decayed = v['peak'] * (
        0.5 * (1.0 + xp.cos(xp.pi * xp.minimum(after, v['decay']) /
                            v['decay'])))
  elif kind == 'step':
    decayed = v['peak'] * v['factor'] ** xp.floor(after / v['every'])
  else:
    decayed = xp.broadcast_to(v['peak'], after.shape)
  return xp.where(after < 0, warm, decayed)


def learning_rate(config: ml_collections.ConfigDict, part: str = 'decoder',
                  xp=np) -> optax.Schedule:
  """The learning rate of `part`'s AdamW by its update count, as the train
  step computes it; with NumPy by default (the host logs it each
  `log_every_steps`: no device work), or `xp=jax.numpy`.

  Updates, not batches: with gradient accumulation over k batches, a run of
  `num_steps` batches makes num_steps / k updates. An encoder fine-tuned
  from train.encoder_from_step counts from there.
  """
  values = schedule_values(config)[part]
  return lambda count: _schedule(config.train.schedule, values, count, xp)


def _decay_mask(params):
  # Weight matrices and kernels only: no decay on biases, BatchNorm or gates.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make(config: ml_collections.ConfigDict, params: Any,
         schedule: Values | None = None) -> optax.GradientTransformation:
  """Clip the global norm, then AdamW per part of the model.

  `params` is the captioner's {'encoder': ..., 'decoder': ...} (and its
  'concept_head', which learns as the decoder does). `schedule`: the
  step's input of `schedule_values(config)`; None, those values as
  constants (to initialise a state). A frozen encoder gets `set_to_zero`,
  which keeps no optimizer state at all; one fine-tuned from
  train.encoder_from_step gets updates from then on.
  """
  t = config.train
  if schedule is None:
    schedule = schedule_values(config)
  _check(config)

  def adamw(values):
    return optax.adamw(
        lambda count: _schedule(t.schedule, values, count),
        b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask)

  parts = {'decoder': adamw(schedule['decoder'])}
  start = t.encoder_from_step
  if config.model.encoder.frozen:
    parts['encoder'] = optax.set_to_zero()
  elif not start:
    parts['encoder'] = adamw(schedule['encoder'])
  else:
    # The encoder's AdamW starts at update `start`, as if made then (as
    # when fine-tuning is switched on after training the decoder). The steps
    # before give the encoder no gradient (train.py runs the frozen model),
    # so an AdamW counting them would start with zero moments and a bias
    # correction that no longer corrects: several times its rate at first.
    # Its own count starts at 0 there, which is where its schedule starts.
    parts['encoder'] = optax.transforms.conditionally_mask(
        adamw(schedule['encoder']),
        lambda count: count >= schedule['encoder']['start'])
  labels = {name: jax.tree.map(
      lambda _, n=('encoder' if name == 'encoder' else 'decoder'): n, subtree)
            for name, subtree in params.items()}
  tx = optax.multi_transform(parts, labels)
  if t.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx
