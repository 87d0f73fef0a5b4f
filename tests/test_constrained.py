"""Constrained beam search (capjax.constrained) against exhaustive search.

The fake model is test_decode's: logits that depend on the whole prefix
through a hash, V = 6 tokens of which <unk> (3), 4 and 5 are the words.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib
from capjax import constrained
from capjax import decode
from capjax import models
from capjax.data.vocab import EOS, PAD, SPECIALS, Vocab
from test_decode import P, exhaustive, fake_step, random_table

NEG_INF = decode.NEG_INF


def fake_search(table, phrases, mask=None, **kwargs):
  b = table.shape[0]
  w = kwargs['beam_size'] * 2**phrases.shape[1]
  return jax.jit(functools.partial(
      constrained.search, fake_step(table), batch_size=b, num_positions=P,
      **kwargs))(jnp.zeros((b, w), jnp.int32), jnp.asarray(phrases),
                 mask=mask)


def phrases_array(constraint_sets, c=2, a=2, l=4):
  """[B, C, A, L] from per image lists of constraints, each a list of
  alternative phrases (token id lists); an empty constraint is absent."""
  out = np.full((len(constraint_sets), c, a, l), constrained.NO_TOKEN,
                np.int32)
  for i, constraints in enumerate(constraint_sets):
    for j, alternatives in enumerate(constraints):
      for k, phrase in enumerate(alternatives):
        out[i, j, k, :len(phrase)] = phrase
  return out


def words(tokens):
  """The caption's words: up to <eos>, without <pad>."""
  out = []
  for token in np.asarray(tokens).tolist():
    if token in (EOS, PAD):
      break
    out.append(token)
  return out


def contains(caption, phrase):
  n = len(phrase)
  return any(caption[i:i + n] == list(phrase)
             for i in range(len(caption) - n + 1))


def met_bits(caption, constraints):
  """Bit c set when the caption contains an alternative of constraint c."""
  return sum(1 << c for c, alternatives in enumerate(constraints)
             if alternatives and any(contains(caption, p)
                                     for p in alternatives))


def present_bits(constraints):
  return sum(1 << c for c, alternatives in enumerate(constraints)
             if alternatives)


def test_no_constraints_is_plain_beam_search():
  table = random_table(4, seed=11)
  kwargs = dict(beam_size=3, max_len=7, alpha=0.6, num_return=2,
                ban_repeated_trigrams=True)
  expected = jax.jit(functools.partial(
      decode.search, fake_step(table), batch_size=4, num_positions=P,
      **kwargs))(jnp.zeros((4, 3), jnp.int32))
  out = fake_search(table, phrases_array([[]] * 4), **kwargs)
  for name in ('tokens', 'scores', 'logprobs', 'alphas'):
    np.testing.assert_array_equal(getattr(out, name), getattr(expected, name),
                                  err_msg=name)
  assert np.all(out.satisfied) and not np.any(out.met)


# Words are 3 (<unk>), 4 and 5; captions have at most 4 tokens.
CONSTRAINT_SETS = [
    [],  # None: the best captions of all.
    [[[4, 5]]],  # A two-word phrase.
    [[[5, 5], [3]]],  # Two alternatives.
    [[[4]], [[5, 4]]],  # Two constraints.
    [[[4, 5]], [[5, 4]]],  # Two that one caption can meet at once: 4 5 4.
    [[[3, 4, 5], [5, 5, 5, 5]], [[5], [4, 4]]],  # Long phrases.
    [[[4, 4, 4]], [[5, 5, 5]]],  # Too long together: 6 words.
    [[], [[3, 3, 3, 3]]],  # One caption; constraint 0 absent.
]


