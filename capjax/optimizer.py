"""The optax optimizer: AdamW with warm-up and decay, clipping, and a frozen
or separately scheduled encoder."""

from typing import Any

import jax
import ml_collections
import optax

from capjax.errors import UserError

SCHEDULES = ('cosine', 'step', 'constant')


def learning_rate(config: ml_collections.ConfigDict, peak: float,
                  start: int = 0) -> optax.Schedule:
  """Zero before `start`, then linear warm-up to `peak`, then the decay.

  Steps here count optimizer updates: with gradient accumulation over k
  batches, a run of `num_steps` batches makes num_steps / k updates.
  """
  t = config.train
  if t.schedule not in SCHEDULES:
    raise UserError(f'unknown --config.train.schedule={t.schedule!r}; choose '
                    f'one of {", ".join(SCHEDULES)}')
  warmup = optax.linear_schedule(0.0, peak, max(t.warmup_steps, 1))
  updates = t.num_steps // max(t.grad_accum_steps, 1)
  decay_steps = max(updates - start - t.warmup_steps, 1)
  if t.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif t.schedule == 'step':
    decay = optax.exponential_decay(peak, t.step_every_steps, t.step_factor,
                                    staircase=True)
  else:
    decay = optax.constant_schedule(peak)
  schedule = optax.join_schedules([warmup, decay], [t.warmup_steps])
  if start:
    schedule = optax.join_schedules([optax.constant_schedule(0.0), schedule],
                                    [start])
  return schedule


def _decay_mask(params):
  # Weight matrices and kernels only: no decay on biases, BatchNorm or gates.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make(config: ml_collections.ConfigDict,
         params: Any) -> optax.GradientTransformation:
  """Clip the global norm, then AdamW per part of the model.

  `params` is the captioner's {'encoder': ..., 'decoder': ...} (and its
  'concept_head', which learns as the decoder does). A frozen
  encoder gets `set_to_zero`, which keeps no optimizer state at all; one
  fine-tuned from train.encoder_from_step gets updates from then on.
  """
  t = config.train

  def adamw(schedule):
    return optax.adamw(schedule, b2=t.b2, weight_decay=t.weight_decay,
                       mask=_decay_mask)

  parts = {'decoder': adamw(learning_rate(config, t.learning_rate))}
  start = t.encoder_from_step
  if config.model.encoder.frozen:
    parts['encoder'] = optax.set_to_zero()
  elif not start:
    parts['encoder'] = adamw(learning_rate(config, t.encoder_learning_rate))
  else:
    # The encoder's AdamW starts at update `start`, as if made then (as
    # when fine-tuning is switched on after training the decoder). The steps
    # before give the encoder no gradient (train.py runs the frozen model),
    # so an AdamW counting them would start with zero moments and a bias
    # correction that no longer corrects: several times its rate at first.
    schedule = learning_rate(config, t.encoder_learning_rate, start=start)
    parts['encoder'] = optax.transforms.conditionally_mask(
        adamw(lambda count: schedule(count + start)),
        lambda count: count >= start)
  labels = {name: jax.tree.map(
      lambda _, n=('encoder' if name == 'encoder' else 'decoder'): n, subtree)
            for name, subtree in params.items()}
  tx = optax.multi_transform(parts, labels)
  if t.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx
