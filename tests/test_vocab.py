"""Tokenizer and vocabulary."""

import errno
import json
import os
import re

import numpy as np
import pytest

from capjax.data import tokenizer
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError


@pytest.mark.parametrize('caption, tokens', [
    ('A man riding a horse.', ['a', 'man', 'riding', 'a', 'horse']),
    ("The dog's ball, isn't it?", ['the', 'dog', "'s", 'ball', 'is', "n't",
                                   'it']),
    ('Two  "red" birds; three!', ['two', 'red', 'birds', 'three']),
    # As the official Java tokenizer: brackets stay as words, curly quotes,
    # single quotes and full stops inside a caption are split off.
    ('A dog (brown).', ['a', 'dog', '-lrb-', 'brown', '-rrb-']),
    ('A man\u2019s \u201cred\u201d car', ['a', 'man', "'s", 'red', 'car']),
    ("A sign saying 'STOP'. Two cars", ['a', 'sign', 'saying', 'stop', 'two',
                                       'cars']),
    ('On St. Patrick\'s day in the U.S.', ['on', 'st.', 'patrick', "'s", 'day',
                                          'in', 'the', 'u.s.']),
    ('Bus no. 5 etc.', ['bus', 'no.', '5', 'etc.']),
    ('A black-and-white photo\nof a cat...', ['a', 'black-and-white',
                                              'photo', 'of', 'a', 'cat']),
    ('', []),
])
def test_tokenize_follows_ptb_and_drops_punctuation(caption, tokens):
  assert tokenizer.tokenize(caption) == tokens


def _vocab(min_count=2):
  return vocab_lib.Vocab.build(
      ['A red circle.', 'a blue circle', 'A red square', 'one zebra'],
      min_count=min_count, source={'dataset': 'x'})


def test_build_orders_by_count_then_word_and_applies_min_count():
  vocab = _vocab()
  assert vocab.words == vocab_lib.SPECIALS + ('a', 'circle', 'red')
  assert vocab.source == {'dataset': 'x', 'min_count': 2, 'num_captions': 4,
                          'num_words_seen': 7}
  assert len(_vocab(min_count=1)) == 4 + 7


def test_encode_decode_round_trip_with_unknown_words():
  vocab = _vocab()
  ids = vocab.encode('A red zebra circle')
  assert ids == [4, 6, vocab_lib.UNK, 5]
  assert vocab.decode(ids) == 'a red <unk> circle'
  assert vocab.decode([vocab_lib.BOS, 4, 5, vocab_lib.EOS, 6, 6]) == 'a circle'


def test_encode_batch_pads_and_truncates_keeping_eos():
  vocab = _vocab()
  out = vocab.encode_batch(['a red circle', 'a a a a a a a a'], max_len=5)
  assert out.dtype == np.int32 and out.shape == (2, 5)
  np.testing.assert_array_equal(out[0], [1, 4, 6, 5, 2])
  np.testing.assert_array_equal(out[1], [1, 4, 4, 4, 2])
  out = vocab.encode_batch(['red'], max_len=6)
  np.testing.assert_array_equal(out[0], [1, 6, 2, 0, 0, 0])


def test_empty_training_captions_is_a_user_error():
  with pytest.raises(UserError, match='empty'):
    vocab_lib.Vocab.build([], min_count=1)


def test_save_load_round_trip_and_never_overwrites(tmp_path):
  vocab = _vocab()
  path = str(tmp_path / 'vocab.json')
  vocab.save(path)
  assert vocab_lib.Vocab.load(path) == vocab
  with pytest.raises(FileExistsError):
    _vocab(min_count=1).save(path)
  assert vocab_lib.Vocab.load(path) == vocab
  assert os.listdir(tmp_path) == ['vocab.json']  # No temporary files left.


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
  def full(src, dst):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)

  monkeypatch.setattr(os, 'link', full)
  with pytest.raises(UserError, match=(
      f'^no space left for vocab.json in {tmp_path}: it needs about '
      r'[0-9.]+ B and .* are free\. Free some space there, then run again$')):
    _vocab().save(str(tmp_path / 'vocab.json'))
  assert not os.listdir(tmp_path)


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / 'vocab.json'
  path.write_text('{"words": ["a"]}')
  with pytest.raises(UserError, match='not a capjax vocabulary'):
    vocab_lib.Vocab.load(str(path))
  path.write_text('{oops')
  with pytest.raises(UserError, match='cannot read'):
    vocab_lib.Vocab.load(str(path))


def test_load_or_build_reuses_and_guards_the_workdir_file(tmp_path):
  path = str(tmp_path / 'vocab.json')
  calls = []

  def captions():
    calls.append(1)
    return ['a red circle', 'a red square']

  source = {'dataset': 'shapes', 'split': 'train'}
  first = vocab_lib.load_or_build(path, captions, 1, source)
  again = vocab_lib.load_or_build(path, captions, 1, source)
  assert first == again and len(calls) == 1
  before = open(path).read()
  with pytest.raises(UserError, match=r"min_count: 1 there, 2 now"):
    vocab_lib.load_or_build(path, captions, 2, source)
  with pytest.raises(UserError, match=r"dataset: 'shapes' there, 'coco'"):
    vocab_lib.load_or_build(path, captions, 1, dict(source, dataset='coco'))
  assert open(path).read() == before
  assert json.loads(before)['source']['split'] == 'train'


def test_load_or_build_without_write_leaves_no_file(tmp_path):
  path = str(tmp_path / 'vocab.json')
  vocab_lib.load_or_build(path, lambda: ['a b'], 1, {}, write=False)
  assert not os.path.exists(path)


@pytest.mark.parametrize('caption', [
    'A man riding a wave on top of a surfboard.', 'two dogs, a cat', 'a b.',
    'A man cannot ride.', 'a man gonna ride', 'On Main St.', 'etc.',
    'an x-ray of a 3-d model .', ' a dog . ', 'a--b', 'a , b', 'a dog.\n',
    # The shapes grammar's listings, and their punctuation elsewhere.
    'four shapes : a red square, a star and two blue disks',
    'there are two objects , a red cross and a star', 'a ; b', 'a :5 b',
    'a : 5', 'a ,b', 'a dog :', ': a dog', 'a man wanna ride', 'I wanna',
    'a lemme b', 'gotta go', 'gimme a dog'])
def test_plain_caption_shortcut_gives_treebank_tokens(caption):
  # tokenize() skips Treebank for plain captions; the tokens must not change.
  lower = caption.replace('\n', ' ').lower()
  assert tokenizer.tokenize(caption) == [
      t for t in tokenizer._tokens(lower) if t not in tokenizer._DROP]


def test_plain_captions_know_every_word_treebank_splits():
  # The words Treebank splits though they hold no apostrophe (a plain
  # caption has none): each must send a caption through Treebank.
  treebank = tokenizer._treebank()
  words = set()
  for pattern in treebank.CONTRACTIONS2 + treebank.CONTRACTIONS3:
    word = ''.join(re.findall(r"\(([a-z']+)\)", pattern.pattern))
    assert word, pattern.pattern
    if "'" not in word:
      words.add(word)
      assert not tokenizer._is_plain(f'a {word} b'), word
  assert words == set(tokenizer._SPLIT_WORDS)
  assert tokenizer._is_plain('there are four shapes : a red square , a star')
