"""Constrained beam search: captions that must contain given phrases.

Anderson, Fernando, Johnson and Gould 2017, "Guided Open Vocabulary Image
Captioning with Constrained Beam Search" (EMNLP), the decoding of the nocaps
baseline (Agrawal et al. 2019): captions are searched under constraints such
as "the caption mentions a red square or a red box, and a dog", typically
object words a detector found in the image but the captioner never saw in
training.

Constraints. An image has up to C constraints; a constraint is a set of
alternative phrases (synonyms, or word forms), each a sequence of token ids,
and it is met by a caption that contains any one of its phrases as a
contiguous run of words. A caption satisfies the image's constraints when it
meets all of them. They are given as one padded array, `phrases` int32
[B, C, A, L]: phrases[b, c, a] is alternative a of constraint c of image b,
its words first and `NO_TOKEN` (-1) after them; an empty row is no
alternative, and a constraint with no alternative is absent, met from the
start (images with fewer than C constraints). `encode_constraints` builds
the array from phrase strings.

The algorithm. A finite-state machine accepts the captions that meet every
constraint; the search keeps a beam of W hypotheses for each of its states
and, at every step, extends every hypothesis of every state by every word
and files each extension under the state it leads to, each state keeping its
W best. Unlike one beam for everything, this keeps the likelier captions
that ignore the constraints from crowding out those on their way to meeting
them; the captions returned are the best finished ones of the accepting
state. Here a state is the set of constraints already met, a bitmask over C
(S = 2^C states, state S - 1 accepting): once met, a constraint stays met,
so a hypothesis only ever moves to a superset. Whether the next word v
completes a phrase is decided from the hypothesis's own words: v is the
phrase's last word and the phrase's other l - 1 words are the hypothesis's
last l - 1 (the longest phrase is short, so this naive test costs less than
tracking a matching automaton per phrase, and needs no state for it). So
the partial match of a multi-word phrase has no state (and beam) of its
own, as it can have in the paper's machines: a hypothesis halfway through
"red square" competes with the others of its met-set. Overlapping and nested
phrases, and a word completing several constraints at once, are all handled
by the same test.

One step, per image (every array has a fixed shape; one `lax.while_loop`):

1. The model steps all S x W hypotheses at once, as S * W beams of the image:
   the image's features are shared, and `step` is the one `decode.search`
   takes, so any decoder that works there works here.
2. Every (hypothesis, word) extension either stays in its state or, when the
   word completes a phrase of a constraint not yet met, moves to the larger
   state. The words that move are the last words of phrases (K = C * A at
   most per hypothesis), so the moves are a short list and the top-2W of the
   staying extensions is taken per state over [W * V], not over [S * W * V].
3. Each state takes the best 2W of its staying and incoming extensions; as
   in `decode.search`, those ending in <eos> (or at the last position) join
   the state's pool of W finished captions (score: log-probability / length
   penalty), the W best others stay alive, and the model's carry is gathered
   by (state, beam).
4. An image stops when no live hypothesis of any state can beat the n-th
   finished caption of the accepting state: any state may still reach it,
   and with alpha >= 0 a hypothesis's best reachable score is its
   log-probability over the penalty of the longest caption.

Results: the n best finished captions of the accepting state. When none
finishes within max_len (the phrases do not fit, or the beams were too
narrow), the best of the state with the most constraints met comes back
instead, with `satisfied` False; `met` says which constraints a caption
meets. With no constraints (all absent) the search is `decode.search`,
result for result.

Cost and limits: S = 2^C times the model steps and memory of a width-W beam
search, so C is at most `MAX_CONSTRAINTS` = 4 (16 states); 2 or 3
constraints cost 4x or 8x. A phrase longer than T = max_len - 1 words can
never be met. Its tokens must not be <pad>, <bos> or <eos>
(`encode_constraints` gives words of the vocabulary only). The constraints
are data, not shapes: one compiled search serves any phrases of the same
[C, A, L]. Banned words (<unk> with
`ban_unk`, repeated trigrams) stay banned, phrase or not.

Shapes: B images, C constraints, A alternatives, L phrase words, S = 2^C
states, W beams per state, T = max_len - 1 generated positions, V words, P
attention positions, n returned captions per image, K = C * A phrases.
"""