def test_wide_beams_equal_exhaustive_search():
  """Exact in these tiny cases: with T = 4 positions and 3 words, at most
  3^3 = 27 live prefixes exist at any step (all of them in one state at
  worst), so with W = 27 no state's beam ever drops a live hypothesis; its
  2W candidates of a step hold all <= 27 live extensions and <= 27 ending in
  <eos>; at the last step, where everything ends, the best 2W of the new
  captions hold the best W, so every state's pool is its W best captions.
  So the search returns the top n of the captions meeting all constraints
  and, where there are none, the top n of those meeting the most (as a set
  of constraints, the likeliest such set first).
  """
  max_len, alpha, n, w = 5, 0.7, 3, 27
  sets = CONSTRAINT_SETS * 2
  table = random_table(len(sets), seed=12)
  out = fake_search(table, phrases_array(sets), beam_size=w, max_len=max_len,
                    alpha=alpha, num_return=n)
  fallbacks = 0
  for b, constraints in enumerate(sets):
    # Every caption, best first, and the constraints it meets.
    every = [(score, lp, tokens, met_bits(words(tokens), constraints))
             for score, lp, tokens in exhaustive(table[b], max_len, alpha,
                                                 False)]
    everything = present_bits(constraints)
    wanted = [x for x in every if x[3] == everything]
    satisfied = bool(wanted)
    if not wanted:
      fallbacks += 1
      best = max(every, key=lambda x: (bin(x[3]).count('1'), x[0]))
      wanted = [x for x in every if x[3] == best[3]]
    wanted = wanted[:n]
    k = len(wanted)
    np.testing.assert_array_equal(out.tokens[b, :k], [x[2] for x in wanted],
                                  err_msg=str(constraints))
    np.testing.assert_allclose(out.scores[b, :k], [x[0] for x in wanted],
                               rtol=1e-5)
    np.testing.assert_allclose(out.logprobs[b, :k], [x[1] for x in wanted],
                               rtol=1e-5)
    np.testing.assert_array_equal(out.met[b, :k], [x[3] for x in wanted])
    np.testing.assert_array_equal(out.satisfied[b, :k], satisfied)
    # Fewer than n captions: the other slots are empty.
    np.testing.assert_array_equal(out.tokens[b, k:], PAD)
    assert np.all(np.asarray(out.scores[b, k:]) == NEG_INF)
    assert not np.any(out.satisfied[b, k:])
  assert fallbacks == 2  # Set 6, on both tables.
  # The constraints changed the captions (set 0 is the unconstrained one).
  assert not np.array_equal(out.tokens[1], out.tokens[0])


def random_constraints(rng, count):
  """Random sets of 0..2 constraints of 1..2 phrases of 1..3 words 3..5."""
  return [[[rng.integers(3, 6, rng.integers(1, 4)).tolist()
            for _ in range(rng.integers(1, 3))]
           for _ in range(rng.integers(0, 3))] for _ in range(count)]


def test_captions_contain_their_constraints_batched_as_alone():
  rng = np.random.default_rng(13)
  sets = random_constraints(rng, 12)
  table = random_table(len(sets), seed=13)
  phrases = phrases_array(sets, l=3)
  kwargs = dict(beam_size=2, max_len=8, alpha=0.5, num_return=2,
                ban_unk=False)

  @jax.jit
  def batched(table, phrases, mask):
    b = table.shape[0]
    return constrained.search(
        fake_step(table), jnp.zeros((b, 2 * 4), jnp.int32), phrases,
        batch_size=b, num_positions=P, mask=mask, **kwargs)

  out = batched(table, phrases, np.ones(len(sets), bool))
  tokens = np.asarray(out.tokens)
  for b, constraints in enumerate(sets):
    for i in range(2):
      caption = words(tokens[b, i])
      assert out.met[b, i] == met_bits(caption, constraints), (caption,
                                                               constraints)
      assert out.satisfied[b, i] == (
          out.met[b, i] == present_bits(constraints))
  # Most of them meet all of theirs (only a narrow beam can miss).
  assert np.mean(out.satisfied[:, 0]) > 0.8
  constrained_images = [b for b, c in enumerate(sets) if c]
  assert len(constrained_images) >= 6

  # Each image alone (one compiled search for all of them): the same.
  traces = []

  @jax.jit
  def alone(table, phrases):
    traces.append(1)
    return constrained.search(
        fake_step(table), jnp.zeros((1, 2 * 4), jnp.int32), phrases,
        batch_size=1, num_positions=P, **kwargs)

  for b in range(len(sets)):
    one = alone(table[b:b + 1], phrases[b:b + 1])
    for name in ('tokens', 'scores', 'satisfied', 'met'):
      np.testing.assert_array_equal(getattr(one, name)[0],
                                    getattr(out, name)[b], err_msg=name)
  assert len(traces) == 1

  # Padding rows: empty, and the others unchanged.
  mask = np.arange(len(sets)) % 3 != 1
  masked = batched(table, phrases, mask)
  np.testing.assert_array_equal(np.asarray(masked.tokens)[mask],
                                tokens[mask])
  np.testing.assert_array_equal(masked.tokens[1::3], PAD)
  assert not np.any(masked.satisfied[1::3])


