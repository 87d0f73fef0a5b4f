"""Transformer caption decoder: an image-grid encoder and a word decoder.

The Transformer of Vaswani et al. 2017 ("Attention Is All You Need") with
the image grid as its source sequence, as in the captioning Transformer
baseline of ruotianluo/self-critical.pytorch (N=6, d=512, h=8, d_ff=2048,
dropout 0.1; here 3 + 3 layers by default, any depth by the attributes).
Its blocks are pre-LayerNorm (Xiong et al. 2020, "On Layer Normalization in
the Transformer Architecture"): each sub-layer reads LN(x) and adds its
output to x, and one final LayerNorm closes each stack. Without the
post-LN's learning-rate warm-up this trains stably.

Encoder, once per image, from the features a_1, ..., a_P in R^C:

  m_i   = LN(W_f a_i + b_f) + G_i                 grid projection, learned G
  m     = m + MHA(LN(m), LN(m))                   x N_enc (Sec. 3.1)
  m     = m + FFN(LN(m))
  M     = LN(m)                                   memory [B, P, D]

Decoder, from the words y_0 = <bos>, y_1, ..., at step t:

  x_t   = sqrt(D) E y_t + PE(t)                   Sec. 3.4, 3.5
  x_t   = x_t + MHA(LN(x_t), LN(x_{<=t}))         masked self-attention
  x_t   = x_t + MHA(LN(x_t), M)                   cross-attention    x N
  x_t   = x_t + FFN(LN(x_t))
  p(y_{t+1}) = softmax(W_o LN(x_t) + b_o)         logits [V]

with, per head h of d_k = D / heads channels (Sec. 3.2):

  Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V         eq. 1
  MHA(x, z) = Concat_h(Attention(x W^Q_h, z W^K_h, z W^V_h)) W^O
  FFN(x)    = max(0, x W_1 + b_1) W_2 + b_2                 eq. 2
  PE(t, 2i) = sin(t / 10000^(2i/D)), PE(t, 2i+1) = cos(...)  Sec. 3.5

or, with positions='learned', PE a learned table of max_len rows. Dropout
(Sec. 5.4) falls on each sub-layer's output before it is added to the
residual stream and on the sums of embeddings and positions; not on the
attention weights, which are returned as the attention maps alpha and so
stay distributions over the P positions. alpha is the last decoder layer's
cross-attention averaged over its heads.

The output projection W_o is not tied to the embedding E: the baseline
keeps a separate generator too, E enters scaled by sqrt(D) (Sec. 3.4) while
W_o sees a LayerNorm'd state, and at captioning vocabularies (about 10,000
words) the untied V x D matrix is a small share of the parameters.

The same layers serve two paths, so they share one parameter tree:

  decoder = TransformerDecoder(vocab_size, max_len=20, ...)
  variables = decoder.init({'params': key}, features, tokens)
  logits, alphas = decoder.apply(variables, features, tokens, train=True,
                                 rngs={'dropout': key})       # teacher forcing
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, k, method=decoder.initial_carry)
  carry, logits, alpha = decoder.apply(variables, carry, tokens, cache,
                                       method=decoder.step)

Teacher forcing runs all L positions at once under a causal mask.
Incremental decoding keeps every decoder layer's self-attention keys and
values in the carry, one slot per position: step t writes slot t (one-hot
over the slots, so each hypothesis may be at its own position) and attends
to slots <= t; the slots after t are zeros and masked. The cross-attention
keys and values of the memory are per image, computed once by `prepare` and
shared by the image's K hypotheses.

Shapes: B images, K hypotheses per image (captions in training, beams in
beam search), L time steps (L <= max_len), S = max_len cache slots, P grid
positions, C feature channels, D model size, H heads, d = D / H head size,
F the MLP's hidden size, V vocabulary size.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
# 'keys', 'values': tuples of one [B, K, S, H, d] array per decoder layer
# (compute dtype); 'position': int32 [B, K], the slot the next step writes.
Carry = dict[str, Any]
# 'keys', 'values': tuples of one [B, P, H, d] array per decoder layer, the
# cross-attention keys and values of the memory (compute dtype).
Cache = dict[str, Any]

NEG_INF = -1e30  # Finite, so that a fully masked row would not give NaN.
POSITIONS = ('sinusoidal', 'learned')


def sinusoids(length: int, dim: int) -> np.ndarray:
  """PE [length, dim] float32: sin at even channels, cos at odd (Sec. 3.5)."""
  position = np.arange(length, dtype=np.float64)[:, None]  # [length, 1]
  pairs = (dim + 1) // 2
  # 1 / 10000^(2i / dim): wavelengths from 2 pi to 10000 * 2 pi.
  rate = np.exp(-np.log(10000.0) * 2 * np.arange(pairs) / dim)  # [pairs]
  angle = position * rate  # [length, pairs]
  table = np.stack([np.sin(angle), np.cos(angle)], axis=-1)
  return table.reshape(length, 2 * pairs)[:, :dim].astype(np.float32)


def dot_product_attention(query: Array, key: Array, value: Array,
                          mask: Array | None = None) -> tuple[Array, Array]:
  """softmax(Q K^T / sqrt(d)) V per head (eq. 1), softmax in float32.

  Args:
    query: [..., T, H, d].
    key, value: [..., S, H, d] with the query's leading axes, or, shared by
      the K hypotheses of an image, [B, S, H, d] for a query [B, K, T, H, d]:
      contracted with the image's keys directly, never copied K times.
    mask: bool, broadcastable to [..., T, S]: True where a query may look.

  Returns:
    The context [..., T, H, d] in the value's dtype and the weights
    [..., H, T, S] float32.
  """
  if key.ndim == query.ndim:
    scores_spec, context_spec = '...thd,...shd->...hts', '...hts,...shd->...thd'
  elif key.ndim == 4 and query.ndim == 5:
    scores_spec, context_spec = 'bkthd,bshd->bkhts', 'bkhts,bshd->bkthd'
  else:
    raise ValueError(f'keys {key.shape} do not match queries {query.shape}')
  # The products accumulate in float32 whatever the compute dtype, and the
  # 1 / sqrt(d) scale is applied there.
  scores = jnp.einsum(scores_spec, query, key,
                      preferred_element_type=jnp.float32)  # [..., H, T, S]
  scores = scores * query.shape[-1]**-0.5
  if mask is not None:
    scores = jnp.where(jnp.expand_dims(mask, -3), scores, NEG_INF)
  weights = jax.nn.softmax(scores, axis=-1)  # [..., H, T, S] float32
  context = jnp.einsum(context_spec, weights.astype(value.dtype), value)
  return context, weights


class MultiHeadAttention(nn.Module):
  """The projections of multi-head attention (Sec. 3.2.2), used piecewise.

  Queries and keys/values are projected by separate methods, so that the
  decoder can project the memory's keys and values once per image and its
  own keys and values once per position.

  Attributes:
    num_heads: H.
    head_dim: d; H * d is usually D.
    model_dim: D, the output size.
    dtype, param_dtype: the compute and parameter dtypes.
  """

  num_heads: int
  head_dim: int
  model_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    project = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, self.head_dim),
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
        param_dtype=self.param_dtype)
    # W^Q, W^K, W^V: D -> [H, d]; W^O: [H, d] -> D (the concatenation).
    self.query = project()
    self.key = project()
    self.value = project()
    self.out = nn.DenseGeneral(
        self.model_dim, axis=(-2, -1),
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
        param_dtype=self.param_dtype)

  def queries(self, x: Array) -> Array:
    """x [..., D] -> Q [..., H, d]."""
    return self.query(x)

  def keys_values(self, z: Array) -> tuple[Array, Array]:
    """z [..., D] -> K, V, each [..., H, d]."""
    return self.key(z), self.value(z)

  def output(self, context: Array) -> Array:
    """The heads' contexts [..., H, d] -> [..., D]."""
    return self.out(context)


