"""Cross-entropy training: teacher forcing on the reference captions.

The loss is that of Show, Attend and Tell (Xu et al. 2015, eq. 14): token
cross-entropy plus lambda times the doubly stochastic attention penalty
(`capjax.losses`).
"""

import jax
import ml_collections

from capjax import losses
from capjax import models
from capjax import optimizer
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


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, schedule: optimizer.Values, *,
               predict: models.Predict, config: ml_collections.ConfigDict,
               tx: optimizer.MakeTx | None = None
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on the batch this device sees.

  The loss is normalised by the global token and caption counts, so the
  gradients of the devices' shares add up to that of one device holding
  the whole batch. A step whose loss or gradient is not finite leaves the
  state unchanged and is flagged in the metrics, so no checkpoint ever
  holds one.
  """
  t = config.train
  rng = parallel.device_rng(rng, state.step)
  concepts = predict.has_concepts  # Also train the concept head.

  def loss_fn(params):
    outputs, updates = predict.train_logits(state.variables(params), batch,
                                            rng=rng)
    logits, alphas = outputs[:2]
    sums = losses.caption_losses(logits, batch['captions'], alphas,
                                 batch['mask'], t.label_smoothing)
    if concepts:
      sums |= concepts_lib.losses(outputs[2], batch, batch['mask'])
    counts = [k for k in ('tokens', 'captions', 'concept_images') if k in sums]
    totals = parallel.total({k: sums[k] for k in counts})
    return _loss(sums, t, totals), (sums, updates)

  grads, (sums, updates) = parallel.gradients(loss_fn, state.params)
  sums = parallel.total(sums)
  batch_stats = state.batch_stats
  if predict.bn_trains:
    # Each device normalised its own share; keep one average of the stats.
    batch_stats = parallel.mean(updates['batch_stats'])
  loss = _loss(sums, t)
  tx = tx(schedule) if tx else optimizer.make(config, state.params, schedule)
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
