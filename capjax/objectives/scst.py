"""Self-critical sequence training: optimising CIDEr-D of sampled captions.

Rennie et al. 2017 ("Self-critical Sequence Training for Image Captioning")
fine-tune a cross-entropy model with REINFORCE on the metric itself: for
captions w^s sampled from the model, the gradient of the expected reward is

  -(r(w^s) - b) * grad log p(w^s)

with a baseline b that does not depend on w^s. Two baselines:

* 'greedy': b = r(w^), the reward of the model's own arg-max caption
  (Rennie et al.'s "self-critical" baseline), so samples better than what
  the model would say at test time are made more likely, worse ones less;
* 'mean': b = the mean reward of the other k - 1 samples of the same image
  (the "new SCST" of Luo 2020, "A Better Variant of Self-Critical Sequence
  Training"), which costs no greedy decode.

Everything happens in one jitted step: the encoder runs once per image,
k captions per image are sampled by a `lax.scan` over the decoder's step
(`decode.sample`, in evaluation mode: the policy trained is the one that
decodes at test time, and the greedy baseline is its arg-max), and the
reward is CIDEr-D computed on the device
(`metrics.cider_jax`) against the image's references, with document
frequencies of the training references computed once (`document_frequencies`).

Guards against the known collapse into captions that stop mid-phrase
("... with a"): <eos> is part of the reward's n-grams (`scst.eos`), <eos> may
not come before `scst.min_words` words, and the logs show the fraction of
samples that never end.
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capjax import decode
from capjax import losses
from capjax import models
from capjax import optimizer
from capjax import parallel
from capjax import state as state_lib
from capjax.objectives import common
from capjax.data.vocab import EOS, PAD, Vocab
from capjax.errors import UserError
from capjax.metrics import cider_jax

BASELINES = ('greedy', 'mean')
EXAMPLES = 2  # Sampled captions of one image returned for the logs.


def check(config: ml_collections.ConfigDict) -> None:
  """A one-line UserError for settings SCST cannot train with."""
  s = config.scst
  if s.baseline not in BASELINES:
    raise UserError(f'unknown --config.scst.baseline={s.baseline!r}; choose '
                    f'one of {", ".join(BASELINES)}')
  if s.num_samples < (2 if s.baseline == 'mean' else 1):
    raise UserError(f'--config.scst.num_samples={s.num_samples} is too few: '
                    "the 'mean' baseline needs 2 or more, 'greedy' 1 or more")
  if s.temperature <= 0:
    raise UserError('--config.scst.temperature must be positive')
  if not 0 <= s.min_words < config.data.max_len - 2:
    raise UserError(f'--config.scst.min_words={s.min_words} must be >= 0 and '
                    f'leave room in --config.data.max_len={config.data.max_len}'
                    ' (<bos>, the words, <eos>)')
  if s.max_references < 1:
    raise UserError('--config.scst.max_references must be >= 1')


def make(config: ml_collections.ConfigDict,
         data: common.Data) -> common.Objective:
  """The SCST step, its reward's document frequencies (of the training
  references) and the references its batches must carry."""
  table = document_frequencies(data.references(config.data.train_split),
                               data.vocab, config)
  return common.Objective(step=train_step, constants=(table,),
                          references=config.scst.max_references,
                          needs_init_from=True)


def mean_of_others(reward: jax.Array) -> jax.Array:
  """reward [B, k] -> [B, k]: each sample's mean over the image's other
  samples, the 'mean' baseline (it must not see the sample it judges)."""
  k = reward.shape[1]
  return (jnp.sum(reward, 1, keepdims=True) - reward) / (k - 1)


def document_frequencies(references: dict[int, list[str]], vocab: Vocab,
                         config: ml_collections.ConfigDict
                         ) -> cider_jax.DocumentFrequencies:
  """The reward's df table of the training references, by image id.

  The references are tokenised and cut as the batches' are (`max_len`), so
  the reward sees the same n-grams the table counted.
  """
  start = time.perf_counter()
  rows, images = [], []
  for i, (_, captions) in enumerate(sorted(references.items())):
    rows.append(vocab.encode_batch(captions, config.data.max_len)[:, 1:])
    images.append(np.full(len(captions), i))
  table = cider_jax.DocumentFrequencies.build(
      np.concatenate(rows), np.concatenate(images), eos=config.scst.eos)
  logging.info(
      'CIDEr-D document frequencies of %d images (%d references): %d '
      'n-grams, %d of them sharing a hash key, in %.1f s.', len(references),
      sum(map(len, rows)), len(table), table.collisions,
      time.perf_counter() - start)
  return table


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, schedule: optimizer.Values,
               table: cider_jax.DocumentFrequencies, *,
               predict: models.Predict, config: ml_collections.ConfigDict,
               tx: optimizer.MakeTx | None = None
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One SCST step on the batch this device sees.

  The batch needs `references` [B, R, L] (all captions of each image) and,
  for `scst.ce_weight`, `captions` [B, K, L]. BatchNorm uses its running
  statistics: sampled captions are no reason to move them.
  """
  s = config.scst
  rng = parallel.device_rng(rng, state.step)
  # Independent streams: `decode.sample` folds the token index into its key,
  # so folding small numbers into one shared key would reuse a draw's key.
  sample_rng, dropout_rng = jax.random.split(rng)
  references = batch['references'][..., 1:]  # [B, R, T]: no <bos>
  mask = batch['mask']  # [B]
  sampling = dict(max_len=config.data.max_len, min_words=s.min_words,
                  ban_unk=s.ban_unk)

  def loss_fn(params):
    variables = state.variables(params)
    features = predict.encode(variables, batch)  # [B, P, C], once each
    decoding = predict.decoding(variables, features, s.num_samples)
    samples = decode.sample(decoding, sample_rng, temperature=s.temperature,
                            **sampling)
    candidates = samples.tokens  # [B, k, T]
    if s.baseline == 'greedy':
      # No gradient flows through the baseline's decode.
      fixed = jax.lax.stop_gradient((variables, features, decoding.cache))
      greedy = decode.sample(predict.decoding(*fixed[:2], 1, cache=fixed[2]),
                             None, **sampling)
      candidates = jnp.concatenate([candidates, greedy.tokens], 1)
    rewards = cider_jax.cider_d(candidates, references, table,
                                eos=s.eos)  # [B, k (+ 1)]
    reward = rewards[:, :s.num_samples]  # [B, k]
    if s.baseline == 'greedy':
      baseline = rewards[:, s.num_samples:]  # [B, 1]
    else:
      baseline = mean_of_others(reward)  # [B, k]
    baseline = jnp.broadcast_to(baseline, reward.shape)  # [B, k]
    advantage = jnp.where(mask[:, None], reward - baseline, 0.0)  # [B, k]
    drawn = (samples.tokens != PAD) & mask[:, None, None]  # [B, k, T]
    sums = {
        'pg': -jnp.sum(advantage[..., None] * samples.logprobs * drawn),
        'tokens': jnp.sum(drawn),
        'reward': jnp.sum(jnp.where(mask[:, None], reward, 0.0)),
        'baseline': jnp.sum(jnp.where(mask[:, None], baseline, 0.0)),
        'entropy': jnp.sum(samples.entropy * drawn),
        'unended': jnp.sum(~jnp.any(samples.tokens == EOS, -1) & mask[:, None]),
        'samples': jnp.sum(mask) * s.num_samples,
    }
    loss = sums['pg'] / parallel.total(sums['tokens'])
    if s.ce_weight:
      logits, alphas = predict.logits(variables, features, batch['captions'],
                                      train=True, rng=dropout_rng)
      ce = losses.caption_losses(logits, batch['captions'], alphas, mask,
                                config.train.label_smoothing)
      sums['ce'], sums['ce_tokens'] = ce['ce'], ce['tokens']
      loss = loss + s.ce_weight * ce['ce'] / parallel.total(ce['tokens'])
    return loss, (sums, samples.tokens, reward)

  grads, (sums, tokens, reward) = parallel.gradients(loss_fn, state.params)
  sums = parallel.total(sums)
  pg_loss = sums['pg'] / sums['tokens']
  loss = pg_loss  # What the gradient is of, and what the guard checks.
  if s.ce_weight:
    loss = loss + s.ce_weight * sums['ce'] / sums['ce_tokens']
  tx = tx(schedule) if tx else optimizer.make(config, state.params, schedule)
  state, grad_norm, finite = state_lib.apply_gradients(state, grads, loss, tx)
  metrics = {
      'loss': loss,
      'policy_gradient_loss': pg_loss,
      'reward': sums['reward'] / sums['samples'],
      'baseline': sums['baseline'] / sums['samples'],
      'entropy': sums['entropy'] / sums['tokens'],
      'max_len_fraction': sums['unended'] / sums['samples'],
      'sample_length': sums['tokens'] / sums['samples'],
      'grad_norm': grad_norm, 'nonfinite': ~finite,
      # The first image's samples on the first device, for the logs.
      'examples': parallel.first(tokens[0, :EXAMPLES]),
      'example_rewards': parallel.first(reward[0, :EXAMPLES]),
  }
  if s.ce_weight:
    metrics['cross_entropy'] = sums['ce'] / sums['ce_tokens']
  return state, metrics
