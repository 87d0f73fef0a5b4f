"""Beam search (capjax.decode) against exhaustive search, greedy and padding."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib
from capjax import decode
from capjax import models
from capjax.models import decoders
from capjax.data.vocab import BOS, EOS, PAD, UNK

V = 6  # <pad> <bos> <eos> <unk> and two words.
P = 3  # Attention positions of the fake model.
R = 101  # Hash buckets of the fake model's history.


def _hash(h, tokens):
  return (h * 31 + tokens + 1) % R


def fake_step(table):
  """A step whose log-probabilities depend on the whole prefix.

  The carry hashes the tokens so far; `table` [B, R, V] gives each image's
  logits for each hash, and the attention is a one-hot of the hash.
  """

  table = jnp.asarray(table)

  def step(carry, tokens):  # carry, tokens [B, W]
    h = _hash(carry, tokens)
    logits = table[jnp.arange(table.shape[0])[:, None], h]  # [B, W, V]
    return h, logits, jax.nn.one_hot(h % P, P)
  return step


def fake_search(table, mask=None, **kwargs):
  b = table.shape[0]
  w = kwargs['beam_size']
  return jax.jit(functools.partial(
      decode.search, fake_step(table), batch_size=b, num_positions=P,
      **kwargs))(jnp.zeros((b, w), jnp.int32), mask=mask)


def exhaustive(table_row, max_len, alpha, ban_unk):
  """Every caption of the fake model, best first: (score, logprob, tokens)."""
  length = max_len - 1
  banned = [PAD, BOS] + ([UNK] if ban_unk else [])
  out = []

  def expand(h, previous, prefix, logprob):
    h = _hash(h, previous)
    logits = table_row[h].astype(np.float64)
    logprobs = logits - np.log(np.sum(np.exp(logits)))
    for v in range(V):
      if v in banned:
        continue
      tokens, lp = prefix + [v], logprob + logprobs[v]
      if v == EOS or len(tokens) == length:
        penalty = ((5 + len(tokens)) / 6)**alpha
        out.append((lp / penalty, lp, tokens + [PAD] * (length - len(tokens))))
      else:
        expand(h, v, tokens, lp)

  expand(0, BOS, [], 0.0)
  return sorted(out, key=lambda x: -x[0])


def random_table(batch, seed=0, spread=3.0):
  return (spread * np.random.default_rng(seed).standard_normal(
      (batch, R, V))).astype(np.float32)


@pytest.mark.parametrize('alpha, ban_unk', [(0.0, False), (0.8, False),
                                            (0.6, True)])
def test_wide_beam_equals_exhaustive_search(alpha, ban_unk):
  max_len, n, batch = 5, 3, 6
  table = random_table(batch, seed=1)
  # 4 positions; at most 3^3 = 27 live prefixes, so a beam of 27 is exact.
  out = fake_search(table, beam_size=27, max_len=max_len, alpha=alpha,
                    num_return=n, ban_unk=ban_unk)
  greedy_differs = 0
  for b in range(batch):
    best = exhaustive(table[b], max_len, alpha, ban_unk)[:n]
    np.testing.assert_array_equal(out.tokens[b], [t for _, _, t in best])
    np.testing.assert_allclose(out.scores[b], [s for s, _, _ in best],
                               rtol=1e-5)
    np.testing.assert_allclose(out.logprobs[b], [lp for _, lp, _ in best],
                               rtol=1e-5)
    greedy = fake_search(table[b:b + 1], beam_size=1, max_len=max_len,
                         alpha=alpha, ban_unk=ban_unk)
    greedy_differs += not np.array_equal(greedy.tokens[0, 0], best[0][2])
  # The search is worth testing only if greedy misses the best somewhere.
  assert greedy_differs > 0


def test_narrow_beam_scores_between_greedy_and_the_best():
  max_len, batch = 6, 8
  table = random_table(batch, seed=2)
  scores = {w: np.asarray(fake_search(table, beam_size=w, max_len=max_len,
                                      alpha=0.7).scores[:, 0])
            for w in (1, 3)}
  best = [exhaustive(table[b], max_len, 0.7, False)[0][0]
          for b in range(batch)]
  assert np.all(scores[3] >= scores[1] - 1e-6)
  assert np.all(scores[3] <= np.asarray(best) + 1e-5)


def test_attention_of_the_best_caption_follows_its_path():
  table = random_table(2, seed=3)
  out = fake_search(table, beam_size=4, max_len=6)
  for b in range(2):
    h, previous = 0, BOS
    for t, token in enumerate(np.asarray(out.tokens[b, 0])):
      if token == PAD:
        np.testing.assert_array_equal(out.alphas[b, t], 0)
        continue
      h = _hash(h, previous)
      np.testing.assert_array_equal(out.alphas[b, t],
                                    np.eye(P)[h % P])
      previous = token


def test_results_do_not_depend_on_the_batch():
  table = random_table(6, seed=4)
  kwargs = dict(beam_size=3, max_len=7, alpha=0.5, num_return=2)
  whole = fake_search(table, **kwargs)
  for rows in ([0], [5, 2], [1, 3, 4]):
    part = fake_search(table[rows], **kwargs)
    np.testing.assert_array_equal(part.tokens, np.asarray(whole.tokens)[rows])
    np.testing.assert_array_equal(part.scores, np.asarray(whole.scores)[rows])


def test_padding_rows_are_empty_and_do_not_change_the_others():
  table = random_table(4, seed=5)
  kwargs = dict(beam_size=3, max_len=7)
  mask = jnp.array([True, False, True, False])
  masked = fake_search(table, mask=mask, **kwargs)
  whole = fake_search(table, **kwargs)
  np.testing.assert_array_equal(masked.tokens[::2], whole.tokens[::2])
  np.testing.assert_array_equal(masked.tokens[1::2], PAD)
  np.testing.assert_array_equal(masked.alphas[1::2], 0)
  assert np.all(np.asarray(masked.scores[1::2]) == decode.NEG_INF)


def test_tokens_after_eos_are_padding():
  table = random_table(8, seed=6)
  tokens = np.asarray(fake_search(table, beam_size=3, max_len=7,
                                  num_return=3).tokens)
  for caption in tokens.reshape(-1, tokens.shape[-1]):
    ends = np.flatnonzero(caption == EOS)
    if ends.size:
      assert ends.size == 1 and np.all(caption[ends[0] + 1:] == PAD)
      assert np.all(caption[:ends[0]] >= UNK)
    else:  # Reached max_len: all words.
      assert np.all(caption >= UNK)


def test_repeated_trigram_ban():
  tokens = jnp.array([[[4, 5, 4, 5, PAD, PAD], [4, 4, 4, PAD, PAD, PAD]]])
  # Position 4 follows (4, 5), which started the trigram (4, 5, 4).
  ban = decode._repeated_trigram_ban(tokens, jnp.array(4), V)
  assert np.flatnonzero(ban[0, 0]).tolist() == [4]
  # Position 3 follows (4, 4); (4, 4, 4) is at 0..2.
  ban = decode._repeated_trigram_ban(tokens, jnp.array(3), V)
  assert np.flatnonzero(ban[0, 1]).tolist() == [4]
  # Position 2: no complete trigram before it yet.
  assert not np.any(decode._repeated_trigram_ban(tokens, jnp.array(2), V))


def test_trigram_ban_in_search():
  # Word 4 is always the likeliest, then word 5; <eos> never wins.
  table = np.full((1, R, V), -5.0, np.float32)
  table[..., 4], table[..., 5], table[..., EOS] = 5.0, 3.0, -9.0
  tokens = fake_search(table, beam_size=2, max_len=9).tokens[0, 0]
  np.testing.assert_array_equal(tokens, [4] * 8)
  tokens = fake_search(table, beam_size=2, max_len=9,
                       ban_repeated_trigrams=True).tokens[0, 0]
  words = np.asarray(tokens).tolist()
  assert len(words) == 8 and EOS not in words and words.count(4) >= 4
  trigrams = list(zip(words, words[1:], words[2:]))
  assert len(trigrams) == len(set(trigrams))


# ----------------------------------------------------------------------------
# On the captioner.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module', params=decoders.NAMES)
def captioner(request):
  """(predict, variables, images) of a tiny captioner with each decoder."""
  config = config_lib.defaults().model
  config.encoder.arch = 'resnet_micro'
  config.decoder.update(name=request.param, embed_dim=16, hidden_dim=24,
                        attention_dim=12)
  config.decoder.transformer.update(encoder_layers=1, layers=2, model_dim=16,
                                    heads=2, mlp_dim=32)
  predict = models.Predict(models.build_captioner(config, 9, max_len=8))
  # 8 px: resnet_micro's 2x2 grid, 4 positions to attend to.
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (5, 8, 8, 3)), jnp.float32)
  variables = jax.jit(predict.init)(jax.random.key(0), images[:1],
                                    jnp.zeros((1, 1, 4), jnp.int32))
  # Sharper logits than the random init's, so that captions end early.
  variables = jax.tree.map(lambda x: x * 3, variables)
  return predict, variables, images


def test_beam_one_is_greedy(captioner):
  predict, variables, images = captioner

  @jax.jit
  def greedy(variables, images):
    features = predict.encode(variables, {'image': images})
    out = decode.sample(predict.decoding(variables, features, 1), None,
                        max_len=8)
    return out.tokens[:, 0], out.alphas[:, 0]

  greedy_tokens, greedy_alphas = greedy(variables, images)
  out = jax.jit(functools.partial(
      decode.beam_search, predict, beam_size=1, max_len=8))(variables, images)
  np.testing.assert_array_equal(out.tokens[:, 0], greedy_tokens)
  ended = np.asarray(greedy_tokens != PAD)
  np.testing.assert_allclose(np.asarray(out.alphas)[ended],
                             np.asarray(greedy_alphas)[ended], atol=1e-6)


def test_wide_beam_equals_exhaustive_search_of_each_decoder(captioner):
  """A beam as wide as every live prefix finds the caption that teacher
  forcing gives the highest log-probability, of all there are: the steps
  beam search takes are the decoder's own, carry reordering included."""
  predict, variables, images = captioner
  # The random init's own weights: its flatter word distributions make
  # greedy decoding miss the best caption, where the fixture's sharpened
  # ones stop at once.
  variables = jax.tree.map(lambda x: x / 3, variables)
  max_len, vocab = 4, 9  # 3 positions; words 4..8, <eos>; <unk> banned.
  words = list(range(4, vocab))
  captions = [c + (EOS,) for n in range(max_len - 1)
              for c in itertools.product(words, repeat=n)]
  captions += list(itertools.product(words, repeat=max_len - 1))
  tokens = np.full((len(captions), max_len), PAD, np.int32)
  for i, c in enumerate(captions):
    tokens[i, :len(c) + 1] = (BOS,) + c
  # Features of 8 images of their own: random images look alike to a random
  # encoder.
  shape = predict.encode(variables, {'image': images}).shape  # [B, P, C]
  features = jax.random.normal(jax.random.key(5), (8,) + shape[1:])
  logits, _ = jax.jit(predict.logits)(
      variables, features, jnp.broadcast_to(
          tokens, (8,) + tokens.shape))  # [B, N, T, V]
  # Beam search scores by the model's log-probabilities (banned words are
  # left out of the candidates, not of the softmax).
  logp = np.asarray(jax.nn.log_softmax(logits))  # [B, N, T, V]
  targets = tokens[:, 1:]  # [N, T]
  chosen = np.take_along_axis(logp, np.broadcast_to(
      targets[..., None], logp.shape[:3] + (1,)), -1)[..., 0]  # [B, N, T]
  totals = np.sum(np.where(targets != PAD, chosen, 0.0), -1)  # [B, N]
  # 5^2 = 25 live prefixes at the last position: a beam of 25 is exact.
  out = jax.jit(functools.partial(
      decode.beam_search_features, predict, beam_size=25, max_len=max_len,
      ban_unk=True))(variables, features)
  best = np.argmax(totals, -1)  # [B]
  np.testing.assert_array_equal(out.tokens[:, 0], targets[best])
  np.testing.assert_allclose(out.logprobs[:, 0], totals.max(-1), rtol=1e-5)
  greedy = decode.beam_search_features(predict, variables, features,
                                       beam_size=1, max_len=max_len,
                                       ban_unk=True)
  # Worth testing only if greedy decoding misses the best somewhere.
  assert (np.asarray(greedy.tokens[:, 0]) != targets[best]).any()


