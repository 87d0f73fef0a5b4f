"""Corpus BLEU-1..4 as the COCO caption evaluation reports it.

BLEU (Papineni et al. 2002): modified n-gram precisions, each candidate
n-gram count clipped by its largest count in any one reference, pooled over
the whole corpus; their geometric mean times a brevity penalty. The COCO
evaluation (Chen et al. 2015, `pycocoevalcap`) fixes the choices the paper
leaves open, and capjax follows it so that its numbers are comparable with
published ones:

* the reference length of a candidate is the *closest* reference length
  (the shorter one on a tie), summed over the corpus;
* BLEU-n is the geometric mean of the precisions 1..n with equal weights;
* a candidate shorter than n words adds nothing to the n-gram denominator;
* tiny constants keep zero counts finite: a corpus with no matching n-gram
  scores about 0 instead of failing, and one whose candidates are all
  shorter than n words gets an n-gram precision of 1e-15 / 1e-9, as in the
  official scorer.

NLTK's `corpus_bleu` is not used: it counts max(1, ·) n-grams in the
denominator for every candidate, so corpora with one- to three-word
candidates get lower BLEU-2..4 than the official scorer, and it returns 0
where the official scorer returns a tiny positive number.
"""

import collections
from collections.abc import Sequence
import math

MAX_N = 4

# The official scorer's constants: added to the matched counts and the
# candidate counts so that empty counts give a finite, near-zero precision.
_TINY = 1e-15
_SMALL = 1e-9

Tokens = Sequence[str]


def ngram_counts(tokens: Tokens, n: int) -> collections.Counter:
  """How often each n-gram (a tuple of n tokens) occurs in `tokens`."""
  return collections.Counter(
      tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _closest_length(lengths: Sequence[int], length: int) -> int:
  # The shorter reference wins a tie, as in the official scorer.
  return min(lengths, key=lambda l: (abs(l - length), l))


def corpus_bleu(references: Sequence[Sequence[Tokens]],
                candidates: Sequence[Tokens],
                max_n: int = MAX_N) -> list[float]:
  """[BLEU-1, ..., BLEU-max_n] of a corpus, in 0..1.

  Args:
    references: per image, its reference captions as token lists (at least
      one per image).
    candidates: per image, the candidate caption as a token list, in the
      order of `references`.
    max_n: the longest n-gram.

  Returns:
    The corpus BLEU-n for n = 1..max_n.
  """
  if len(references) != len(candidates):
    raise ValueError(f'{len(references)} reference sets for '
                     f'{len(candidates)} candidates')
  matched = [0] * max_n  # clipped candidate n-grams found in the references
  total = [0] * max_n  # candidate n-grams
  candidate_length = 0
  reference_length = 0
  for refs, cand in zip(references, candidates):
    if not refs:
      raise ValueError('every candidate needs at least one reference')
    candidate_length += len(cand)
    reference_length += _closest_length([len(r) for r in refs], len(cand))
    for n in range(1, max_n + 1):
      counts = ngram_counts(cand, n)
      if not counts:
        continue
      max_ref_counts = collections.Counter()
      for ref in refs:
        max_ref_counts |= ngram_counts(ref, n)  # | keeps the larger count
      matched[n - 1] += sum(min(c, max_ref_counts[g])
                            for g, c in counts.items())
      total[n - 1] += len(cand) - n + 1

  ratio = (candidate_length + _TINY) / (reference_length + _SMALL)
  # Brevity penalty: only candidates shorter than their references pay it.
  penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  scores = []
  log_product = 0.0
  for n in range(1, max_n + 1):
    log_product += math.log((matched[n - 1] + _TINY) / (total[n - 1] + _SMALL))
    scores.append(math.exp(log_product / n) * penalty)
  return scores
