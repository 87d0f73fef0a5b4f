"""Damaged shards of the stores on capjax.data.records: the resized copy and
the feature cache.

A shard whose bytes change after it is written (same size, so its size
still matches) is found when its split is opened, from its modification
time: made again alone where the job may prepare data, else named in one
line. A change that keeps the time is one line naming the shard where the
damaged record is read.
"""

import dataclasses
import os
import re

import pytest

from capjax import cache_features
from capjax import start as start_lib
from capjax.data import datasets
from capjax.data import feature_cache
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data import records
from capjax.data import resized
from capjax.errors import UserError
from conftest import copy_build

SIZE = 32
_REMAKE_COPY = ('the next run with --config.data.prepare=True (or '
                '--mode=prepare)')


@pytest.fixture
def test_config(test_config, tmp_path, monkeypatch):
  """The tiny shapes build in a data dir of this test's own, without the
  copies and caches of other tests; train in 3 shards of the copy."""
  data_dir = tmp_path / 'tfds'
  copy_build(test_config.data.data_dir, data_dir)
  test_config.data.data_dir = str(data_dir)
  monkeypatch.setattr(resized, 'SHARD_SIZE', 100)
  return test_config


def _flip(path, offset=1000, keep_time=False):
  """Inverts 16 bytes of `path` at `offset` (default: in its first records;
  a shard ends in padding that no record is read from): the same size,
  other bytes."""
  stat = os.stat(path)
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(16)
    f.seek(offset)
    f.write(bytes(b ^ 0xff for b in data))
  # As a failing disk would, the time kept; else as a write a second after
  # the build would (one within the same tick of the clock keeps it).
  mtime = stat.st_mtime_ns + (0 if keep_time else 10**9)
  os.utime(path, ns=(stat.st_atime_ns, mtime))


def _stats(folder):
  """File -> (inode, mtime): what was written again, and what was not."""
  return {name: (stat.st_ino, stat.st_mtime_ns)
          for name in os.listdir(folder)
          for stat in [os.stat(os.path.join(folder, name))]}


def _read(data, split):
  """Every example's image id, in order."""
  source = data.source(split)
  return [int(source[i]['image/id']) for i in range(len(source))]


def _one_line(raised) -> str:
  message = str(raised.value)
  assert '\n' not in message
  return message


def test_a_changed_shard_of_the_copy_is_made_again_alone(test_config,
                                                         tmp_path):
  test_config.data.prepare = True
  data = prepare.prepare(test_config, str(tmp_path / 'run'))
  ids = _read(data, 'train')  # Makes the copy.
  assert ids == [int(x['image/id'])
                 for x in datasets.data_source(data.builder, 'train')]
  folder = resized.directory(data.builder, SIZE)
  shard = records.shard_path(folder, 'train', 1)
  with open(shard, 'rb') as f:
    written = f.read()
  before = _stats(folder)
  _flip(shard)

  assert _read(data, 'train') == ids
  with open(shard, 'rb') as f:
    assert f.read() == written
  after = _stats(folder)
  assert sorted(after) == sorted(before)
  assert {n for n in after if after[n] != before[n]} == {
      'train-00001.array_record', 'train.json'}


def test_a_changed_shard_of_the_copy_is_named_where_the_job_may_not_prepare(
    test_config, tmp_path):
  test_config.data.prepare = False
  data = prepare.prepare(test_config, str(tmp_path / 'run'))
  resized.build(data.builder, ['train'], SIZE)
  shard = records.shard_path(resized.directory(data.builder, SIZE), 'train',
                             2)
  _flip(shard)
  with pytest.raises(UserError) as raised:
    data.source('train')
  assert re.fullmatch(
      f'the copy of shapes at 32 px is damaged: {re.escape(shard)} changed '
      r'after it was written \(Corrupted Riegeli/records file: .*hash '
      r'mismatch.*\)\. Make it again with --mode=prepare \(or set '
      r'--config.data.prepare=True to make it now\)',
      _one_line(raised)), str(raised.value)
  # What it says: --mode=prepare makes it again.
  data = prepare.prepare(test_config, str(tmp_path / 'run'), force=True)
  assert len(_read(data, 'train')) == 256


@pytest.mark.parametrize('where', ['record', 'index'])
def test_a_change_that_keeps_the_time_is_named_where_it_is_read(
    test_config, tmp_path, where):
  test_config.data.prepare = True
  data = prepare.prepare(test_config, str(tmp_path / 'run'))
  source = data.source('train')
  folder = resized.directory(data.builder, SIZE)
  shard = records.shard_path(folder, 'train', 1)
  before = _stats(folder)
  if where == 'record':  # Read in some batch of the epoch.
    _flip(shard, keep_time=True)
    batches = iter(pipeline.train_dataset(test_config, data.source('train'),
                                          data.vocab))
    with pytest.raises(UserError) as raised:
      for _ in range(len(source) // test_config.batch_size + 1):
        next(batches)
  else:
    # The header of the last 64 KiB block, read on opening to find the
    # index of the records (what follows the index is padding).
    _flip(shard, os.path.getsize(shard) - 65536, keep_time=True)
    with pytest.raises(UserError) as raised:
      data.source('train')
  message = _one_line(raised)
  assert message.startswith(f'{shard} is damaged (')
  assert message.endswith('its bytes changed after it was written. Delete '
                          f'it; {_REMAKE_COPY} makes it again')
  # What it says: once deleted, it is made again alone.
  os.remove(shard)
  assert len(_read(data, 'train')) == 256
  after = _stats(folder)
  assert {n for n in after if after[n] != before[n]} == {
      'train-00001.array_record', 'train.json'}


def test_a_changed_shard_of_the_feature_cache(test_config, tmp_path,
                                              monkeypatch):
  monkeypatch.setattr(feature_cache, 'SHARD_SIZE', 32)  # 64 images: 2.
  config = test_config
  config.seed = 16  # An encoder, so a cache, of this test's own.
  config.model.encoder.frozen = True
  config.model.encoder.freeze_bn = True
  config.train.allow_random_frozen_encoder = True
  config.data.features.use = True
  config.data.features.batch_size = 16
  s = start_lib.start(config, str(tmp_path / 'run'))
  s.checkpoints.close()
  cache = cache_features.build(config, s.data, s.predict, s.state, s.par,
                               ['validation'], force=True)
  shard = records.shard_path(cache.folder, 'validation', 0)
  with open(shard, 'rb') as f:
    written = f.read()
  before = _stats(cache.folder)
  _flip(shard)

  config.data.prepare = False
  with pytest.raises(UserError) as raised:
    cache_features.build(config, s.data, s.predict, s.state, s.par,
                         ['validation'])
  assert re.fullmatch(
      f'the feature cache is damaged: {re.escape(shard)} changed after it '
      r'was written \(Corrupted Riegeli/records file: .*\)\. Make it again '
      r'with --mode=cache_features \(or set --config.data.prepare=True to '
      r'make it now\)', _one_line(raised)), str(raised.value)
  data = dataclasses.replace(s.data, features=cache)
  with pytest.raises(UserError) as raised:
    data.source('validation')
  assert (f'has no features of validation that read as written: {shard} '
          'changed after it was written') in _one_line(raised)

  config.data.prepare = True
  cache_features.build(config, s.data, s.predict, s.state, s.par,
                       ['validation'])
  with open(shard, 'rb') as f:
    assert f.read() == written
  after = _stats(cache.folder)
  assert {n for n in after if after[n] != before[n]} == {
      'validation-00000.array_record', 'validation.json'}
  assert len(data.source('validation')) == 64
