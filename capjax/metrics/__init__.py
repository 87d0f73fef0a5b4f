"""Caption metrics that reproduce the COCO caption evaluation's numbers.

`score` computes BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) the way
`pycocoevalcap` (Chen et al. 2015) does: every caption is tokenised with
`capjax.data.tokenizer` (the official PTBTokenizer step without its Java
start-up), and the metrics see those tokens joined by single spaces, as the
official scorers do. Only METEOR may start Java: the official METEOR 1.5
jar, or NLTK's METEOR (reported as METEOR_nltk) when there is no Java.

    from capjax import metrics
    metrics.score({1: ['A dog runs.', 'A dog is running.']},
                  {1: 'a dog running'})
    # {'BLEU-1': ..., 'BLEU-4': ..., 'METEOR': ..., 'ROUGE-L': ...,
    #  'CIDEr': ...}

The modules hold one metric each, on token lists, with per-image scores
where the official scorer has them (`cider.CiderD` for scoring many
candidates against fixed references, as training does).
"""

from collections.abc import Hashable, Mapping, Sequence

from absl import logging

from capjax.data import tokenizer
from capjax.metrics import bleu
from capjax.metrics import cider
from capjax.metrics import meteor as meteor_lib
from capjax.metrics import rouge

METEOR_MODES = ('auto', 'java', 'nltk', 'none')

Tokens = list[str]


def _check_keys(references: Mapping[Hashable, Sequence[str]],
                candidates: Mapping[Hashable, str]) -> None:
  if references.keys() != candidates.keys():
    only_refs = [k for k in references if k not in candidates]
    only_cands = [k for k in candidates if k not in references]
    raise ValueError(
        'references and candidates must have the same image ids: '
        f'{len(only_refs)} only in references (e.g. {only_refs[:3]}), '
        f'{len(only_cands)} only in candidates (e.g. {only_cands[:3]})')
  if not references:
    raise ValueError('no images to score')
  for key, refs in references.items():
    if isinstance(refs, str) or not refs:
      raise ValueError(f'image {key!r} needs a list of reference captions, '
                       f'got {refs!r}')


def tokenize_all(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    tokenized: bool = False,
) -> tuple[list[Hashable], list[list[Tokens]], list[Tokens]]:
  """(image ids, reference tokens, candidate tokens), aligned by image.

  With `tokenized`, captions are already tokens joined by spaces.
  """
  _check_keys(references, candidates)
  split = str.split if tokenized else tokenizer.tokenize
  keys = list(references)
  refs = [[split(r) for r in references[k]] for k in keys]
  cands = [split(candidates[k]) for k in keys]
  return keys, refs, cands


def _meteor(refs: list[list[Tokens]], cands: list[Tokens],
            mode: str) -> dict[str, float]:
  """{'METEOR': x}, {'METEOR_nltk': x} or {}, as `mode` and the host allow."""
  if mode == 'none':
    return {}
  if mode in ('auto', 'java'):
    try:
      value, _ = meteor_lib.java_meteor(
          [[' '.join(r) for r in image] for image in refs],
          [' '.join(c) for c in cands])
      return {'METEOR': value}
    except meteor_lib.MeteorUnavailable as e:
      if mode == 'java':
        raise
      logging.warning('%s. Using NLTK\'s METEOR instead, reported as '
                      'METEOR_nltk: not comparable with published METEOR.', e)
  try:
    value, _ = meteor_lib.nltk_meteor(refs, cands)
    return {'METEOR_nltk': value}
  except meteor_lib.MeteorUnavailable as e:
    if mode == 'nltk':
      raise
    logging.warning('%s. METEOR is left out.', e)
    return {}


def score(references: Mapping[Hashable, Sequence[str]],
          candidates: Mapping[Hashable, str], *, meteor: str = 'auto',
          tokenized: bool = False) -> dict[str, float]:
  """The COCO caption metrics of `candidates`.

  Args:
    references: image id -> its reference captions (raw text).
    candidates: image id -> the one candidate caption (raw text); the same
      image ids as `references`.
    meteor: 'java' for the official METEOR 1.5 (needs Java), 'nltk' for
      NLTK's METEOR (needs WordNet), 'none', or 'auto': Java if it runs,
      else NLTK, else no METEOR (with a logged warning).
    tokenized: the captions are already tokens joined by spaces.

  Returns:
    {'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR' or 'METEOR_nltk' (or
    neither), 'ROUGE-L', 'CIDEr'} -> float, in pycocoevalcap's units: 0..1,
    CIDEr 0..10.

  Raises:
    ValueError: the image ids differ, or an image has no references.
    MeteorUnavailable: the METEOR asked for ('java' or 'nltk') cannot run.
  """
  if meteor not in METEOR_MODES:
    raise ValueError(f'meteor must be one of {METEOR_MODES}, got {meteor!r}')
  _, refs, cands = tokenize_all(references, candidates, tokenized)
  results = {f'BLEU-{n}': value
             for n, value in enumerate(bleu.corpus_bleu(refs, cands), 1)}
  results.update(_meteor(refs, cands, meteor))
  results['ROUGE-L'] = rouge.corpus_rouge_l(refs, cands)
  results['CIDEr'] = cider.corpus_cider(refs, cands)
  return results


def format_table(results: dict[str, float], num_images: int) -> str:
  """The metrics as an aligned two-column table, then the image count."""
  rows = [('metric', 'value')] + [(k, f'{v:.4f}') for k, v in results.items()]
  width = max(len(name) for name, _ in rows)
  lines = [f'{name:<{width}}  {value:>7}' for name, value in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines.append(f'({num_images} images scored)')
  return '\n'.join(lines)
