"""Caption tokenisation shared by the vocabulary, training, decoding and scoring.

It follows the COCO caption evaluation (Chen et al. 2015, `pycocoevalcap`):
Stanford's PTBTokenizer with `-lowerCase`, then every token in its punctuation
list is dropped. NLTK's Treebank tokenizer implements the same Penn Treebank
conventions ("man's" -> "man 's", "don't" -> "do n't") without a Java
start-up; the steps around it give the cases where the two differ the Java
tokenizer's answer, so that the metrics see the official tokens:

* curly quotes and apostrophes become Penn Treebank quotes first;
* an opening single quote is split off ("'stop'" -> "stop");
* a full stop inside a caption ends a sentence ("a dog. a cat" -> "a dog a
  cat"), except after a known abbreviation ("st.", "etc.", "u.s.", also
  at the end) or an initial ("b. c");
* brackets become -lrb-, -rrb-, -lsb-, ...: the official list drops only
  the upper-case forms, which the lower-casing never leaves, so they stay.
"""

import functools
import re
from typing import Any

# The official scorer's punctuation list.
_DROP = frozenset([
    "''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!',
    ',', ':', '-', '--', '...', ';',
])
_BRACKETS = {'(': '-lrb-', ')': '-rrb-', '[': '-lsb-', ']': '-rsb-',
             '{': '-lcb-', '}': '-rcb-'}
_QUOTES = str.maketrans({'\u2018': '`', '\u2019': "'", '\u201c': ' `` ',
                         '\u201d': " '' "})
# An opening single quote: after a space or the start, before a word that is
# not a contraction ("'s", "'ll", ...).
_OPEN_QUOTE = re.compile(
    r"(?:(?<=\s)|^)'(?!(?:s|ll|re|ve|m|d|t)\b|n'|\d)(?=\w)")
# Words whose full stop is part of them (besides single letters and dotted
# ones like "u.s." and "p.m."), as the Java tokenizer's abbreviation list
# has them.
_ABBREVIATIONS = frozenset([
    'mr', 'mrs', 'ms', 'dr', 'st', 'jr', 'sr', 'vs', 'etc', 'mt', 'ave',
    'inc', 'co', 'corp', 'ltd', 'prof', 'gen', 'gov', 'sen', 'rep', 'rev',
    'capt', 'col', 'lt', 'sgt', 'jan', 'feb', 'mar', 'apr', 'jun', 'jul',
    'aug', 'sep', 'sept', 'oct', 'nov', 'dec', 'est', 'fig', 'approx',
])


# Captions whose tokens are just their words (hyphenated ones included):
# words separated by spaces, ", " or a free-standing ",", ":" or ";" (which
# Treebank splits off and the punctuation list drops), and at most a final
# full stop.
_WORD = re.compile(r'[a-z0-9]+(?:-[a-z0-9]+)*')
_PLAIN = re.compile(
    r' *(?:(?:[a-z0-9]+(?:-[a-z0-9]+)*,?|[,:;]) +)*'
    r'[a-z0-9]+(?:-[a-z0-9]+)* *\.? *')
_ABBREVIATION_ENDINGS = tuple(' ' + a for a in _ABBREVIATIONS)
# The words without an apostrophe that Treebank still splits ("cannot" ->
# "can not"): those of its CONTRACTIONS2/3 lists, here so that telling a
# plain caption needs no nltk import (1 s of a job's start). A test checks
# them against nltk's lists.
_SPLIT_WORDS = ('cannot', 'gimme', 'gonna', 'gotta', 'lemme', 'wanna')
_SPLIT_WORD = re.compile(r'\b(?:%s)\b' % '|'.join(_SPLIT_WORDS))


@functools.cache
def _treebank() -> Any:
  # nltk is imported on first use: the modules that only need the special
  # token ids (beam search, the train step) import the vocabulary, and
  # with it this module, on machines without nltk.
  # pylint: disable-next=g-import-not-at-top
  from nltk.tokenize import TreebankWordTokenizer
  return TreebankWordTokenizer()


def _keeps_full_stop(word: str, following: str | None) -> bool:
  """Whether `word` + '.' is one token (an abbreviation or an initial).

  `following` is the next token, None at the end of the caption.
  """
  if '.' in word or word in _ABBREVIATIONS:
    return True
  if word == 'no':  # "no. 5", but "said no. then".
    return following is not None and following[:1].isdigit()
  return following is not None and len(word) == 1 and word.isalpha()


def _tokens(caption: str) -> list[str]:
  caption = _OPEN_QUOTE.sub("` ", caption.translate(_QUOTES))
  words = _treebank().tokenize(caption)
  out = []
  for i, word in enumerate(words):
    base = word.rstrip('.')
    if word in _BRACKETS:
      out.append(_BRACKETS[word])
    elif base == word:
      out.append(word)
    else:
      # Full stops: Treebank splits only the caption's last one, and keeps
      # runs of them ("dog..", "u.s..") in a word. The Java tokenizer drops
      # them all, but one after an abbreviation, which is part of it.
      following = next((w for w in words[i + 1:] if w.strip('.')), None)
      if base:
        # What Treebank would have split before a full stop: "stop'." ->
        # "stop '".
        out += _treebank().tokenize(base)
      if out and not out[-1].endswith('.') and _keeps_full_stop(
          out[-1], following):
        out[-1] += '.'
  return out


def _is_plain(caption: str) -> bool:
  """Whether the tokens of `caption` (lower case) are just its words."""
  return bool(_PLAIN.fullmatch(caption)) and not (
      (' ' + caption.rstrip(' .')).endswith(_ABBREVIATION_ENDINGS) or
      _SPLIT_WORD.search(caption))


def tokenize(caption: str) -> list[str]:
  """Lowercased Penn Treebank tokens of `caption`, punctuation removed."""
  caption = caption.replace('\n', ' ').lower()
  if _is_plain(caption):
    # Most captions: words, commas, a final full stop. Their tokens are
    # their words, ten times faster than through Treebank's regexes.
    return _WORD.findall(caption)
  return [t for t in _tokens(caption) if t not in _DROP]
