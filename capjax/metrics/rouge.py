"""ROUGE-L as the COCO caption evaluation reports it.

ROUGE-L (Lin 2004) scores a candidate by its longest common subsequence
(LCS) with a reference: precision LCS / |candidate|, recall LCS /
|reference|. With several references the COCO evaluation (Chen et al. 2015,
`pycocoevalcap`) takes the largest precision and the largest recall over
the references, possibly from different ones, and combines them with
beta = 1.2, which weights recall a little more than precision:

  F = (1 + beta^2) P R / (R + beta^2 P),  0 when P or R is 0.

The corpus score is the mean over images.

The LCS itself comes from the `rouge-score` package, fed capjax's tokens.
"""

from collections.abc import Sequence
import functools
from typing import Any

BETA = 1.2

Tokens = Sequence[str]


class _SpaceTokenizer:
  """Splits on single spaces, like the official scorer.

  So an empty caption is one empty token, not none: an empty candidate then
  matches an empty reference fully, which is what the official scorer
  reports for that (rare) case.
  """

  def tokenize(self, text: str) -> list[str]:
    return text.split(' ')


@functools.cache
def _scorer() -> Any:
  # Imported on first use: the self-critical step imports capjax.metrics for
  # its on-device CIDEr-D, also where rouge-score is not installed.
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return rouge_scorer.RougeScorer(['rougeL'], tokenizer=_SpaceTokenizer())


def rouge_l(references: Sequence[Tokens], candidate: Tokens) -> float:
  """ROUGE-L F (beta = 1.2) of one candidate against its references."""
  if not references:
    raise ValueError('every candidate needs at least one reference')
  candidate_text = ' '.join(candidate)
  precision = recall = 0.0
  for reference in references:
    # rouge-score's `score(target, prediction)`: precision is over the
    # prediction (the candidate), recall over the target (the reference).
    lcs = _scorer().score(' '.join(reference), candidate_text)['rougeL']
    precision = max(precision, lcs.precision)
    recall = max(recall, lcs.recall)
  if precision == 0 or recall == 0:
    return 0.0
  return ((1 + BETA**2) * precision * recall) / (recall + BETA**2 * precision)


def per_image(references: Sequence[Sequence[Tokens]],
              candidates: Sequence[Tokens]) -> list[float]:
  """ROUGE-L of every candidate, in the order given."""
  if len(references) != len(candidates):
    raise ValueError(f'{len(references)} reference sets for '
                     f'{len(candidates)} candidates')
  return [rouge_l(refs, cand) for refs, cand in zip(references, candidates)]


def corpus_rouge_l(references: Sequence[Sequence[Tokens]],
                   candidates: Sequence[Tokens]) -> float:
  """Mean ROUGE-L over images, in 0..1."""
  scores = per_image(references, candidates)
  return sum(scores) / len(scores) if scores else 0.0
