"""CIDEr-D on the accelerator: the reward of self-critical training.

The same metric as `cider.CiderD` (see there for the definition), computed
inside a jitted step on token ids, for a batch of candidates [B, S, T] and
the references of their images [B, R, T], with no host round-trip:

* n-gram ids. Every token window of length n = 1..4 is hashed to a 64-bit
  key, two uint32 lanes of MurmurHash3 (x86_32) with different seeds and the
  length n mixed in. Keys are compared, never the windows, so counting an
  n-gram in a caption or in a reference is an equality test of keys.
* Document frequencies. `DocumentFrequencies.build` counts, once, in how many
  images' references of the training set each key occurs, and keeps the keys
  sorted with their counts. In the step, a key's df is found by binary search
  (`jnp.searchsorted` on the first lane, then the few entries sharing that
  lane compared on the second), so the table stays on the device as three
  flat arrays.
* Sparse counts. A caption has at most 4 * T n-grams, so its counts are
  the [4, T, T] equalities of its keys: an n-gram's count is the number of
  its equal keys, and only its first occurrence contributes to a sum. The
  clipped tf-idf dot products with each reference and the norms follow, then
  the Gaussian length penalty and the means over n and references.

Collisions: two different n-grams share a key with probability 2^-64 per
pair. `DocumentFrequencies.build` counts the distinct n-grams exactly as well,
and reports how many keys were shared (`collisions`); the README gives the
numbers for the COCO vocabulary.

With `eos=True` the <eos> token that ends a caption is one more token of its
n-grams (both in the table and in the reward): a caption that stops in the
middle of a phrase ("a man riding a <eos>") then matches no reference's
ending, which plain CIDEr-D does not punish. Captions cut at the maximum
length have no <eos>, and match no ending either.

Shapes: B images, S candidates per image, R references per image, T tokens
per caption (no <bos>), G = 4 n-gram lengths, M table entries.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from capjax.data.vocab import EOS, PAD

MAX_N = 4
SIGMA = 6.0
SCALE = 10.0
_SEEDS = (0x9747B28C, 0x5BD1E995)  # One per key lane.


# ----------------------------------------------------------------------------
# n-gram keys.
# ----------------------------------------------------------------------------


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << r) | (x >> (32 - r))


def _murmur3(words: list[jax.Array], seed: int) -> jax.Array:
  """MurmurHash3 x86_32 of equal-shaped uint32 arrays, element-wise."""
  h = jnp.full(words[0].shape, seed, jnp.uint32)
  for k in words:
    k = k * jnp.uint32(0xCC9E2D51)
    k = _rotl(k, 15) * jnp.uint32(0x1B873593)
    h = _rotl(h ^ k, 13) * jnp.uint32(5) + jnp.uint32(0xE6546B64)
  h = h ^ jnp.uint32(4 * len(words))  # The length in bytes: n mixes in.
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def length(tokens: jax.Array, eos: bool) -> jax.Array:
  """tokens [..., T] (words, <eos>, <pad>...) -> int [...]: the tokens its
  n-grams are made of, the words and, with `eos`, the <eos> if it has one."""
  ended = (tokens == EOS) | (tokens == PAD)
  words = jnp.where(jnp.any(ended, -1), jnp.argmax(ended, -1),
                    tokens.shape[-1])
  if not eos:
    return words
  at_end = jnp.take_along_axis(
      tokens, jnp.minimum(words, tokens.shape[-1] - 1)[..., None], -1)[..., 0]
  return words + ((words < tokens.shape[-1]) & (at_end == EOS))


def ngram_keys(tokens: jax.Array, lengths: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys of every n-gram window of `tokens` [..., T].

  Args:
    tokens: int [..., T] token ids.
    lengths: int [...]: windows must end within the first `lengths` tokens.

  Returns:
    hi, lo: uint32 [..., G, T], the key of the window of n = g + 1 tokens
      starting at t; valid: bool [..., G, T], whether that window fits.
  """
  t = tokens.shape[-1]
  padded = jnp.concatenate(
      [tokens, jnp.full(tokens.shape[:-1] + (MAX_N - 1,), PAD, tokens.dtype)],
      axis=-1).astype(jnp.uint32)
  shifted = [padded[..., j:j + t] for j in range(MAX_N)]  # [..., T] each
  his, los = [], []
  for n in range(1, MAX_N + 1):
    his.append(_murmur3(shifted[:n], _SEEDS[0]))
    los.append(_murmur3(shifted[:n], _SEEDS[1]))
  starts = jnp.arange(t)
  n = jnp.arange(1, MAX_N + 1)[:, None]  # [G, 1]
  valid = starts + n <= lengths[..., None, None]  # [..., G, T]
  return jnp.stack(his, -2), jnp.stack(los, -2), valid


