"""Attention LSTM caption decoder: the soft attention of Xu et al. 2015.

"Show, Attend and Tell" (Xu et al. 2015) decodes a caption one word at a time
from a grid of image features a = {a_1, ..., a_P}, a_i in R^C. At step t:

  e_ti     = v^T tanh(W_a a_i + W_h h_{t-1})           f_att, eq. 4
  alpha_t  = softmax_i(e_ti)                            eq. 5
  beta_t   = sigmoid(f_beta(h_{t-1}))                   gate, Sec. 4.2.1
  z_t      = beta_t * sum_i alpha_ti a_i                soft attention, eq. 6
  c_t, h_t = LSTM(c_{t-1}, h_{t-1}, [E y_{t-1}; z_t])  eq. 1-3
  p(y_t)   ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))    deep output, eq. 7

with (c_0, h_0) from two MLPs of the mean feature (Sec. 3.1.2).

`AttentionLSTMCell` owns every parameter and computes one step. `Decoder`
holds the cell (as `nn.RNN` does) and adds the methods beam search and
training call:

  decoder = Decoder(AttentionLSTMCell(vocab_size, embed_dim=512, ...))
  variables = decoder.init({'params': key}, features, tokens)
  logits, alphas = decoder.apply(variables, features, tokens, train=True,
                                 rngs={'dropout': key})       # teacher forcing
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, k, method=decoder.initial_carry)
  carry, logits, alpha = decoder.apply(variables, carry, tokens, cache,
                                       method=decoder.step)

Teacher forcing scans the very cell `step` calls, so both paths share one
parameter tree (params/cell/...) and one code path.

Shapes: B images, K hypotheses per image (K captions in training, K beams in
beam search), L time steps, P feature positions, C feature channels, A
attention size, H LSTM size, E embedding size, V vocabulary size. Tokens and
the carry are [B, K, ...]; the features stay [B, P, C] and are broadcast over
K (never tiled K times), so K hypotheses cost K LSTM steps but one copy of
the image.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
# The AttentionLSTMCell's (c, h), each [B, K, H] float32: the same layout as
# flax's LSTM cells.
Carry = tuple[Array, Array]
# 'features' [B, P, C] and their attention keys W_a a_i, 'keys' [B, P, A],
# both in the compute dtype; made once per image by `prepare`.
Cache = dict[str, Array]


class AttentionLSTMCell(nn.Module):
  """One decoding step of the soft-attention LSTM; owns all the parameters.

  Attributes:
    vocab_size: V, the number of word ids (special tokens included).
    embed_dim: E, the word embedding size.
    hidden_dim: H, the LSTM state size.
    attention_dim: A, the hidden size of the additive attention.
    dropout_rate: dropout on the deep output layer's input, before L_o.
    dtype: the compute dtype (bfloat16 on accelerators). The attention
      softmax, the gate, the LSTM carry and the returned logits are float32.
    param_dtype: the parameters' dtype; float32 so that small updates are not
      rounded away.
  """

  vocab_size: int
  embed_dim: int = 512
  hidden_dim: int = 512
  attention_dim: int = 512
  dropout_rate: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    # E: the word embedding, read at the input (eq. 1) and at the deep
    # output (eq. 7).
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype)
    # f_init,c and f_init,h (Sec. 3.1.2); tanh keeps h_0 in the range an
    # LSTM's h lives in.
    self.init_c = dense(self.hidden_dim)
    self.init_h = dense(self.hidden_dim)
    # Additive attention: W_a (with the only bias, which the softmax would
    # otherwise ignore), W_h and the scoring vector v.
    self.attend_features = dense(self.attention_dim)
    self.attend_hidden = dense(self.attention_dim, use_bias=False)
    self.attend_score = dense(1, use_bias=False)
    # f_beta: one scalar gate per hypothesis from h_{t-1} (Sec. 4.2.1).
    self.gate = dense(1)
    self.lstm = nn.OptimizedLSTMCell(self.hidden_dim, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    # Deep output (eq. 7): L_h and L_z map into the embedding space, where
    # they add to E y_{t-1}; L_o maps that sum to the vocabulary.
    self.output_hidden = dense(self.embed_dim)
    self.output_context = dense(self.embed_dim)
    self.output_dropout = nn.Dropout(self.dropout_rate)
    self.output_logits = dense(self.vocab_size)

  def prepare(self, features: Array) -> Cache:
    """Per-image work done once, not per step: the attention keys W_a a_i."""
    features = features.astype(self.dtype)  # [B, P, C]
    keys = self.attend_features(features)  # [B, P, A]
    return {'features': features, 'keys': keys}

  def initial_carry(self, cache: Cache, k: int) -> Carry:
    """(c_0, h_0) from the mean feature (Sec. 3.1.2), for [B, k] hypotheses."""
    # The mean over positions in float32: P can be 196 (14x14).
    mean = jnp.mean(cache['features'].astype(jnp.float32), axis=1)  # [B, C]
    c = jnp.tanh(self.init_c(mean)).astype(jnp.float32)  # [B, H]
    h = jnp.tanh(self.init_h(mean)).astype(jnp.float32)  # [B, H]
    # Every hypothesis of an image starts from the same state; broadcast_to
    # costs nothing until a step writes new states.
    shape = (c.shape[0], k, self.hidden_dim)
    return jnp.broadcast_to(c[:, None], shape), jnp.broadcast_to(h[:, None],
                                                                 shape)

  def attend(self, h: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """The gated context beta_t z_t, alpha_t and beta_t from h_{t-1} [B, K, H].

    Returns:
      context [B, K, C] (compute dtype), alpha [B, K, P] (float32), beta
      [B, K] (float32).
    """
    query = self.attend_hidden(h)  # [B, K, A]
    # e_ti = v^T tanh(W_a a_i + W_h h_{t-1}): keys broadcast over K, the
    # query over P.
    hidden = jnp.tanh(cache['keys'][:, None, :, :] +
                      query[:, :, None, :])  # [B, K, P, A]
    scores = self.attend_score(hidden)[..., 0]  # [B, K, P]
    # Softmax in float32: in bfloat16 the weights of 196 positions would not
    # sum to 1 closely enough for the doubly stochastic penalty on
    # sum_t alpha_ti (Sec. 4.2.1).
    alpha = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, K, P]
    # sum_i alpha_ti a_i with the [B, P, C] features shared by the K
    # hypotheses of an image: no [B, K, P, C] copy.
    context = jnp.einsum('bkp,bpc->bkc', alpha.astype(self.dtype),
                         cache['features'])  # [B, K, C]
    beta = jax.nn.sigmoid(self.gate(h).astype(jnp.float32))  # [B, K, 1]
    context = (beta * context).astype(self.dtype)  # [B, K, C]
    return context, alpha, beta[..., 0]

  def __call__(self, carry: Carry, tokens: Array, cache: Cache,
               train: bool = False) -> tuple[Carry, Array, Array]:
    """One step: y_{t-1} [B, K] and (c, h)_{t-1} -> (c, h)_t, logits, alpha.

    Args:
      carry: (c, h), each [B, K, H] float32.
      tokens: int [B, K], the previous words y_{t-1}.
      cache: from `prepare`.
      train: dropout on (needs a 'dropout' rng) or off.

    Returns:
      The new carry, logits [B, K, V] float32 and alpha [B, K, P] float32.
      beta [B, K] is sown as intermediates/beta.
    """
    c, h = carry
    embedded = self.embed(tokens)  # [B, K, E]
    # alpha and beta use h_{t-1}: the model looks before it speaks.
    context, alpha, beta = self.attend(h, cache)  # [B, K, C]
    self.sow('intermediates', 'beta', beta)
    inputs = jnp.concatenate([embedded, context], axis=-1)  # [B, K, E + C]
    (c, h), _ = self.lstm((c, h), inputs)
    # The gates are computed in the compute dtype, but the state that runs
    # through all steps stays float32.
    c, h = c.astype(jnp.float32), h.astype(jnp.float32)  # [B, K, H]
    # Deep output (eq. 7): L_o(E y_{t-1} + L_h h_t + L_z z_t).
    out = (embedded + self.output_hidden(h) +
           self.output_context(context))  # [B, K, E]
    out = self.output_dropout(out, deterministic=not train)
    logits = self.output_logits(out).astype(jnp.float32)  # [B, K, V]
    return (c, h), logits, alpha


class Decoder(nn.Module):
  """A recurrent caption decoder: teacher forcing by `nn.scan` of a cell,
  and its single steps; the contract of `models.decoders`.

  The cell (`AttentionLSTMCell`, `updown.UpDownCell`) has `prepare`,
  `initial_carry` and `__call__` (one step), as `step` calls them.

  Teacher forcing lifts the cell itself with `nn.scan`, as `nn.RNN` does,
  so the cell's fields are not repeated here. It stays a submodule of this
  module rather than becoming the decoder: checkpoints hold its parameters
  under params/decoder/cell/..., and a scanned cell in the captioner's place
  would drop the 'cell' level, so those checkpoints would no longer restore.

  Attributes:
    cell: the step, holding every parameter (under params/cell).
    unroll: lax.scan's `unroll`; True unrolls every step. Only for counting
      FLOPs: XLA's cost analysis counts a loop body once, whatever its trip
      count.
  """

  cell: nn.Module
  unroll: int | bool = 1

  def prepare(self, features: Array, train: bool = False) -> Any:
    """features [B, P, C] -> the per-image cache `step` reads. (The cells'
    per-image work has no dropout: `train` is the contract's.)"""
    del train
    return self.cell.prepare(features)

  def initial_carry(self, cache: Any, k: int) -> Any:
    """The cell's carry for k hypotheses per image, leaves [B, k, ...]."""
    return self.cell.initial_carry(cache, k)

  def step(self, carry: Any, tokens: Array, cache: Any,
           train: bool = False) -> tuple[Any, Array, Array]:
    """tokens [B, k] -> (carry, logits [B, k, V], alpha [B, k, P])."""
    return self.cell(carry, tokens, cache, train)

  def __call__(self, features: Array, tokens: Array,
               train: bool = False) -> tuple[Array, Array]:
    """Teacher forcing: features [B, P, C], tokens int [B, K, L].

    tokens[..., t] is the input y_{t-1} of step t (<bos> first); whatever
    follows <eos> (padding) only affects logits at its own and later
    positions, which the loss masks.

    Returns:
      logits [B, K, L, V] float32 and alphas [B, K, L, P] float32. With
      mutable=['intermediates'], what the cell sows, over time: the
      `AttentionLSTMCell`'s gate beta [B, K, L] in intermediates/cell/beta.
    """
    cache = self.prepare(features)
    carry = self.initial_carry(cache, tokens.shape[1])

    def body(cell, carry, tokens_t, cache):
      carry, logits, alpha = cell(carry, tokens_t, cache, train)
      return carry, (logits, alpha)

    # Parameters are broadcast (one set for every step); each step draws its
    # own dropout mask; the cache enters every step unchanged; time is axis 2
    # of the tokens and of every output (intermediates included).
    scan = nn.scan(
        body,
        variable_broadcast='params',
        variable_axes={'intermediates': 2},
        split_rngs={'params': False, 'dropout': True},
        in_axes=(2, nn.broadcast),
        out_axes=2,
        unroll=self.unroll)
    _, (logits, alphas) = scan(self.cell, carry, tokens, cache)
    return logits, alphas