from collections.abc import Sequence
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from capjax import decode
from capjax.data import tokenizer
from capjax.data.vocab import BOS, EOS, PAD, UNK, Vocab
from capjax.decode import NEG_INF
from capjax.errors import UserError
from capjax.models import concepts as concept_head

NO_TOKEN = -1  # Pads `phrases` after a phrase's words.
# At most 2^4 = 16 states: 16 times the work of a plain beam search.
MAX_CONSTRAINTS = 4

# decode's own helpers, so that both searches step, gather and ban alike.
# pylint: disable=protected-access
_gather = decode._gather
_repeated_trigram_ban = decode._repeated_trigram_ban
# pylint: enable=protected-access


@flax.struct.dataclass
class ConstrainedBeamState:
  """The while loop's state; every array has a fixed shape."""
  t: jax.Array  # int32 []: the position being generated, 0..T-1.
  carry: Any  # The model's carry, leaves [B, S * W, ...], state-major.
  live_tokens: jax.Array  # int32 [B, S, W, T], <pad> after position t.
  live_logprobs: jax.Array  # float32 [B, S, W]; NEG_INF for no beam.
  live_alphas: jax.Array  # float32 [B, S, W, T, P]
  done_tokens: jax.Array  # int32 [B, S, W, T], ending in <eos> or at T.
  done_scores: jax.Array  # float32 [B, S, W] sorted, length-penalised.
  done_logprobs: jax.Array  # float32 [B, S, W]
  done_alphas: jax.Array  # float32 [B, S, W, T, P]
  active: jax.Array  # bool [B]: a live beam can still beat the results.


@flax.struct.dataclass
class ConstrainedCaptions(decode.Captions):
  """The top-n captions of each image, best first, and what they meet.

  `tokens`, `scores`, `logprobs` and `alphas` are as in `decode.Captions`.
  """
  satisfied: jax.Array  # bool [B, n]: the caption meets every constraint.
  met: jax.Array  # int32 [B, n]: bit c set if it meets present constraint c.


def phrase_lengths(phrases: jax.Array) -> jax.Array:
  """int32 [B, C, A]: the words of each phrase, before its first NO_TOKEN."""
  return jnp.sum(jnp.cumprod(phrases >= 0, axis=-1), axis=-1).astype(jnp.int32)


