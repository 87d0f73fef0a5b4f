"""Caption decoding on the accelerator, in one compiled loop.

`greedy` is the arg-max decoder the training job uses for its sample
captions. It steps the model's own single-step function (`decode_step`),
the one teacher forcing scans, so what is decoded is what was trained.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.data.vocab import BOS, EOS, PAD


def greedy(model: nn.Module, variables, images: jax.Array,
           max_len: int) -> tuple[jax.Array, jax.Array]:
  """Arg-max captions of `images` [B, S, S, 3].

  Returns tokens [B, max_len - 1] (no <bos>; <eos> then <pad> after the
  end) and the attention of every step [B, max_len - 1, P].
  """
  cache = model.apply(variables, images, method='decode_prepare')
  carry = model.apply(variables, cache, 1, method='decode_initial_carry')
  batch = images.shape[0]

  def body(state, _):
    carry, tokens, done = state  # tokens [B, 1], done [B, 1]
    carry, logits, alpha = model.apply(variables, carry, tokens, cache,
                                       method='decode_step')
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, 1]
    tokens = jnp.where(done, PAD, tokens)
    done = done | (tokens == EOS)
    return (carry, tokens, done), (tokens[:, 0], alpha[:, 0])

  start = (carry, jnp.full((batch, 1), BOS, jnp.int32),
           jnp.zeros((batch, 1), bool))
  # A fixed number of steps: a few sample captions do not need early exit.
  _, (tokens, alphas) = jax.lax.scan(body, start, length=max_len - 1)
  return tokens.T, alphas.transpose(1, 0, 2)
