"""Cross-entropy training: teacher forcing on the reference captions.

The loss is that of Show, Attend and Tell (Xu et al. 2015, eq. 14): token
cross-entropy plus lambda times the doubly stochastic attention penalty
(`capjax.losses`).
"""

import flax.linen as nn
import jax
import ml_collections
import optax

from capjax import losses
from capjax import parallel
from capjax import state as state_lib
from capjax.models import concepts as concepts_lib
from capjax.objectives import common


def check(config: ml_collections.ConfigDict) -> None:
  del config  # Nothing beyond what `config.check` covers.


def make(config: ml_collections.ConfigDict,
         data: common.Data) -> common.Objective:
  del config, data
  return common.Objective(step=train_step)


def _bn_trains(model: nn.Module) -> bool:
  # From the model rather than the config: the frozen phase of a fine-tuned
  # encoder runs a frozen copy of the model.
  return not (model.frozen or model.freeze_bn)


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's share of the global batch.

  The loss is normalised by the global token and caption counts, so the
  gradient averaged over devices is exactly that of one device holding the
  whole batch. A step whose loss or gradient is not finite leaves the state
  unchanged and is flagged in the metrics, so no checkpoint ever holds one.
  """
  t = config.train
  # A pure function of (seed, step, device): resumes exactly.
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                           jax.lax.axis_index(parallel.AXIS))
  num_devices = jax.lax.psum(1, parallel.AXIS)
  bn_trains = _bn_trains(model)
  concepts = bool(model.concepts[1])  # Also train the concept head.

  def loss_fn(params):
    variables = state.variables(params)
    method = model.caption_batch_and_concepts if concepts else (
        model.caption_batch)
    outputs, updates = model.apply(
        variables, batch, train=True, method=method,
        rngs={'dropout': rng}, mutable=['batch_stats'] if bn_trains else [])
    logits, alphas = outputs[:2]
    sums = losses.caption_losses(logits, batch['captions'], alphas,
                                 batch['mask'], t.label_smoothing)
    if concepts:
      sums |= concepts_lib.losses(outputs[2], batch, batch['mask'])
    counts = [k for k in ('tokens', 'captions', 'concept_images') if k in sums]
    totals = jax.lax.psum({k: sums[k] for k in counts}, parallel.AXIS)
    # pmean of the gradients of (n * local share) = gradient of the total.
    loss = num_devices * _loss(sums, t, totals)
    return loss, (sums, updates)

  grads, (sums, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  sums = jax.lax.psum(sums, parallel.AXIS)
  batch_stats = state.batch_stats
  if bn_trains:
    # Each device normalised its own share; keep one average of the stats.
    batch_stats = jax.lax.pmean(updates['batch_stats'], parallel.AXIS)
  loss = _loss(sums, t)
  state, grad_norm, finite = state_lib.apply_gradients(state, grads, loss, tx,
                                                       batch_stats)
  metrics = {
      'loss': loss,
      'cross_entropy': sums['ce'] / sums['tokens'],
      'attention_penalty': sums['penalty'] / sums['captions'],
      'token_accuracy': sums['correct'] / sums['tokens'],
      'grad_norm': grad_norm, 'nonfinite': ~finite,
  }
  if concepts:
    metrics['concept_loss'] = sums['concept'] / sums['concept_images']
    metrics['concept_accuracy'] = sums['concept_correct'] / sums[
        'concept_total']
  return state, metrics


def _loss(sums, t: ml_collections.ConfigDict, totals=None) -> jax.Array:
  """The captions' loss (`losses.caption_loss`), plus the concept head's
  weighted by train.concept_weight where the sums have it."""
  totals = sums if totals is None else totals
  loss = losses.caption_loss(sums, t.attention_penalty, totals)
  if 'concept' in sums:
    loss += t.concept_weight * sums['concept'] / totals['concept_images']
  return loss
