"""Up-Down caption decoder: the top-down attention model of Anderson et al.

"Bottom-Up and Top-Down Attention for Image Captioning and Visual Question
Answering" (Anderson et al. 2018, Sec. 3.2) decodes a caption from a set of
image features V = {v_1, ..., v_P}, v_i in R^C, with two stacked LSTMs: a
top-down attention LSTM that decides where to look, and a language LSTM
that decides what to say. At step t, with Pi_t the one-hot previous word:

  x1_t       = [h2_{t-1}; v_bar; W_e Pi_t]           attention LSTM input
  c1_t, h1_t = LSTM_1(x1_t, (c1, h1)_{t-1})         eq. 2
  a_it       = w_a^T tanh(W_va v_i + W_ha h1_t)     eq. 3
  alpha_t    = softmax_i(a_t)                        eq. 4
  v_hat_t    = sum_i alpha_it v_i                    eq. 5
  x2_t       = [v_hat_t; h1_t]                       language LSTM input
  c2_t, h2_t = LSTM_2(x2_t, (c2, h2)_{t-1})         eq. 6
  p(y_t)     = softmax(W_p h2_t + b_p)               eq. 7

with v_bar = (1 / P) sum_i v_i the mean feature, and both LSTMs starting
from zeros. Unlike "Show, Attend and Tell" (`decoder.AttentionLSTMCell`) the
attention reads the current h1_t, not a state of the previous step, and there
is no gate on the context and no deep output.

`UpDownCell` owns every parameter and computes one step; it plugs into
`decoder.Decoder` as `decoder.AttentionLSTMCell` does:

  decoder = Decoder(UpDownCell(vocab_size))
  variables = decoder.init({'params': key}, features, tokens)
  logits, alphas = decoder.apply(variables, features, tokens, train=True,
                                 rngs={'dropout': key})       # teacher forcing
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, k, method=decoder.initial_carry)
  carry, logits, alpha = decoder.apply(variables, carry, tokens, cache,
                                       method=decoder.step)

Shapes as in `decoder`: B images, K hypotheses per image, P feature
positions, C feature channels, A attention size, H LSTM size (both LSTMs),
E embedding size, V vocabulary size. Tokens and the carry are [B, K, ...];
the features stay [B, P, C] and are broadcast over K, never tiled K times.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
# (c1, h1, c2, h2), each [B, K, H] float32: the attention LSTM's state, then
# the language LSTM's.
UpDownCarry = tuple[Array, Array, Array, Array]
# 'features' [B, P, C], their attention keys W_va v_i, 'keys' [B, P, A], and
# the mean feature v_bar, 'mean' [B, C], all in the compute dtype; made once
# per image by `prepare`.
Cache = dict[str, Array]


class UpDownCell(nn.Module):
  """One decoding step of the Up-Down model; owns all the parameters.

  Attributes:
    vocab_size: V, the number of word ids (special tokens included).
    embed_dim: E, the word embedding size.
    hidden_dim: H, the state size of both LSTMs.
    attention_dim: A, the hidden size of the additive attention.
    dropout_rate: dropout on h2_t, the input of W_p.
    dtype: the compute dtype (bfloat16 on accelerators). The attention
      softmax, both LSTMs' carry and the returned logits are float32.
    param_dtype: the parameters' dtype; float32 so that small updates are not
      rounded away.
  """

  vocab_size: int
  # The captioning model's sizes in the paper: E = 1,000 word embeddings,
  # 1,000 units in each LSTM, 512 in the attention layer.
  embed_dim: int = 1000
  hidden_dim: int = 1000
  attention_dim: int = 512
  dropout_rate: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    lstm = functools.partial(nn.OptimizedLSTMCell, self.hidden_dim,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    # W_e: the word embedding, read by the attention LSTM only.
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype)
    # LSTM_1, the top-down attention LSTM (eq. 2): input H + C + E.
    self.attention_lstm = lstm()
    # Additive attention (eq. 3): W_va (with the only bias, which the softmax
    # would otherwise ignore), W_ha and the scoring vector w_a.
    self.attend_features = dense(self.attention_dim)
    self.attend_hidden = dense(self.attention_dim, use_bias=False)
    self.attend_score = dense(1, use_bias=False)
    # LSTM_2, the language LSTM (eq. 6): input C + H.
    self.language_lstm = lstm()
    # W_p and b_p (eq. 7), with dropout on h2_t before W_p as in the UpDown
    # model of ruotianluo/self-critical.pytorch. Only the output sees it:
    # the carry keeps the undropped h2_t.
    self.output_dropout = nn.Dropout(self.dropout_rate)
    self.output_logits = dense(self.vocab_size)

  def prepare(self, features: Array) -> Cache:
    """Per-image work done once, not per step: W_va v_i and v_bar."""
    # The mean over positions in float32: P can be 196 (14x14).
    mean = jnp.mean(features.astype(jnp.float32), axis=1)  # [B, C]
    features = features.astype(self.dtype)  # [B, P, C]
    keys = self.attend_features(features)  # [B, P, A]
    return {'features': features, 'keys': keys,
            'mean': mean.astype(self.dtype)}

  def initial_carry(self, cache: Cache, k: int) -> UpDownCarry:
    """(c1, h1, c2, h2)_0, all zeros as in the paper, for [B, k] hypotheses."""
    shape = (cache['features'].shape[0], k, self.hidden_dim)
    # broadcast_to costs nothing until a step writes new states.
    zeros = jnp.broadcast_to(jnp.zeros((), jnp.float32), shape)  # [B, k, H]
    return zeros, zeros, zeros, zeros

  def attend(self, h1: Array, cache: Cache) -> tuple[Array, Array]:
    """v_hat_t and alpha_t from the attention LSTM's h1_t [B, K, H].

    Returns:
      context v_hat_t [B, K, C] (compute dtype), alpha [B, K, P] (float32).
    """
    query = self.attend_hidden(h1)  # [B, K, A]
    # a_it = w_a^T tanh(W_va v_i + W_ha h1_t): keys broadcast over K, the
    # query over P.
    hidden = jnp.tanh(cache['keys'][:, None, :, :] +
                      query[:, :, None, :])  # [B, K, P, A]
    scores = self.attend_score(hidden)[..., 0]  # [B, K, P]
    # Softmax in float32: in bfloat16 the weights of 196 positions would not
    # sum to 1 closely.
    alpha = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, K, P]
    # sum_i alpha_it v_i with the [B, P, C] features shared by the K
    # hypotheses of an image: no [B, K, P, C] copy.
    context = jnp.einsum('bkp,bpc->bkc', alpha.astype(self.dtype),
                         cache['features'])  # [B, K, C]
    return context, alpha

  def __call__(self, carry: UpDownCarry, tokens: Array, cache: Cache,
               train: bool = False) -> tuple[UpDownCarry, Array, Array]:
    """One step: y_{t-1} [B, K] and the carry of t - 1 -> carry, logits, alpha.

    Args:
      carry: (c1, h1, c2, h2), each [B, K, H] float32.
      tokens: int [B, K], the previous words y_{t-1}.
      cache: from `prepare`.
      train: dropout on (needs a 'dropout' rng) or off.

    Returns:
      The new carry, logits [B, K, V] float32 and alpha [B, K, P] float32.
    """
    c1, h1, c2, h2 = carry
    embedded = self.embed(tokens)  # [B, K, E]
    mean = jnp.broadcast_to(cache['mean'][:, None],
                            embedded.shape[:2] + cache['mean'].shape[-1:])
    # x1_t = [h2_{t-1}; v_bar; W_e Pi_t] (eq. 2).
    inputs = jnp.concatenate([h2.astype(self.dtype), mean, embedded],
                             axis=-1)  # [B, K, H + C + E]
    (c1, h1), _ = self.attention_lstm((c1, h1), inputs)
    # The gates are computed in the compute dtype, but the states that run
    # through all steps stay float32.
    c1, h1 = c1.astype(jnp.float32), h1.astype(jnp.float32)  # [B, K, H]
    # The attention reads h1_t, the state this step just wrote (eq. 3).
    context, alpha = self.attend(h1, cache)  # [B, K, C]
    # x2_t = [v_hat_t; h1_t] (eq. 6).
    inputs = jnp.concatenate([context, h1.astype(self.dtype)],
                             axis=-1)  # [B, K, C + H]
    (c2, h2), _ = self.language_lstm((c2, h2), inputs)
    c2, h2 = c2.astype(jnp.float32), h2.astype(jnp.float32)  # [B, K, H]
    # p(y_t) = softmax(W_p h2_t + b_p) (eq. 7); the loss and beam search
    # take the softmax of these logits.
    out = self.output_dropout(h2.astype(self.dtype),
                              deterministic=not train)  # [B, K, H]
    logits = self.output_logits(out).astype(jnp.float32)  # [B, K, V]
    return (c1, h1, c2, h2), logits, alpha
