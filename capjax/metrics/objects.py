"""Object recall and hallucination of captions against an image's objects.

On `shapes` (capjax.data.scenes) every image's objects are known, and its
captions come from a small grammar, so a caption can be read back into the
(colour, shape) pairs it names. `named_pairs` parses a caption that way; its
word lists come from the grammar's own tables in `scenes`, so it follows the
grammar when that changes. `score_shapes` then gives, over a set of images:

* object_recall: the share of all objects of all images whose (colour,
  shape) pair their image's caption names (see "Counts" below);
* novel_pair_recall: the same over only the objects whose pair is one of
  `scenes.HELD_OUT`, the pairs no training image shows;
* hallucination: the share of captions that name a (colour, shape) pair
  that no object of their image has.

A colour is bound to the shape noun of its own noun phrase: "a large red
square", "two red squares" and "a square that is large and red" all name
(red, square), while "a red circle and a square" names (red, circle) and
(None, square), never (red, square). Every synonym and plural of the grammar
is a shape noun ("disks" is circle, "plus sign" is cross).

Counts. A noun phrase names its pair as many times as its count says: "two
red squares" names (red, square) twice; "a red square", "one red square"
and "a single red square" once; a plural without a number ("red squares")
twice, the least a plural means; "zero red squares" not at all. Of an
image's k objects of one pair, a caption that names the pair m times
recalls min(k, m): with three red squares, "two red squares" recalls two.
A pair named more often than the image has it is no hallucination (the pair
is there); a shape named without a colour recalls nothing and is never a
hallucination, even where the image has no such shape.

Other rules of a parse, for ungrammatical captions: a colour binds only to a
shape noun that follows it with nothing but sizes and colours in between,
or to the shape noun before "that is" / "which are" / "is" ... whose
clause holds it; a noun with several colours takes the one nearest to it
(a colour before the noun wins over one in a clause); colours that bind to
no noun ("the red one") name nothing.

`score_coco` is the COCO counterpart, an approximation of CHAIR (Rohrbach et
al. 2018, "Object hallucination in image captioning"): a caption mentions a
category where its name or plural (simple English rules and a few irregular
forms: person/people, mouse/mice, knife/knives, sheep, ski/skis, ...)
appears among its words, multi-word names ("traffic light", "hot dog")
first. Without the paper's synonym lists ("man" for person, "puppy" for
dog, ...) and without word senses ("an orange cat" mentions the fruit), its
numbers are not the paper's CHAIR and are comparable only with each other.

Pure Python on top of `scenes` (numpy, Pillow): no JAX, TensorFlow or NLTK.
Captions may be any text, in any case, with or without punctuation; no
caption makes a function here raise.
"""

import collections
from collections.abc import Hashable, Iterable, Mapping, Sequence
import functools
import re
from typing import Any

from capjax.data import scenes

# The grammar's word tables are private to `scenes`; reading them here keeps
# the parser in step with the grammar.
# pylint: disable=protected-access

Pair = tuple[str | None, str]  # (colour or None, shape)

_WORD = re.compile(r'[a-z0-9]+')

# ----------------------------------------------------------------------------
# The `shapes` grammar's words, from its own tables.
# ----------------------------------------------------------------------------

_COLORS = frozenset(scenes.COLORS)
_SIZES = frozenset(w for words in scenes._SIZE_WORDS.values() for w in words)
# Words that start a noun phrase, and the count they give it (None: the
# noun's own number decides).
_DETERMINERS = {'a': 1, 'an': 1, 'single': 1, 'the': None,
                **{w: n for n, w in enumerate(scenes._NUMBERS)}}
# Words between a noun and its clause: "a square that is red".
_RELATIVE = frozenset({'that', 'which'})
_COPULA = frozenset({'is', 'are'})


@functools.cache
def _shape_nouns() -> dict[tuple[str, ...], tuple[str, bool]]:
  """Every noun of the grammar as words -> (shape, plural)."""
  nouns = {}
  for shape, forms in scenes._SHAPE_WORDS.items():
    for singular, plural in forms:
      nouns[tuple(singular.split())] = (shape, False)
      nouns[tuple(plural.split())] = (shape, True)
  return nouns


def _words(caption: Any) -> list[str]:
  """Lower-case words of `caption`; anything not a string is made one."""
  if isinstance(caption, bytes):
    caption = caption.decode('utf-8', 'replace')
  elif not isinstance(caption, str):
    caption = str(caption)
  return _WORD.findall(caption.lower())


