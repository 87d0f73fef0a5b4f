"""Caption tokenisation shared by the vocabulary, training, decoding and scoring.

It follows the COCO caption evaluation (Chen et al. 2015, `pycocoevalcap`):
Stanford's PTBTokenizer with `-lowerCase`, then every token in its punctuation
list is dropped. NLTK's Treebank tokenizer implements the same Penn Treebank
conventions ("man's" -> "man 's", "don't" -> "do n't") without a Java
start-up, so captions tokenise the same way in every job.
"""

import functools

from nltk.tokenize import TreebankWordTokenizer

# The official scorer's punctuation list, plus brackets (which the Java
# tokenizer would turn into -LRB- / -RRB-, also dropped).
_DROP = frozenset([
    "''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!',
    ',', ':', '-', '--', '...', ';', '(', ')', '[', ']', '{', '}',
])


@functools.cache
def _treebank() -> TreebankWordTokenizer:
  return TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
  """Lowercased Penn Treebank tokens of `caption`, punctuation removed."""
  caption = caption.replace('\n', ' ').lower()
  return [t for t in _treebank().tokenize(caption) if t not in _DROP]