def test_on_the_captioner():
  """The model's search, from features: the unconstrained image gets
  `decode.beam_search`'s captions, the others contain their phrases."""
  config = config_lib.defaults().model
  config.decoder.update(embed_dim=16, hidden_dim=24, attention_dim=12)
  predict = models.Predict(models.build_captioner(config, 9))
  features = jnp.asarray(np.random.default_rng(0).standard_normal(
      (3, 4, 8)), jnp.float32)  # [B, P, C]
  # The decoder's variables only: the search never encodes.
  variables = jax.jit(functools.partial(
      predict.model.init, method=predict.model.logits))(
          jax.random.key(0), features[:1], jnp.zeros((1, 1, 4), jnp.int32))
  # Sharper logits than the random init's, so that captions end early.
  variables = jax.tree.map(lambda x: x * 3, variables)
  sets = [[[[5, 6]], [[7]]], [[[8], [4]]], []]
  options = dict(beam_size=2, max_len=8, alpha=0.6, ban_unk=True)
  out = jax.jit(functools.partial(
      constrained.constrained_beam_search_features, predict, **options))(
          variables, features, phrases_array(sets, a=2, l=2))
  expected = jax.jit(functools.partial(
      decode.beam_search_features, predict, **options))(variables, features)
  np.testing.assert_array_equal(out.tokens[2], expected.tokens[2])
  np.testing.assert_allclose(out.scores[2], expected.scores[2], rtol=1e-5)
  assert out.alphas.shape == expected.alphas.shape == (3, 7, 4)
  for b in range(2):
    assert out.satisfied[b, 0]
    caption = words(out.tokens[b, 0])
    assert met_bits(caption, sets[b]) == present_bits(sets[b]), caption
    assert caption != words(expected.tokens[b, 0])


def test_encode_constraints():
  vocab = Vocab(SPECIALS + ('a', 'red', 'square', 'box', 'dog'))
  phrases = constrained.encode_constraints(
      vocab, [[['red square', 'red box'], ['dog']], [], ['a']])
  x = constrained.NO_TOKEN
  np.testing.assert_array_equal(phrases, [
      [[[5, 6], [5, 7]], [[8, x], [x, x]]],
      [[[x, x], [x, x]], [[x, x], [x, x]]],
      [[[4, x], [x, x]], [[x, x], [x, x]]]])
  assert constrained.encode_constraints(
      vocab, [[['Dog.']]], num_constraints=3, num_alternatives=2,
      max_phrase_len=4).shape == (1, 3, 2, 4)
  with pytest.raises(ValueError, match="'cat'"):
    constrained.encode_constraints(vocab, [[['red box', 'red cat']]])
  with pytest.raises(ValueError, match='no words'):
    constrained.encode_constraints(vocab, [[['red box', ' . ']]])
  with pytest.raises(ValueError, match='at most 1'):
    constrained.encode_constraints(vocab, [[['red box', 'dog']]],
                                   num_alternatives=1)
  with pytest.raises(ValueError, match='at most 4'):
    constrained.encode_constraints(vocab, [[['a']] * 5])


def test_bad_arguments():
  table = random_table(1)
  with pytest.raises(ValueError, match='constraints'):
    fake_search(table, phrases_array([[]], c=5), beam_size=2, max_len=5)
  with pytest.raises(ValueError, match='num_return'):
    fake_search(table, phrases_array([[]]), beam_size=2, max_len=5,
                num_return=3)
  with pytest.raises(ValueError, match='alpha'):
    fake_search(table, phrases_array([[]]), beam_size=2, max_len=5,
                alpha=-1.0)