def _lex(words: list[str]) -> list[tuple[str, Any]]:
  """Tokens as (kind, value): 'shape' (shape, plural), 'color', 'size',
  'det' (count or None), 'and', or 'word' (anything else, the word)."""
  nouns = _shape_nouns()
  longest = max(len(k) for k in nouns)
  items, i = [], 0
  while i < len(words):
    for n in range(min(longest, len(words) - i), 0, -1):
      noun = nouns.get(tuple(words[i:i + n]))
      if noun:
        items.append(('shape', noun))
        i += n
        break
    else:
      w = words[i]
      if w in _COLORS:
        items.append(('color', w))
      elif w in _SIZES:
        items.append(('size', w))
      elif w in _DETERMINERS:
        items.append(('det', _DETERMINERS[w]))
      elif w == 'and':
        items.append(('and', w))
      else:
        items.append(('word', w))
      i += 1
  return items


def _clause(items: list[tuple[str, Any]], start: int) -> tuple[int, str | None]:
  """The clause after a noun at items[start:]: "that is large and red".

  Returns:
    (where parsing goes on, the clause's colour or None). Without a clause,
    (start, None).
  """
  j = start
  if j < len(items) and items[j][0] == 'word' and items[j][1] in _RELATIVE:
    j += 1
  if not (j < len(items) and items[j][0] == 'word' and
          items[j][1] in _COPULA):
    return start, None
  j += 1
  end = j
  while end < len(items) and items[end][0] in ('size', 'color', 'and'):
    end += 1
  if end < len(items) and items[end][0] == 'shape':
    # "... is red and blue square": what follows the last "and" belongs to
    # the next noun.
    ands = [k for k in range(j, end) if items[k][0] == 'and']
    end = ands[-1] if ands else j
  colors = [v for kind, v in items[j:end] if kind == 'color']
  return end, (colors[0] if colors else None)


def named_pairs(caption: str) -> list[Pair]:
  """The (colour, shape) pairs a caption names, in order, with multiplicity.

  "two red squares and a disk that is blue" -> [('red', 'square'),
  ('red', 'square'), ('blue', 'circle')]; "a star" -> [(None, 'star')].
  The module docstring gives the rules. Never raises: a caption without
  shape nouns names nothing.

  Args:
    caption: any text; case and punctuation do not matter.

  Returns:
    One (colour or None, shape) per object named, shapes as in
    `scenes.SHAPES`.
  """
  items = _lex(_words(caption))
  pairs: list[Pair] = []
  color, count = None, None
  i = 0
  while i < len(items):
    kind, value = items[i]
    if kind == 'color':
      color = value  # The nearest to the noun wins.
    elif kind == 'det':
      color, count = None, value  # A new noun phrase.
    elif kind == 'shape':
      shape, plural = value
      i, clause_color = _clause(items, i + 1)
      if count is None:
        count = 2 if plural else 1
      pairs += [(color or clause_color, shape)] * count
      color, count = None, None
      continue
    elif kind != 'size':
      color, count = None, None
    i += 1
  return pairs


def pair_phrases(color: str, shape: str) -> list[str]:
  """Every phrase of the grammar's words that `named_pairs` reads as naming
  (color, shape), colour next to noun: ('red', 'circle') -> ['red circle',
  'red circles', 'red disk', 'red disks']. A shape the grammar lacks gets
  its name and plural."""
  forms = scenes._SHAPE_WORDS.get(shape, [(shape, _plural(shape))])
  return [f'{color} {noun}' for nouns in forms for noun in nouns]


# ----------------------------------------------------------------------------
# Scores on `shapes`.
# ----------------------------------------------------------------------------