def _gather_states(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, S, J, ...] -> x[b, s, index[b, s, k], ...]: [B, S, K, ...]."""
  b, s = index.shape[:2]
  out = _gather(x.reshape((b * s,) + x.shape[2:]), index.reshape(b * s, -1))
  return out.reshape((b, s) + out.shape[1:])


def _prefix_matches(tokens: jax.Array, t: jax.Array, phrases: jax.Array,
                    lengths: jax.Array) -> jax.Array:
  """bool [B, S, W, C, A]: the hypothesis ends with all but the phrase's last
  word, so that the word generated at position t would complete it.

  tokens [B, S, W, T] (words at positions < t); phrases [B, C, A, L];
  lengths [B, C, A]. Always True for one-word phrases.
  """
  b, s, w, length = tokens.shape
  _, c, a, l = phrases.shape
  if l == 1:
    return jnp.ones((b, s, w, c, a), bool)
  j = jnp.arange(l - 1)  # The phrase's words before its last.
  needed = j < lengths[..., None] - 1  # [B, C, A, L-1]
  position = t - (lengths[..., None] - 1) + j  # Where word j must be.
  index = jnp.clip(position, 0, length - 1).reshape(b, 1, 1, -1)
  index = jnp.broadcast_to(index, (b, s, w, index.shape[-1]))
  found = jnp.take_along_axis(tokens, index, axis=3).reshape(
      b, s, w, c, a, l - 1)
  match = (found == phrases[:, None, None, ..., :-1]) & (position >= 0)[
      :, None, None]
  return jnp.all(match | ~needed[:, None, None], axis=-1)


def search(step: decode.StepFn, carry: Any, phrases: jax.Array, *,
           batch_size: int, beam_size: int, max_len: int, num_positions: int,
           alpha: float = 0.0, num_return: int = 1, ban_unk: bool = False,
           ban_repeated_trigrams: bool = False,
           mask: jax.Array | None = None) -> ConstrainedCaptions:
  """Constrained beam search over any `step` function (module docstring).

  Args:
    step: step(carry, tokens [B, S * W]) -> (carry, logits [B, S * W, V],
      attention [B, S * W, P]), as `decode.search` takes it.
    carry: the initial carry, leaves [B, S * W, ...] (S * W hypotheses per
      image; beam k is beam k % W of state k // W).
    phrases: int32 [B, C, A, L], the constraints: phrases[b, c, a] is
      alternative a of constraint c of image b, NO_TOKEN after its words;
      a constraint without words in any alternative is absent.
      1 <= C <= MAX_CONSTRAINTS.
    batch_size: B.
    beam_size: W, hypotheses per state.
    max_len: tokens per caption with <bos> and <eos>; T = max_len - 1
      positions are generated.
    num_positions: P, the attention map's size.
    alpha: the length penalty's exponent (0: plain log-probability).
    num_return: n <= W captions returned per image.
    ban_unk: never generate <unk>.
    ban_repeated_trigrams: never repeat a word trigram within a caption.
    mask: bool [B]; False rows (padding) are not searched and come back as
      <pad> with score NEG_INF.

  Returns:
    The n best finished captions of each image that meet all of its
    constraints; where there are none, those of the state with the most
    constraints met, marked not `satisfied`.
  """
  if not 1 <= num_return <= beam_size:
    raise ValueError(f'num_return={num_return} must be in 1..{beam_size}')
  if alpha < 0:
    raise ValueError(f'length penalty alpha={alpha} must be >= 0')
  if phrases.ndim != 4 or phrases.shape[0] != batch_size:
    raise ValueError(f'phrases must be [B={batch_size}, C, A, L], not '
                     f'{phrases.shape}')
  num_constraints = phrases.shape[1]
  if not 1 <= num_constraints <= MAX_CONSTRAINTS or 0 in phrases.shape:
    raise ValueError(
        f'phrases {phrases.shape}: 1 to {MAX_CONSTRAINTS} constraints (2^C '
        'beams of W hypotheses each), with at least one alternative and word')
  b, w, length = batch_size, beam_size, max_len - 1
  s_count = 2**num_constraints  # S
  final = s_count - 1
  states = jnp.arange(s_count, dtype=jnp.int32)  # [S]: met-bitmasks.
  bits = 2**jnp.arange(num_constraints, dtype=jnp.int32)  # [C]
  longest_penalty = decode.length_penalty(jnp.asarray(length), alpha)
  mask = jnp.ones((b,), bool) if mask is None else mask

  phrases = jnp.asarray(phrases, jnp.int32)
  lengths = phrase_lengths(phrases)  # [B, C, A]
  present = jnp.any(lengths > 0, axis=-1)  # [B, C]
  start_state = jnp.sum(jnp.where(present, 0, bits), axis=-1)  # [B]
  # The phrases as one list of K: last words, the constraint each meets.
  k_count = lengths.shape[1] * lengths.shape[2]
  valid = (lengths > 0).reshape(b, k_count)  # [B, K]
  last = jnp.take_along_axis(
      phrases, jnp.maximum(lengths - 1, 0)[..., None], axis=-1).reshape(
          b, k_count)  # [B, K]
  last = jnp.where(valid, last, 0)
  same_last = (valid[:, :, None] & valid[:, None, :] &
               (last[:, :, None] == last[:, None, :]))  # [B, K, K]
  # One move per word: phrases with the same last word move together.
  first = valid & ~jnp.any(jnp.tril(same_last, -1), axis=-1)  # [B, K]
  # [B, K, C, A]: the phrases that end in phrase k's last word.
  same_last_by_constraint = same_last.reshape(
      b, k_count, num_constraints, -1)

  tokens = jnp.full((b, s_count, w, length), PAD, jnp.int32)
  alphas = jnp.zeros((b, s_count, w, length, num_positions), jnp.float32)
  # One live hypothesis at the start, in the image's start state.
  live_logprobs = jnp.where(
      (states[None, :, None] == start_state[:, None, None]) &
      (jnp.arange(w) == 0), 0.0, NEG_INF)  # [B, S, W]
  state = ConstrainedBeamState(
      t=jnp.zeros((), jnp.int32), carry=carry, live_tokens=tokens,
      live_logprobs=live_logprobs, live_alphas=alphas, done_tokens=tokens,
      done_scores=jnp.full((b, s_count, w), NEG_INF),
      done_logprobs=jnp.full((b, s_count, w), NEG_INF), done_alphas=alphas,
      active=mask)

  def cond(s: ConstrainedBeamState) -> jax.Array:
    return (s.t < length) & jnp.any(s.active)

  def body(s: ConstrainedBeamState) -> ConstrainedBeamState:
    flat_tokens = s.live_tokens.reshape(b, s_count * w, length)
    previous = jnp.where(
        s.t == 0, BOS,
        jnp.take(flat_tokens, jnp.maximum(s.t - 1, 0), axis=2))  # [B, S*W]
    carry, logits, alpha_t = step(s.carry, previous)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B, S*W, V]
    vocab = logprobs.shape[-1]
    banned = jnp.zeros((vocab,), bool).at[jnp.array([PAD, BOS])].set(True)
    if ban_unk:
      banned = banned.at[UNK].set(True)
    banned = jnp.broadcast_to(banned, logprobs.shape)
    if ban_repeated_trigrams:
      banned = banned | _repeated_trigram_ban(
          flat_tokens, s.t, vocab)
    logprobs = jnp.where(banned, NEG_INF, logprobs)
    candidates = s.live_logprobs[..., None] + logprobs.reshape(
        b, s_count, w, vocab)  # [B, S, W, V]

    # Moves: the extensions by a phrase's last word that complete it, where
    # that meets a constraint not yet met.
    prefix = _prefix_matches(s.live_tokens, s.t, phrases,
                             lengths)  # [B, S, W, C, A]
    completes = jnp.any(
        same_last_by_constraint[:, None, None] & prefix[:, :, :, None],
        axis=-1)  # [B, S, W, K, C]: the last word of phrase k completes c.
    target = states[:, None, None] | jnp.sum(
        jnp.where(completes, bits, 0), axis=-1)  # [B, S, W, K]
    moves = first[:, None, None] & (target != states[:, None, None])
    move_logprobs = jnp.where(moves, jnp.take_along_axis(
        candidates, jnp.broadcast_to(last[:, None, None], moves.shape),
        axis=-1), NEG_INF)  # [B, S, W, K]
    bi, si, wi, _ = jnp.meshgrid(jnp.arange(b), states, jnp.arange(w),
                                 jnp.arange(k_count), indexing='ij')
    leaves = jnp.zeros(candidates.shape, bool).at[
        bi, si, wi, jnp.broadcast_to(last[:, None, None], moves.shape)].max(
            moves)  # [B, S, W, V]

    # Each state's 2W best: of those staying in it, and of those moving in.
    stay_logprobs, stay = jax.lax.top_k(
        jnp.where(leaves, NEG_INF, candidates).reshape(b, s_count, w * vocab),
        2 * w)  # [B, S, 2W]
    stay_sources = states[:, None] * w + stay // vocab  # [B, S, 2W]
    stay_words = stay % vocab
    incoming = jnp.where(
        target.reshape(b, 1, -1) == states[:, None],
        move_logprobs.reshape(b, 1, -1), NEG_INF)  # [B, S, S*W*K]
    move_in_logprobs, move_in = jax.lax.top_k(incoming, 2 * w)  # [B, S, 2W]
    move_in_sources = move_in // k_count
    move_in_words = jnp.take_along_axis(
        last, (move_in % k_count).reshape(b, -1), axis=1).reshape(
            move_in.shape)
    top_logprobs, pick = jax.lax.top_k(
        jnp.concatenate([stay_logprobs, move_in_logprobs], axis=2), 2 * w)
    sources = jnp.take_along_axis(
        jnp.concatenate([stay_sources, move_in_sources], axis=2), pick, 2)
    words = jnp.take_along_axis(
        jnp.concatenate([stay_words, move_in_words], axis=2), pick,
        2).astype(jnp.int32)  # [B, S, 2W]

    flat_sources = sources.reshape(b, -1)  # [B, S*2W], indices into S*W.
    top_tokens = _gather(flat_tokens, flat_sources).reshape(
        b, s_count, 2 * w, length)
    top_tokens = jax.lax.dynamic_update_index_in_dim(
        top_tokens, words, s.t, axis=3)
    flat_alphas = s.live_alphas.reshape((b, s_count * w) + alphas.shape[3:])
    top_alphas = _gather(flat_alphas, flat_sources)
    top_alphas = jax.lax.dynamic_update_index_in_dim(
        top_alphas, _gather(alpha_t.astype(jnp.float32), flat_sources),
        s.t, axis=2).reshape((b, s_count, 2 * w) + alphas.shape[3:])
    real = top_logprobs > NEG_INF / 2
    ends = real & ((words == EOS) | (s.t == length - 1))  # [B, S, 2W]

    # Finished: merge the new ones into each state's pool, keep the W best.
    scores = jnp.where(
        ends, top_logprobs / decode.length_penalty(s.t + 1, alpha), NEG_INF)
    pool_scores = jnp.concatenate([s.done_scores, scores], axis=2)
    done_scores, keep = jax.lax.top_k(pool_scores, w)  # [B, S, W]
    merge = lambda old, new: _gather_states(
        jnp.concatenate([old, new], 2), keep)
    done_tokens = merge(s.done_tokens,
                        jnp.where(ends[..., None], top_tokens, PAD))
    done_alphas = merge(s.done_alphas, top_alphas)
    done_logprobs = merge(s.done_logprobs,
                          jnp.where(ends, top_logprobs, NEG_INF))
    # A stopped image keeps the results it stopped with.
    done_tokens, done_scores, done_logprobs, done_alphas = (
        decode.keep_if_stopped(
            s.active, (done_tokens, done_scores, done_logprobs, done_alphas),
            (s.done_tokens, s.done_scores, s.done_logprobs, s.done_alphas)))

    # Live: each state's W best extensions that did not end. Only <eos>
    # ends before the last position, and only those staying in a state
    # (phrase words are words), one per beam: W of the 2W remain.
    live_logprobs, keep = jax.lax.top_k(
        jnp.where(ends | ~real, NEG_INF, top_logprobs), w)  # [B, S, W]
    live_sources = jnp.take_along_axis(sources, keep, 2).reshape(b, -1)
    carry = jax.tree.map(lambda x: _gather(x, live_sources), carry)

    # Any state can still reach the accepting one.
    best_reachable = jnp.max(live_logprobs, axis=(1, 2)) / longest_penalty
    active = (s.active &
              (best_reachable > done_scores[:, final, num_return - 1]) &
              (best_reachable > NEG_INF / 2))
    return ConstrainedBeamState(
        t=s.t + 1, carry=carry,
        live_tokens=_gather_states(top_tokens, keep),
        live_logprobs=live_logprobs,
        live_alphas=_gather_states(top_alphas, keep),
        done_tokens=done_tokens, done_scores=done_scores,
        done_logprobs=done_logprobs, done_alphas=done_alphas, active=active)

  s = jax.lax.while_loop(cond, body, state)

  # The accepting state if it finished a caption; else, of the states that
  # did, one with the most constraints met, the best first caption on ties.
  finished = s.done_scores[:, :, 0] > NEG_INF / 2  # [B, S]
  num_met = jnp.sum((states[:, None] & bits) > 0, axis=-1)  # [S]
  most = jnp.max(jnp.where(finished, num_met, -1), axis=1)  # [B]
  chosen = jnp.argmax(
      jnp.where(finished & (num_met == most[:, None]),
                s.done_scores[:, :, 0], -jnp.inf), axis=1)  # [B]
  pick = lambda x: jnp.take_along_axis(
      x, chosen.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
  n = num_return
  scores = pick(s.done_scores)[:, :n]
  valid = mask[:, None] & (scores > NEG_INF / 2)  # [B, n]
  present_bits = jnp.sum(jnp.where(present, bits, 0), axis=-1)  # [B]
  return ConstrainedCaptions(
      tokens=jnp.where(valid[..., None], pick(s.done_tokens)[:, :n], PAD),
      scores=jnp.where(valid, scores, NEG_INF),
      logprobs=jnp.where(valid, pick(s.done_logprobs)[:, :n], NEG_INF),
      alphas=jnp.where(mask[:, None, None], pick(s.done_alphas)[:, 0], 0.0),
      satisfied=valid & (chosen == final)[:, None],
      met=jnp.where(valid, (chosen & present_bits)[:, None], 0))


def constrained_beam_search(
    predict, variables, images: jax.Array, phrases: jax.Array, *,
    beam_size: int, max_len: int, alpha: float = 0.0, num_return: int = 1,
    ban_unk: bool = False, ban_repeated_trigrams: bool = False,
    mask: jax.Array | None = None) -> ConstrainedCaptions:
  """The best captions of `images` [B, S, S, 3] that contain `phrases`.

  phrases: int32 [B, C, A, L] (`encode_constraints`); see `search` for the
  rest. The encoder runs once per image; its features serve all 2^C x W
  hypotheses of the image. `predict` is the model's `models.Predict`.
  """
  features = predict.encode(variables, {'image': images})  # [B, P, C]
  return constrained_beam_search_features(
      predict, variables, features, phrases, beam_size=beam_size,
      max_len=max_len, alpha=alpha, num_return=num_return, ban_unk=ban_unk,
      ban_repeated_trigrams=ban_repeated_trigrams, mask=mask)


def constrained_beam_search_features(
    predict, variables, features: jax.Array, phrases: jax.Array, *,
    beam_size: int, max_len: int, alpha: float = 0.0, num_return: int = 1,
    ban_unk: bool = False, ban_repeated_trigrams: bool = False,
    mask: jax.Array | None = None) -> ConstrainedCaptions:
  """`constrained_beam_search` from encoded images: features [B, P, C]."""
  num_states = 2**phrases.shape[1]
  decoding = predict.decoding(variables, features, num_states * beam_size)
  return search(decoding.step, decoding.carry, phrases,
                batch_size=features.shape[0], beam_size=beam_size,
                max_len=max_len, num_positions=decoding.num_positions,
                alpha=alpha,
                num_return=num_return, ban_unk=ban_unk,
                ban_repeated_trigrams=ban_repeated_trigrams, mask=mask)


def concept_beam_search(
    predict, variables, batch: dict[str, jax.Array],
    phrase_table: jax.Array, *, threshold: float, **search
) -> tuple[ConstrainedCaptions, jax.Array]:
  """The captions of a batch that name each image's confident concepts.

  The concept head's most likely concepts over `threshold`
  (`models.concepts.confident`, at most MAX_CONSTRAINTS an image) become
  the constraints, met by any of their phrases in `phrase_table` (int32
  [N, A, L], `capjax.concepts.phrase_table`). `batch` holds the `image`
  pixels (or cached `features`, for a head that reads the colour image
  alone); `search` are `search`'s options (beam_size, max_len, mask, ...).

  Returns:
    (the captions, the concept ids int32 [B, C], -1 for none).
  """
  features, logits = predict.encode(variables, batch, concepts=True)
  ids = concept_head.confident(logits, threshold=threshold,
                               k=MAX_CONSTRAINTS)  # [B, C]
  phrases = jnp.where((ids >= 0)[..., None, None],
                      phrase_table[jnp.maximum(ids, 0)],
                      NO_TOKEN)  # [B, C, A, L]
  return constrained_beam_search_features(predict, variables, features,
                                          phrases, **search), ids


# ----------------------------------------------------------------------------
# Constraints from text (on the host).
# ----------------------------------------------------------------------------


def encode_constraints(
    vocab: Vocab, constraints: Sequence[Sequence[str | Sequence[str]]], *,
    num_constraints: int | None = None, num_alternatives: int | None = None,
    max_phrase_len: int | None = None) -> np.ndarray:
  """The `phrases` array of the images' constraints, from phrase strings.

  Args:
    vocab: the captioner's vocabulary; phrases are tokenised as captions.
    constraints: per image, a list of constraints; each a list of
      alternative phrases ("red square", "red box"), or one phrase string.
      An image may have no constraints.
    num_constraints, num_alternatives, max_phrase_len: C, A and L of the
      array, at least the largest found (default: exactly that, and at
      least 1): fixed sizes let batches share one compiled search.

  Returns:
    int32 [B, C, A, L]: token ids, NO_TOKEN after each phrase's words and
    for absent alternatives and constraints.

  Raises:
    ValueError: a phrase with a word outside the vocabulary (which the model
      cannot generate; the message names it), a phrase or constraint that
      is empty, or more constraints, alternatives or words than asked for
      (or than MAX_CONSTRAINTS).
  """
  encoded = []  # [image][constraint][alternative] -> ids
  for image in constraints:
    if isinstance(image, str):
      raise ValueError(f'constraints of an image must be a list of '
                       f'constraints, not the string {image!r}')
    encoded.append([])
    for constraint in image:
      alternatives = [constraint] if isinstance(constraint, str) else list(
          constraint)
      if not alternatives:
        raise ValueError('a constraint has no phrases')
      encoded[-1].append([_encode_phrase(vocab, p) for p in alternatives])

  def size(found, given, what):
    if given is None:
      return max(found, 1)
    if found > given:
      raise ValueError(f'{found} {what} where at most {given} were asked for')
    return given

  c = size(max((len(i) for i in encoded), default=0), num_constraints,
           'constraints for an image')
  if c > MAX_CONSTRAINTS:
    raise ValueError(f'{c} constraints for an image: at most '
                     f'{MAX_CONSTRAINTS} (the search has 2^C beams)')
  a = size(max((len(k) for i in encoded for k in i), default=0),
           num_alternatives, 'alternative phrases of a constraint')
  l = size(max((len(p) for i in encoded for k in i for p in k), default=0),
           max_phrase_len, 'words in a phrase')
  out = np.full((len(encoded), c, a, l), NO_TOKEN, np.int32)
  for i, image in enumerate(encoded):
    for j, constraint in enumerate(image):
      for k, ids in enumerate(constraint):
        out[i, j, k, :len(ids)] = ids
  return out


def load_constraints(path: str, vocab: Vocab
                     ) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Per-image constraints from a JSON file, for the decode job.

  The file maps image ids to their constraints, each a phrase or a list of
  alternative phrases: {"42": ["red square", ["blue disk", "blue circle"]]}.

  Returns:
    (image id -> its `phrases` int32 [C, A, L]; the phrases of an image
    without constraints), all of one shape, so that every batch shares one
    compiled search. A UserError names the file and what is wrong in it.
  """
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
    if not isinstance(raw, dict):
      raise ValueError('expected {"image id": [constraint, ...], ...}')
    ids = [int(k) for k in raw]
    phrases = encode_constraints(vocab, list(raw.values()))
  except (OSError, ValueError) as e:
    raise UserError(f'cannot use the constraints in {path}: {e}') from None
  empty = np.full(phrases.shape[1:], NO_TOKEN, np.int32)
  return dict(zip(ids, phrases)), empty


def _encode_phrase(vocab: Vocab, phrase: str) -> list[int]:
  """The token ids of `phrase`'s words; ValueError if one is not a word of
  `vocab`."""
  if not isinstance(phrase, str):
    raise ValueError(f'a phrase must be a string, not {phrase!r}')
  words = tokenizer.tokenize(phrase)
  ids = vocab.encode(phrase)
  if not words:
    raise ValueError(f'the phrase {phrase!r} has no words')
  for word, i in zip(words, ids):
    if i <= UNK:
      raise ValueError(f'the word {word!r} of the phrase {phrase!r} is not in '
                       'the vocabulary: no caption can contain it')
  return ids