class Mlp(nn.Module):
  """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (eq. 2)."""

  hidden_dim: int
  model_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(
        nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(dense(self.hidden_dim, name='hidden')(x))  # [..., F]
    return dense(self.model_dim, name='output')(x)  # [..., D]


class LearnedPositions(nn.Module):
  """x [..., P, D] + G, a learned [P, D] embedding of the P grid positions.

  P is fixed by the features `init` sees. Initialised N(0, 0.02^2), as in
  ViT (Dosovitskiy et al. 2021).
  """

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    table = self.param('embedding', nn.initializers.normal(stddev=0.02),
                       x.shape[-2:], self.param_dtype)  # [P, D]
    return x.astype(jnp.float32) + table


class EncoderLayer(nn.Module):
  """m + MHA(LN(m)), then + FFN(LN(.)): one pre-LN encoder layer."""

  model_dim: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    self.attention_norm = norm()
    self.attention = MultiHeadAttention(
        self.num_heads, self.model_dim // self.num_heads, self.model_dim,
        dtype=self.dtype, param_dtype=self.param_dtype)
    self.mlp_norm = norm()
    self.mlp = Mlp(self.mlp_dim, self.model_dim, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x: Array, train: bool = False) -> Array:
    """x [B, P, D] float32 -> [B, P, D] float32."""
    h = self.attention_norm(x)  # [B, P, D]
    q = self.attention.queries(h)  # [B, P, H, d]
    k, v = self.attention.keys_values(h)  # [B, P, H, d]
    context, _ = dot_product_attention(q, k, v)  # [B, P, H, d]
    x = x + self.dropout(self.attention.output(context),
                         deterministic=not train)
    x = x + self.dropout(self.mlp(self.mlp_norm(x)), deterministic=not train)
    return x


class DecoderLayer(nn.Module):
  """Masked self-attention, cross-attention to the memory, FFN; pre-LN."""

  model_dim: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    attention = functools.partial(
        MultiHeadAttention, self.num_heads, self.model_dim // self.num_heads,
        self.model_dim, dtype=self.dtype, param_dtype=self.param_dtype)
    self.self_attention_norm = norm()
    self.self_attention = attention()
    self.cross_attention_norm = norm()
    self.cross_attention = attention()
    self.mlp_norm = norm()
    self.mlp = Mlp(self.mlp_dim, self.model_dim, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def memory_keys_values(self, memory: Array) -> tuple[Array, Array]:
    """The memory M [B, P, D] -> its cross-attention K, V [B, P, H, d]."""
    return self.cross_attention.keys_values(memory)

  def __call__(self, x: Array, memory: tuple[Array, Array], mask: Array,
               slots: tuple[Array, Array] | None = None,
               write: Array | None = None, train: bool = False
               ) -> tuple[Array, tuple[Array, Array], Array]:
    """One layer over T positions of K hypotheses.

    Args:
      x: the residual stream [B, K, T, D] float32.
      memory: the memory's keys and values, each [B, P, H, d].
      mask: bool [..., T, S]: which keys each position may attend to.
      slots: None when the T positions are the whole sequence (S = T);
        else the keys and values of earlier positions, each [B, K, S, H, d],
        into which this step's (T = 1) are written where `write` [B, K, S]
        is True.
      train: dropout on.

    Returns:
      x [B, K, T, D] float32, the self-attention keys and values (each
      [B, K, S, H, d]) and the cross-attention weights [B, K, H, T, P]
      float32.
    """
    h = self.self_attention_norm(x)  # [B, K, T, D]
    q = self.self_attention.queries(h)  # [B, K, T, H, d]
    k, v = self.self_attention.keys_values(h)  # [B, K, T, H, d]
    if slots is not None:
      write = write[..., None, None]  # [B, K, S, 1, 1]
      k = jnp.where(write, k, slots[0])  # [B, K, S, H, d]
      v = jnp.where(write, v, slots[1])  # [B, K, S, H, d]
    context, _ = dot_product_attention(q, k, v, mask)  # [B, K, T, H, d]
    x = x + self.dropout(self.self_attention.output(context),
                         deterministic=not train)
    h = self.cross_attention_norm(x)
    q = self.cross_attention.queries(h)  # [B, K, T, H, d]
    # The memory [B, P, H, d] is the image's, shared by its K hypotheses.
    context, weights = dot_product_attention(q, *memory)  # [B, K, T, H, d]
    x = x + self.dropout(self.cross_attention.output(context),
                         deterministic=not train)
    x = x + self.dropout(self.mlp(self.mlp_norm(x)), deterministic=not train)
    return x, (k, v), weights


class TransformerDecoder(nn.Module):
  """Grid encoder + word decoder, with teacher forcing and single steps.

  Attributes:
    vocab_size: V, the number of word ids (special tokens included).
    max_len: S, the positions the decoder holds: the longest teacher-forced
      input and the number of steps a carry can take.
    num_layers: decoder layers (N in Sec. 3.1).
    num_encoder_layers: encoder layers over the P grid positions.
    model_dim: D.
    num_heads: H; must divide D.
    mlp_dim: F, the FFN's hidden size.
    dropout_rate: residual and embedding dropout (Sec. 5.4).
    positions: the word positions: 'sinusoidal' (fixed) or 'learned'.
    dtype: the compute dtype (bfloat16 on accelerators). Softmaxes, the
      residual stream and the returned logits and alphas are float32.
    param_dtype: the parameters' dtype; float32 so that small updates are not
      rounded away.
  """

  vocab_size: int
  max_len: int
  num_layers: int = 3
  num_encoder_layers: int = 3
  model_dim: int = 512
  num_heads: int = 8
  mlp_dim: int = 2048
  dropout_rate: float = 0.1
  positions: str = 'sinusoidal'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.positions not in POSITIONS:
      raise ValueError(f'positions={self.positions!r}; use one of '
                       f'{", ".join(map(repr, POSITIONS))}')
    if self.model_dim % self.num_heads:
      raise ValueError(f'model_dim={self.model_dim} is not a multiple of '
                       f'num_heads={self.num_heads}')
    if self.num_layers < 1:
      raise ValueError(f'num_layers={self.num_layers}; the decoder needs '
                       'at least one layer')
    dense = functools.partial(
        nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    layer = dict(model_dim=self.model_dim, num_heads=self.num_heads,
                 mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 dtype=self.dtype, param_dtype=self.param_dtype)
    # W_f and its LayerNorm: CNN features (post-ReLU, of any scale) enter
    # the residual stream at the unit scale of the word embeddings.
    self.feature_embed = dense(self.model_dim)
    self.feature_norm = norm()
    self.grid_positions = LearnedPositions(param_dtype=self.param_dtype)
    self.encoder_layers = [EncoderLayer(**layer)
                           for _ in range(self.num_encoder_layers)]
    self.encoder_norm = norm()
    # E ~ N(0, 1/D), read as sqrt(D) E y: unit-scale inputs, as in
    # tensor2tensor.
    self.embed = nn.Embed(
        self.vocab_size, self.model_dim,
        embedding_init=nn.initializers.normal(stddev=self.model_dim**-0.5),
        dtype=self.dtype, param_dtype=self.param_dtype)
    if self.positions == 'learned':
      self.word_positions = nn.Embed(
          self.max_len, self.model_dim,
          embedding_init=nn.initializers.normal(stddev=0.02),
          param_dtype=self.param_dtype)
    self.decoder_layers = [DecoderLayer(**layer)
                           for _ in range(self.num_layers)]
    self.decoder_norm = norm()
    self.output = dense(self.vocab_size)
    self.dropout = nn.Dropout(self.dropout_rate)

  def prepare(self, features: Array, train: bool = False) -> Cache:
    """features [B, P, C] -> the cache: the memory's keys and values.

    The encoder runs here, once per image; so do the cross-attention
    projections of every decoder layer.
    """
    x = self.feature_norm(self.feature_embed(
        features.astype(self.dtype)))  # [B, P, D]
    x = self.grid_positions(x)  # [B, P, D] float32
    x = self.dropout(x, deterministic=not train)
    for layer in self.encoder_layers:
      x = layer(x, train)  # [B, P, D]
    memory = self.encoder_norm(x)  # [B, P, D]
    keys, values = zip(*(layer.memory_keys_values(memory)
                         for layer in self.decoder_layers))  # [B, P, H, d]
    return {'keys': tuple(keys), 'values': tuple(values)}

  def initial_carry(self, cache: Cache, k: int) -> Carry:
    """Empty self-attention slots at position 0, for [B, k] hypotheses."""
    batch = cache['keys'][0].shape[0]
    shape = (batch, k, self.max_len, self.num_heads,
             self.model_dim // self.num_heads)  # [B, k, S, H, d]
    empty = tuple(jnp.zeros(shape, self.dtype) for _ in self.decoder_layers)
    return {'keys': empty, 'values': empty,
            'position': jnp.zeros((batch, k), jnp.int32)}

  def embed_words(self, tokens: Array, positions: Array,
                  train: bool) -> Array:
    """sqrt(D) E y + PE: tokens [..., T], positions int [..., T] (or
    broadcastable to them) -> [..., T, D] float32.

    A position >= max_len reads NaN (`jnp.take`'s fill): the step past the
    last slot shows in its logits.
    """
    x = self.embed(tokens).astype(jnp.float32) * self.model_dim**0.5
    if self.positions == 'learned':
      position = self.word_positions(positions)  # [..., T, D]
    else:
      position = jnp.take(sinusoids(self.max_len, self.model_dim), positions,
                          axis=0)  # [..., T, D]
    return self.dropout(x + position, deterministic=not train)

  def logits(self, x: Array) -> Array:
    """The residual stream [..., D] -> logits [..., V] float32."""
    return self.output(self.decoder_norm(x)).astype(jnp.float32)

  def step(self, carry: Carry, tokens: Array, cache: Cache,
           train: bool = False) -> tuple[Carry, Array, Array]:
    """One word per hypothesis: tokens int [B, k], the previous words.

    Each hypothesis writes its keys and values at its own carry position
    and attends to the slots up to it; at most max_len steps fit.

    Returns:
      The new carry, logits [B, k, V] float32 and alpha [B, k, P] float32.
    """
    position = carry['position']  # [B, k]
    x = self.embed_words(tokens[..., None], position[..., None],
                         train)  # [B, k, 1, D]
    slot = jnp.arange(self.max_len)  # [S]
    write = slot == position[..., None]  # [B, k, S]
    visible = (slot <= position[..., None])[..., None, :]  # [B, k, 1, S]
    keys, values = [], []
    for i, layer in enumerate(self.decoder_layers):
      x, (k, v), weights = layer(
          x, (cache['keys'][i], cache['values'][i]), visible,
          slots=(carry['keys'][i], carry['values'][i]), write=write,
          train=train)  # weights [B, k, H, 1, P]
      keys.append(k)
      values.append(v)
    logits = self.logits(x[:, :, 0])  # [B, k, V]
    alpha = jnp.mean(weights[:, :, :, 0], axis=2)  # [B, k, P]
    carry = {'keys': tuple(keys), 'values': tuple(values),
             'position': position + 1}
    return carry, logits, alpha

  def __call__(self, features: Array, tokens: Array,
               train: bool = False) -> tuple[Array, Array]:
    """Teacher forcing: features [B, P, C], tokens int [B, K, L].

    tokens[..., t] is the input of step t (<bos> first); the causal mask
    keeps each position's logits independent of the tokens after it.

    Returns:
      logits [B, K, L, V] float32 and alphas [B, K, L, P] float32.

    Raises:
      ValueError: L > max_len.
    """
    length = tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(
          f'tokens of length {length} do not fit the decoder\'s '
          f'max_len={self.max_len} positions; build it with max_len >= '
          f'{length}')
    cache = self.prepare(features, train)
    x = self.embed_words(tokens, jnp.arange(length), train)  # [B, K, L, D]
    causal = jnp.tril(jnp.ones((length, length), bool))  # [L, L]
    for i, layer in enumerate(self.decoder_layers):
      x, _, weights = layer(x, (cache['keys'][i], cache['values'][i]),
                            causal, train=train)  # weights [B, K, H, L, P]
    return self.logits(x), jnp.mean(weights, axis=2)  # [B, K, L, V|P]