def _label(value: Any, names: Sequence[str]) -> str:
  """A colour or shape given as a name, bytes or a ClassLabel index."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  return names[int(value)]


def object_pairs(objects: Any) -> list[tuple[str, str]]:
  """(colour, shape) of each object of one image.

  Args:
    objects: a sequence of (colour, shape) pairs, of dicts with 'color' and
      'shape', or of objects with those attributes (`scenes.Obj`); or one
      dict of parallel sequences, as TFDS gives the `objects` feature.
      Colours and shapes are names or ClassLabel indices (into
      `scenes.COLORS_LIST`, `scenes.SHAPES`).

  Returns:
    One (colour, shape) per object, by name.
  """
  if isinstance(objects, Mapping):
    raw = list(zip(objects['color'], objects['shape']))
  else:
    raw = []
    for o in objects:
      if isinstance(o, Mapping):
        raw.append((o['color'], o['shape']))
      elif hasattr(o, 'color') and hasattr(o, 'shape'):
        raw.append((o.color, o.shape))
      else:
        color, shape = o
        raw.append((color, shape))
  return [(_label(c, scenes.COLORS_LIST), _label(s, scenes.SHAPES))
          for c, s in raw]


def hallucinated_pairs(caption: str, objects: Any) -> list[tuple[str, str]]:
  """The distinct (colour, shape) pairs `caption` names that `objects`
  (as `object_pairs` takes them) lack, in order of mention."""
  present = set(object_pairs(objects))
  absent = [p for p in named_pairs(caption)
            if p[0] is not None and p not in present]
  return list(dict.fromkeys(absent))


def _same_keys(captions: Mapping[Hashable, Any],
               truth: Mapping[Hashable, Any], what: str) -> None:
  if captions.keys() != truth.keys():
    only_captions = [k for k in captions if k not in truth]
    only_truth = [k for k in truth if k not in captions]
    raise ValueError(
        f'captions and {what} must have the same image ids: '
        f'{len(only_captions)} only in captions (e.g. {only_captions[:3]}), '
        f'{len(only_truth)} only in {what} (e.g. {only_truth[:3]})')


def _share(part: int, whole: int) -> float:
  return part / whole if whole else 0.0


def score_shapes(captions: Mapping[Hashable, str],
                 objects: Mapping[Hashable, Any]) -> dict[str, float | int]:
  """Object recall, novel-pair recall and hallucination on `shapes`.

  Args:
    captions: image id -> its caption (one per image).
    objects: image id -> its objects, in any form `object_pairs` takes.

  Returns:
    {'object_recall', 'novel_pair_recall', 'hallucination'}: shares in
    [0, 1], as the module docstring defines them, 0.0 where there is
    nothing to share out; and the counts behind them, so that a caller can
    tell "no novel objects" from "none recalled" and pool batches:
    'objects', 'recalled_objects', 'novel_objects',
    'recalled_novel_objects', 'captions', 'hallucinated_captions'.

  Raises:
    ValueError: `captions` and `objects` have different image ids.
  """
  _same_keys(captions, objects, 'objects')
  total = recalled = novel = recalled_novel = hallucinated = 0
  for key, caption in captions.items():
    truth = collections.Counter(object_pairs(objects[key]))
    named = collections.Counter(
        p for p in named_pairs(caption) if p[0] is not None)
    for pair, n in truth.items():
      hits = min(n, named[pair])
      total += n
      recalled += hits
      if pair in scenes.HELD_OUT:
        novel += n
        recalled_novel += hits
    hallucinated += any(p not in truth for p in named)
  return {
      'object_recall': _share(recalled, total),
      'novel_pair_recall': _share(recalled_novel, novel),
      'hallucination': _share(hallucinated, len(captions)),
      'objects': total,
      'recalled_objects': recalled,
      'novel_objects': novel,
      'recalled_novel_objects': recalled_novel,
      'captions': len(captions),
      'hallucinated_captions': hallucinated,
  }


# ----------------------------------------------------------------------------
# COCO: a CHAIR approximation.
# ----------------------------------------------------------------------------

# Irregular forms of a name's last word: every form that mentions it.
_IRREGULAR = {
    'person': ('person', 'persons', 'people'),
    'mouse': ('mouse', 'mice'),
    'knife': ('knife', 'knives'),
    'sheep': ('sheep',),
    'skis': ('ski', 'skis'),
    'scissors': ('scissors',),
    'broccoli': ('broccoli',),
}


def _plural(word: str) -> str:
  if word.endswith(('s', 'x', 'z', 'ch', 'sh')):
    return word + 'es'
  if word.endswith('y') and len(word) > 1 and word[-2] not in 'aeiou':
    return word[:-1] + 'ies'
  return word + 's'


@functools.cache
def _coco_forms(names: tuple[str, ...]) -> dict[tuple[str, ...], str]:
  """Words of every singular and plural form -> its category name."""
  forms = {}
  for name in names:
    words = _words(name)
    if not words:
      continue
    *head, last = words
    for form in _IRREGULAR.get(last, (last, _plural(last))):
      forms[tuple(head + [form])] = name
  return forms


def category_phrases(name: str) -> list[str]:
  """The forms of a category's name that `coco_mentions` reads as it:
  'person' -> ['person', 'persons', 'people'], 'hot dog' -> ['hot dog',
  'hot dogs']."""
  return [' '.join(words) for words in _coco_forms((name,))]


def coco_mentions(caption: str, names: Sequence[str]) -> list[str]:
  """The category names a caption mentions, in order, each time it does.

  Longest forms match first, so "a hot dog" mentions 'hot dog' and not
  'dog'. Never raises.

  Args:
    caption: any text; case and punctuation do not matter.
    names: the category names, e.g. the 80 COCO detection categories.

  Returns:
    One entry of `names` per mention.
  """
  forms = _coco_forms(tuple(names))
  if not forms:
    return []
  longest = max(len(f) for f in forms)
  words = _words(caption)
  found, i = [], 0
  while i < len(words):
    for n in range(min(longest, len(words) - i), 0, -1):
      name = forms.get(tuple(words[i:i + n]))
      if name is not None:
        found.append(name)
        i += n
        break
    else:
      i += 1
  return found


def _categories(labels: Iterable[Any], names: Sequence[str]) -> set[str]:
  """An image's categories as names; labels are names or indices."""
  out = set()
  for label in labels:
    if isinstance(label, bytes):
      label = label.decode('utf-8')
    out.add(label if isinstance(label, str) else names[int(label)])
  return out