def test_model_search_compiles_once_and_batches_independently(captioner):
  predict, variables, images = captioner
  traces = []

  @jax.jit
  def search(variables, images, mask):
    traces.append(1)
    return decode.beam_search(predict, variables, images, beam_size=3,
                              max_len=8, num_return=2, alpha=0.6, mask=mask)

  mask = jnp.array([True, True, True, False, False])
  first = search(variables, images, mask)
  again = search(variables, images[::-1], mask)
  assert len(traces) == 1
  np.testing.assert_array_equal(first.tokens[3:], PAD)
  alone = search(variables, jnp.concatenate([images[2:3]] * 5), mask)
  np.testing.assert_array_equal(alone.tokens[0], first.tokens[2])
  np.testing.assert_array_equal(again.tokens[2], first.tokens[2])
  assert np.all(np.diff(np.asarray(first.scores[:3]), axis=1) <= 0)


def test_search_from_features_is_search_from_images(captioner):
  """One encoder pass can serve both a loss and the search: same captions."""
  predict, variables, images = captioner
  mask = jnp.array([True, True, True, True, False])
  options = dict(beam_size=3, max_len=8, num_return=2, alpha=0.6,
                 ban_repeated_trigrams=True, mask=mask)

  # Encoded by one program and searched by another: nothing but the features
  # carries the images over.
  features = jax.jit(predict.encode)(variables,
                                     {'image': images})  # [B, P, C]
  out = jax.jit(functools.partial(decode.beam_search_features, predict,
                                  **options))(variables, features)
  expected = jax.jit(functools.partial(decode.beam_search, predict,
                                       **options))(variables, images)
  assert out.tokens.shape == (5, 2, 7) and out.alphas.shape == (5, 7, 4)
  for name in ('tokens', 'scores', 'logprobs', 'alphas'):
    np.testing.assert_array_equal(getattr(out, name), getattr(expected, name),
                                  err_msg=name)
  assert (np.asarray(out.tokens[:4, 0]) != PAD).any()


def test_bad_arguments():
  table = random_table(1)
  with pytest.raises(ValueError, match='num_return'):
    fake_search(table, beam_size=2, max_len=5, num_return=3)
  with pytest.raises(ValueError, match='alpha'):
    fake_search(table, beam_size=2, max_len=5, alpha=-1.0)




def test_draw_follows_the_distribution():
  logits = jnp.array([decode.NEG_INF, 0.5, decode.NEG_INF, 2.0, -1.0, 0.0,
                      decode.NEG_INF])
  logp = jax.nn.log_softmax(logits)
  rngs = jax.random.split(jax.random.key(0), 40_000)
  words = np.asarray(jax.jit(jax.vmap(decode.draw, (0, None)))(rngs, logp))
  frequencies = np.bincount(words, minlength=7) / len(words)
  # Within 4 standard errors (at most 0.0025 here) of the probabilities;
  # the words of probability 0 never.
  np.testing.assert_allclose(frequencies, np.exp(logp), atol=0.01)
  assert not np.isin(words, [0, 2, 6]).any()
