"""ROUGE-L as the COCO caption evaluation reports it.

ROUGE-L (Lin 2004) scores a candidate by its longest common subsequence
(LCS) with a reference: precision LCS / |candidate|, recall LCS /
|reference|. With several references the COCO evaluation (Chen et al. 2015,
`pycocoevalcap`) takes the largest precision and the largest recall over
the references, possibly from different ones, and combines them with
beta = 1.2, which weights recall a little more than precision:

  F = (1 + beta^2) P R / (R + beta^2 P),  0 when P or R is 0.

The corpus score is the mean over images.

The longest common subsequence is computed here, with the dynamic programme
the official scorer uses: the `rouge-score` package computes the same, but
importing it imports NLTK and SciPy's statistics, a second of CPU at the
start of every job that validates.
"""

from collections.abc import Sequence

BETA = 1.2

Tokens = Sequence[str]


def lcs_length(a: Tokens, b: Tokens) -> int:
  """The length of the longest common subsequence of `a` and `b`."""
  if len(a) < len(b):
    a, b = b, a  # One row of the shorter's length.
  row = [0] * (len(b) + 1)  # row[j]: LCS of a[:i] and b[:j].
  for x in a:
    diagonal = 0  # The previous row's row[j - 1].
    for j, y in enumerate(b, 1):
      diagonal, row[j] = row[j], (diagonal + 1 if x == y else
                                  max(row[j], row[j - 1]))
  return row[-1]


def rouge_l(references: Sequence[Tokens], candidate: Tokens) -> float:
  """ROUGE-L F (beta = 1.2) of one candidate against its references."""
  if not references:
    raise ValueError('every candidate needs at least one reference')
  # Split on single spaces, like the official scorer: an empty caption is
  # one empty token, not none, so that an empty candidate matches an empty
  # reference fully, as the official scorer reports for that (rare) case.
  candidate = ' '.join(candidate).split(' ')
  precision = recall = 0.0
  for reference in references:
    reference = ' '.join(reference).split(' ')
    lcs = lcs_length(reference, candidate)
    precision = max(precision, lcs / len(candidate))
    recall = max(recall, lcs / len(reference))
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