def score_coco(captions: Mapping[Hashable, str],
               categories: Mapping[Hashable, Iterable[Any]],
               names: Sequence[str]) -> dict[str, float | int]:
  """Object recall and CHAIR-style hallucination on COCO (an approximation).

  Matching is by category name and plural only (the module docstring says
  what that misses), so these are not the paper's CHAIR numbers.

  Args:
    captions: image id -> its caption (one per image).
    categories: image id -> the category of each of its objects, as names
      or indices into `names` (TFDS coco_captions' `objects/label`);
      repeats are fine.
    names: the category names, e.g. the 80 COCO detection categories.

  Returns:
    'object_recall': the share of (image, category) pairs whose category
    the caption mentions, each category counted once per image;
    'hallucination' (CHAIR-s): the share of captions mentioning a category
    the image lacks; 'chair_i': the share of mentions (each occurrence
    counts) whose category the image lacks. 0.0 where there is nothing to
    share out. And the counts: 'objects', 'recalled_objects', 'captions',
    'hallucinated_captions', 'mentions', 'hallucinated_mentions'.

  Raises:
    ValueError: `captions` and `categories` have different image ids.
  """
  _same_keys(captions, categories, 'categories')
  total = recalled = hallucinated = mentions = wrong = 0
  for key, caption in captions.items():
    truth = _categories(categories[key], names)
    said = coco_mentions(caption, names)
    total += len(truth)
    recalled += len(truth & set(said))
    mentions += len(said)
    misses = sum(name not in truth for name in said)
    wrong += misses
    hallucinated += misses > 0
  return {
      'object_recall': _share(recalled, total),
      'hallucination': _share(hallucinated, len(captions)),
      'chair_i': _share(wrong, mentions),
      'objects': total,
      'recalled_objects': recalled,
      'captions': len(captions),
      'hallucinated_captions': hallucinated,
      'mentions': mentions,
      'hallucinated_mentions': wrong,
  }


def score(kind: str, captions: Mapping[Hashable, str],
          objects: Mapping[Hashable, Any], names: Sequence[str] = ()
          ) -> tuple[dict[str, float], dict[str, int]]:
  """The evaluator's object metrics and their counts, for the annotations
  `capjax.data.datasets.objects` reads: `kind` 'shapes' or 'categories'.

  The metrics are shares in [0, 1]; novel-pair recall only where the images
  hold a held-out pair (shapes' `test_novel`).
  """
  if kind == 'shapes':
    scores = score_shapes(captions, objects)
    shares = ['object_recall', 'hallucination']
    if scores['novel_objects']:
      shares.append('novel_pair_recall')
  elif kind == 'categories':
    scores = score_coco(captions, objects, names)
    shares = ['object_recall', 'hallucination', 'chair_i']
  else:
    raise ValueError(f'unknown kind of object annotations: {kind!r}')
  metrics = {k: float(scores[k]) for k in shares}
  counts = {k: int(v) for k, v in scores.items() if k not in metrics and
            isinstance(v, int)}
  return metrics, counts
