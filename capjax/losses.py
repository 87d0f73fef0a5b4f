"""The captioning losses: token cross-entropy and the attention penalty.

Every objective and evaluator sums the terms per device
(`caption_losses`), reduces the sums across devices, and combines them with
the one formula of `caption_loss`: cross-entropy per token plus lambda times
the penalty per caption.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from capjax.data.vocab import PAD


def caption_losses(logits: jax.Array, captions: jax.Array, alphas: jax.Array,
                   mask: jax.Array, label_smoothing: float
                   ) -> dict[str, jax.Array]:
  """Sums of the two loss terms and of what they average over.

  Args:
    logits: [B, K, T, V] for targets captions[..., 1:] (T = L - 1).
    captions: int [B, K, L].
    alphas: [B, K, T, P] attention weights.
    mask: bool [B]: real images (evaluation pads with fake ones).
    label_smoothing: cross-entropy label smoothing.

  Returns:
    Sums of token cross-entropy ('ce'), correct arg-max tokens ('correct'),
    tokens ('tokens'), the attention penalty (1 - sum_t alpha_ti)^2
    averaged over positions i (Xu et al. 2015, eq. 14; 'penalty') and
    captions ('captions').
  """
  targets = captions[..., 1:]  # [B, K, T]
  weights = (targets != PAD) & mask[:, None, None]  # [B, K, T]
  vocab = logits.shape[-1]
  if label_smoothing:
    labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab),
                                 label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)  # [B, K, T]
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) & weights  # [B, K, T]
  attention = jnp.sum(alphas * weights[..., None], axis=2)  # [B, K, P]
  penalty = jnp.mean((1.0 - attention) ** 2, axis=-1)  # [B, K]
  captions_valid = jnp.broadcast_to(mask[:, None], penalty.shape)  # [B, K]
  return {
      'ce': jnp.sum(ce * weights),
      'correct': jnp.sum(correct),
      'tokens': jnp.sum(weights),
      'penalty': jnp.sum(penalty * captions_valid),
      'captions': jnp.sum(captions_valid),
  }


def caption_loss(sums: Mapping[str, jax.Array], attention_penalty: float,
                 totals: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """ce / tokens + lambda * penalty / captions, of `caption_losses` sums.

  `totals` (default: `sums`) gives the token and caption counts to divide
  by: a device's share of the batch divides its own sums by the global
  counts, so that the shares add up to the loss of the whole batch.
  """
  totals = sums if totals is None else totals
  return (sums['ce'] / totals['tokens'] +
          attention_penalty * sums['penalty'] / totals['captions'])
