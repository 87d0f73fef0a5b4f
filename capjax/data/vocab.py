"""Word vocabulary: built once from training captions, saved as JSON, reloaded.

Every job after the first (decode, captioning, resumed training) reads the
same `vocab.json` from the workdir, so token ids never drift between jobs.
"""

import collections
from collections.abc import Callable, Iterable, Sequence
import dataclasses
import json
import os
from typing import Any

import numpy as np

from capjax import files
from capjax.data import tokenizer
from capjax.errors import UserError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ('<pad>', '<bos>', '<eos>', '<unk>')
_FORMAT = 'capjax.vocab/1'
FILENAME = 'vocab.json'


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A fixed id <-> word mapping with the four special tokens first."""

  words: tuple[str, ...]  # id -> word; words[:4] == SPECIALS
  source: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if tuple(self.words[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f'vocabulary must start with {SPECIALS}')
    object.__setattr__(self, '_ids', {w: i for i, w in enumerate(self.words)})

  def __len__(self) -> int:
    return len(self.words)

  @classmethod
  def build(cls, captions: Iterable[str], min_count: int,
            source: dict[str, Any] | None = None) -> 'Vocab':
    """Words seen at least `min_count` times, most frequent first.

    `captions` is consumed as a stream: only the word counts are kept.
    """
    counts = collections.Counter()
    num_captions = 0
    for caption in captions:
      counts.update(tokenizer.tokenize(caption))
      num_captions += 1
    if not num_captions:
      raise UserError('no captions to build the vocabulary from: the training '
                      'split is empty; check --config.data.train_split')
    # Ties broken alphabetically so the ids are a function of the counts.
    kept = sorted((w for w, c in counts.items() if c >= min_count),
                  key=lambda w: (-counts[w], w))
    source = dict(source or {}, min_count=min_count,
                  num_captions=num_captions, num_words_seen=len(counts))
    return cls(SPECIALS + tuple(kept), source)

  def encode(self, caption: str) -> list[int]:
    """Token ids of `caption`, without <bos>/<eos>; unknown words -> <unk>."""
    return [self._ids.get(w, UNK) for w in tokenizer.tokenize(caption)]

  def encode_batch(self, captions: Sequence[str], max_len: int) -> np.ndarray:
    """`[len(captions), max_len]` int32: <bos> words <eos> <pad>...

    Captions longer than `max_len - 2` words are cut, keeping the <eos>.
    """
    out = np.full((len(captions), max_len), PAD, np.int32)
    for i, caption in enumerate(captions):
      ids = [BOS] + self.encode(caption)[:max_len - 2] + [EOS]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """The caption text of `ids`, up to the first <eos>; specials dropped."""
    words = []
    for i in ids:
      i = int(i)
      if i == EOS:
        break
      if i >= UNK:
        words.append(self.words[i])
    return ' '.join(words)

  def save(self, path: str) -> None:
    """Writes the vocabulary; never replaces an existing file
    (FileExistsError)."""
    files.write_text(path, json.dumps(
        {'format': _FORMAT, 'source': self.source, 'words': list(self.words)},
        ensure_ascii=False, indent=0), exclusive=True)

  @classmethod
  def load(cls, path: str) -> 'Vocab':
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f'cannot read the vocabulary {path}: {e}') from None
    if not isinstance(data, dict) or data.get('format') != _FORMAT:
      raise UserError(f'{path} is not a capjax vocabulary file (expected '
                      f'"format": "{_FORMAT}")')
    return cls(tuple(data['words']), data.get('source', {}))


def load_or_build(path: str, captions: Callable[[], Iterable[str]],
                  min_count: int, source: dict[str, Any],
                  write: bool = True) -> Vocab:
  """The vocabulary at `path`; built from `captions()` if there is none.

  An existing file is reloaded, never rebuilt, so ids stay fixed for the life
  of a workdir; one built from other data or settings is an error. Every
  process builds the same vocabulary, and only the one with `write` saves it.
  """
  wanted = dict(source, min_count=min_count)
  if os.path.exists(path):
    vocab = Vocab.load(path)
    differs = {k: (vocab.source.get(k), v) for k, v in wanted.items()
               if vocab.source.get(k) != v}
    if differs:
      what = ', '.join(f'{k}: {old!r} there, {new!r} now'
                       for k, (old, new) in differs.items())
      raise UserError(f'{path} was built from other data ({what}); use a new '
                      '--workdir, or set the config back')
    return vocab
  vocab = Vocab.build(captions(), min_count, source)
  if write:
    vocab.save(path)
  return vocab
