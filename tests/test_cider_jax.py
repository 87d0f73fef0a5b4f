"""capjax.metrics.cider_jax: the on-device CIDEr-D agrees with the host one."""

import collections
import functools

import jax
import numpy as np
import pytest

from capjax.data.vocab import EOS, PAD
from capjax.metrics import cider
from capjax.metrics import cider_jax

T = 12  # Tokens per caption.


def _caption(rng, words: int, vocab: int) -> np.ndarray:
  tokens = np.full(T, PAD, np.int32)
  tokens[:words] = rng.integers(4, vocab, words)
  if words < T:
    tokens[words] = EOS  # A caption of T words has no room for <eos>.
  return tokens


def _words(tokens: np.ndarray, eos: bool) -> list[str]:
  out = []
  for t in tokens:
    if t == EOS:
      return out + ['<eos>'] * eos
    if t == PAD:
      break
    out.append(str(t))
  return out


def _random_set(seed: int, images: int = 40, samples: int = 4,
                refs: int = 5, vocab: int = 25):
  """References [B, R, T] and candidates [B, S, T] over a small vocabulary,
  so that n-grams recur: copies of a reference, repeated words, an empty
  caption, captions of T words (no <eos>), images with fewer references."""
  rng = np.random.default_rng(seed)
  references = np.stack([
      np.stack([_caption(rng, rng.integers(1, T + 1), vocab)
                for _ in range(refs)]) for _ in range(images)])
  references[3, 2:] = PAD
  references[7, 1:] = PAD
  candidates = np.stack([
      np.stack([_caption(rng, rng.integers(0, T + 1), vocab)
                for _ in range(samples)]) for _ in range(images)])
  candidates[:, 0] = references[:, 0]
  candidates[5, 1] = _caption(rng, 0, vocab)
  candidates[6, 1, :6] = 9
  return references, candidates


def _table(references, eos):
  present = references[..., 0] != PAD  # [B, R]
  images = np.broadcast_to(np.arange(len(references))[:, None],
                           present.shape)
  return cider_jax.DocumentFrequencies.build(references[present],
                                             images[present], eos=eos)


@pytest.mark.parametrize('eos', [False, True])
@pytest.mark.parametrize('seed', [0, 1])
def test_agrees_with_the_host_cider_d(seed, eos):
  references, candidates = _random_set(seed)
  images, samples = candidates.shape[:2]
  host = cider.CiderD([[_words(r, eos) for r in refs if r[0] != PAD]
                       for refs in references])
  expected = np.array(host.per_image(
      [_words(c, eos) for cands in candidates for c in cands],
      np.repeat(np.arange(images), samples))).reshape(images, samples)
  table = _table(references, eos)
  got = jax.jit(functools.partial(cider_jax.cider_d, eos=eos))(
      candidates, references, table)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  # The set is not degenerate: copies score high, and not everything ties.
  assert expected[:, 0].mean() > 2 * expected[:, 1:].mean() > 0


def test_the_table_counts_images_per_n_gram():
  references, _ = _random_set(2)
  table = _table(references, eos=True)
  df = collections.Counter()
  for refs in references:
    grams = set()
    for r in refs:
      if r[0] != PAD:
        tokens = _words(r, eos=True)
        grams |= {tuple(tokens[i:i + n]) for n in range(1, 5)
                  for i in range(len(tokens) - n + 1)}
    df.update(grams)
  assert len(table) == len(df) and table.collisions == 0
  # Each n-gram's key finds its count; an unseen one finds 0.
  grams = list(df)[::7]
  tokens = np.zeros((len(grams), T), np.int32)
  for row, gram in enumerate(grams):
    tokens[row, :len(gram)] = [EOS if w == '<eos>' else int(w) for w in gram]
  lengths = np.array([len(g) for g in grams])
  hi, lo, _ = cider_jax.ngram_keys(tokens, lengths)
  n = lengths - 1
  found = table.lookup(hi[np.arange(len(grams)), n, 0],
                       lo[np.arange(len(grams)), n, 0])
  np.testing.assert_array_equal(found, [df[g] for g in grams])
  unseen_hi, unseen_lo, _ = cider_jax.ngram_keys(
      np.full((1, T), 99, np.int32), np.array([T]))
  assert table.lookup(unseen_hi[0, 3, 0], unseen_lo[0, 3, 0]) == 0


def test_lookup_compares_both_lanes_of_keys_sharing_a_first_lane():
  # Keys that share `hi` (no real 64-bit collision is at hand): the lookup
  # must tell them apart by `lo`, and find the last of a run.
  table = cider_jax.DocumentFrequencies(
      hi=np.array([1, 5, 5, 5, 9], np.uint32),
      lo=np.array([0, 2, 4, 7, 0], np.uint32),
      df=np.array([10, 20, 30, 40, 50], np.float32),
      log_num_images=np.float32(np.log(100)), probe=3)
  hi = np.array([5, 5, 5, 5, 9, 9, 2], np.uint32)
  lo = np.array([2, 4, 7, 3, 0, 1, 0], np.uint32)
  np.testing.assert_array_equal(table.lookup(hi, lo),
                                [20, 30, 40, 0, 50, 0, 0])
  np.testing.assert_allclose(
      table.idf(hi[:1], lo[:1]), [np.log(100) - np.log(20)], rtol=1e-6)


def test_keys_differ_between_n_gram_lengths_and_orders():
  tokens = np.array([[7, 8, 7, 8, 7, 8]], np.int32)
  hi, lo, valid = cider_jax.ngram_keys(tokens, np.array([6]))
  keys = {(int(h), int(l)) for h, l, v in zip(
      np.ravel(hi), np.ravel(lo), np.ravel(valid)) if v}
  # 7, 8 | 78, 87 | 787, 878 | 7878, 8787: 8 distinct n-grams.
  assert len(keys) == 8