# ----------------------------------------------------------------------------
# Document frequencies.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class DocumentFrequencies:
  """The df table of a reference set, as device-friendly arrays.

  Sorted by (hi, lo). `probe` is the most entries that share one `hi`: the
  lookup compares that many entries from the first with its `hi`.
  """
  hi: jax.Array  # uint32 [M]
  lo: jax.Array  # uint32 [M]
  df: jax.Array  # float32 [M]: images whose references have the n-gram.
  log_num_images: jax.Array  # float32 []: log N, N the number of images.
  probe: int = flax.struct.field(pytree_node=False, default=1)
  collisions: int = flax.struct.field(pytree_node=False, default=0)

  def __len__(self) -> int:
    return int(self.hi.shape[0])

  @classmethod
  def build(cls, references: np.ndarray, images: np.ndarray,
            eos: bool = True, chunk: int = 8192) -> 'DocumentFrequencies':
    """The table of a reference set.

    Args:
      references: int [N, T]: every reference of every image, its tokens
        without <bos> (words, <eos>, <pad>...).
      images: int [N]: the image each reference describes (any ids).
      eos: <eos> is part of the n-grams, as in `cider_d`.
      chunk: references hashed per device call.
    """
    references = np.asarray(references, np.int32)
    images = np.asarray(images)
    if not len(references):
      raise ValueError('document frequencies need at least one reference')
    keys_of = jax.jit(_keys, static_argnames='eos')
    size = -(-len(references) // chunk) * chunk  # One shape: one compilation.
    padded = np.pad(references, ((0, size - len(references)), (0, 0)))
    keys, valid = [], []
    for i in range(0, size, chunk):
      k, v = jax.device_get(keys_of(padded[i:i + chunk], eos=eos))
      keys.append(k)
      valid.append(v)
    keys = np.concatenate(keys)[:len(references)].astype(np.uint64)
    keys = keys[..., 0] << np.uint64(32) | keys[..., 1]  # [N, G, T]
    valid = np.concatenate(valid)[:len(references)]
    owner = np.broadcast_to(images[:, None, None], valid.shape)[valid]
    keys = keys[valid]
    # df counts images: one (image, key) pair per image that has the n-gram.
    order = np.lexsort((keys, owner))
    keys, owner = keys[order], owner[order]
    new = np.ones(len(keys), bool)
    new[1:] = (keys[1:] != keys[:-1]) | (owner[1:] != owner[:-1])
    unique, df = np.unique(keys[new], return_counts=True)
    hi = (unique >> np.uint64(32)).astype(np.uint32)
    _, per_hi = np.unique(hi, return_counts=True)
    # NumPy leaves: the caller places the table on its devices.
    return cls(hi=hi, lo=unique.astype(np.uint32), df=df.astype(np.float32),
               log_num_images=np.float32(math.log(len(np.unique(images)))),
               probe=int(per_hi.max()),
               collisions=_collisions(references, valid, len(unique)))

  def lookup(self, hi: jax.Array, lo: jax.Array) -> jax.Array:
    """float32 df of each key (0 for a key not in the table), any shape."""
    table_hi, table_lo = jnp.asarray(self.hi), jnp.asarray(self.lo)
    first = jnp.searchsorted(table_hi, hi.ravel())  # [Q]
    index = first[:, None] + jnp.arange(self.probe)  # [Q, probe]
    inside = index < len(self)
    index = jnp.minimum(index, len(self) - 1)
    match = inside & (table_hi[index] == hi.ravel()[:, None]) & (
        table_lo[index] == lo.ravel()[:, None])
    df = jnp.asarray(self.df)[index]
    return jnp.sum(jnp.where(match, df, 0.0), -1).reshape(hi.shape)

  def idf(self, hi: jax.Array, lo: jax.Array) -> jax.Array:
    """log N - log max(1, df): an unseen n-gram counts as seen once."""
    return self.log_num_images - jnp.log(jnp.maximum(self.lookup(hi, lo), 1.0))


def _keys(tokens: jax.Array, *, eos: bool) -> tuple[jax.Array, jax.Array]:
  """tokens [N, T] -> 64-bit keys as uint32 pairs [N, G, T, 2], valid."""
  hi, lo, valid = ngram_keys(tokens, length(tokens, eos))
  return jnp.stack([hi, lo], -1), valid


def _collisions(references: np.ndarray, valid: np.ndarray,
                num_keys: int) -> int:
  """Distinct n-grams minus distinct keys: n-grams that shared a key.

  The n-grams are packed exactly, 16 bits a token (no n-gram holds <pad>,
  id 0, so n is implied); -1 when some id needs more than 16 bits.
  """
  if references.max(initial=0) >= 1 << 16:
    return -1
  t = references.shape[1]
  padded = np.pad(references.astype(np.uint64), ((0, 0), (0, MAX_N - 1)))
  codes = np.zeros(valid.shape, np.uint64)  # [N, G, T]
  code = np.zeros((len(references), t), np.uint64)
  for n in range(MAX_N):
    code = code | (padded[:, n:n + t] << np.uint64(16 * n))
    codes[:, n] = code
  return len(np.unique(codes[valid])) - num_keys


# ----------------------------------------------------------------------------
# The reward.
# ----------------------------------------------------------------------------


def _counts(hi, lo, valid):
  """Each window's count in its caption, and whether it is the first of its
  n-gram: [..., G, T] each."""
  same = ((hi[..., :, None] == hi[..., None, :]) &
          (lo[..., :, None] == lo[..., None, :]) &
          valid[..., :, None] & valid[..., None, :])  # [..., G, T, T]
  t = hi.shape[-1]
  earlier = jnp.tril(jnp.ones((t, t), bool), -1)
  first = valid & ~jnp.any(same & earlier, -1)
  return jnp.sum(same, -1).astype(jnp.float32), first


def cider_d(candidates: jax.Array, references: jax.Array,
            table: DocumentFrequencies, eos: bool = True,
            sigma: float = SIGMA) -> jax.Array:
  """CIDEr-D of each candidate against the references of its image.

  Args:
    candidates: int [B, S, T]: words, <eos>, <pad>... (no <bos>).
    references: int [B, R, T], the same layout; rows of <pad> are absent
      references (every image needs one).
    table: document frequencies, e.g. of the training references.
    eos: <eos> is part of the n-grams (the table must be built alike).
    sigma: the length penalty's width, in words.

  Returns:
    float32 [B, S], in the units of `cider.CiderD` (x10).
  """
  c_len = length(candidates, eos)  # [B, S]
  r_len = length(references, eos)  # [B, R]
  c_hi, c_lo, c_valid = ngram_keys(candidates, c_len)  # [B, S, G, T]
  r_hi, r_lo, r_valid = ngram_keys(references, r_len)  # [B, R, G, T]
  c_count, c_first = _counts(c_hi, c_lo, c_valid)
  r_count, r_first = _counts(r_hi, r_lo, r_valid)
  c_idf = table.idf(c_hi, c_lo)  # [B, S, G, T]
  r_idf = table.idf(r_hi, r_lo)  # [B, R, G, T]
  c_weight = jnp.where(c_first, c_count * c_idf, 0.0)  # tf-idf of each n-gram
  r_weight = jnp.where(r_first, r_count * r_idf, 0.0)
  c_norm = jnp.sqrt(jnp.sum(c_weight**2, -1))  # [B, S, G]
  r_norm = jnp.sqrt(jnp.sum(r_weight**2, -1))  # [B, R, G]
  # How often each candidate n-gram occurs in each reference.
  in_ref = jnp.sum(
      (c_hi[:, :, None, :, :, None] == r_hi[:, None, :, :, None, :]) &
      (c_lo[:, :, None, :, :, None] == r_lo[:, None, :, :, None, :]) &
      r_valid[:, None, :, :, None, :], -1)  # [B, S, R, G, T]
  r_tfidf = in_ref * c_idf[:, :, None]  # The reference's weight of it.
  # The clipped dot product: sum of min(c, r) * r over the n-grams.
  dot = jnp.sum(jnp.where(c_first[:, :, None],
                          jnp.minimum(c_weight[:, :, None], r_tfidf) * r_tfidf,
                          0.0), -1)  # [B, S, R, G]
  norms = c_norm[:, :, None] * r_norm[:, None]  # [B, S, R, G]
  cosine = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)
  delta = (c_len[:, :, None] - r_len[:, None, :]).astype(jnp.float32)
  penalty = jnp.exp(-delta**2 / (2 * sigma**2))  # [B, S, R]
  present = references[:, None, :, 0] != PAD  # [B, 1, R]
  scores = jnp.where(present, jnp.mean(cosine, -1) * penalty, 0.0)
  return SCALE * jnp.sum(scores, -1) / jnp.sum(present, -1)
