"""The dataset's copy at the training resolution (capjax.data.resized)."""

import errno
import io
import json
import os
import re
import socket
import subprocess

import numpy as np
from PIL import Image
import pytest

from capjax.data import datasets
from capjax.data import images
from capjax.data import photos
from capjax.data import prepare
from capjax.data import records
from capjax.data import resized
from capjax.errors import UserError
from conftest import copy_build

SIZE = 32


@pytest.fixture
def test_config(test_config, tmp_path):
  """The tiny shapes build in a data dir of this test's own, without copies."""
  data_dir = tmp_path / 'tfds'
  copy_build(test_config.data.data_dir, data_dir)
  test_config.data.data_dir = str(data_dir)
  return test_config


@pytest.fixture
def builder(test_config):
  return datasets.prepare(test_config.data)


def _files(folder):
  """File -> bytes; a split's .json without the times of its shards, which
  a build made again does not repeat."""
  out = {f: open(os.path.join(folder, f), 'rb').read()
         for f in sorted(os.listdir(folder))}
  for f in out:
    if f.endswith('.json'):
      info = json.loads(out[f])
      del info['shard_mtimes']
      out[f] = json.dumps(info).encode()
  return out


def test_the_copy_reads_as_tfds_does_at_the_model_size(builder):
  resized.build(builder, ['train', 'validation'], SIZE)
  for spec in ('train', 'train[:10]+validation[-5:]', 'validation[25%:50%]'):
    copy = resized.source(builder, spec, SIZE)
    original = datasets.data_source(builder, spec)
    assert len(copy) == len(original)
    for i in (0, len(copy) // 2, len(copy) - 1):
      got, want = copy[i], original[i]
      assert got['image/id'] == want['image/id']
      assert got['captions']['text'] == [
          datasets.as_str(t) for t in want['captions']['text']]
      assert got['image'].shape == (SIZE, SIZE, 3)
      assert got['image'].dtype == np.uint8
      # The pixels `Preprocess` makes of the original, up to JPEG q95.
      direct = images.resize(want['image'], SIZE).astype(int)
      assert np.abs(got['image'] - direct).mean() < 3
  with pytest.raises(IndexError):
    copy[len(copy)]


def test_an_interrupted_copy_resumes_to_the_same_files(builder, monkeypatch,
                                                        tmp_path):
  monkeypatch.setattr(resized, 'SHARD_SIZE', 100)  # 3 shards of train.
  resized.build(builder, ['train'], SIZE)
  folder = resized.directory(builder, SIZE)
  complete = _files(folder)
  assert sorted(complete) == ['train-00000.array_record',
                              'train-00001.array_record',
                              'train-00002.array_record', 'train.json']
  assert json.loads(complete['train.json'])['num_examples'] == 256
  for f in complete:
    os.remove(os.path.join(folder, f))

  encode = resized._encode_example  # pylint: disable=protected-access
  calls = []

  def dies_in_the_second_shard(example, size):
    calls.append(1)
    if len(calls) == 150:
      raise KeyboardInterrupt
    return encode(example, size)

  monkeypatch.setattr(resized, '_encode_example', dies_in_the_second_shard)
  with pytest.raises(KeyboardInterrupt):
    resized.build(builder, ['train'], SIZE, workers=1)
  assert resized.missing(builder, ['train'], SIZE) == ['train']
  with pytest.raises(FileNotFoundError, match='no complete copy'):
    resized.source(builder, 'train', SIZE)
  # Only the first shard survived, and the second's temporary file is gone.
  assert os.listdir(folder) == ['train-00000.array_record']
  calls.clear()
  monkeypatch.setattr(resized, '_encode_example', encode)
  resized.build(builder, ['train'], SIZE)
  assert _files(folder) == complete


def test_a_copy_made_otherwise_is_made_again(builder):
  resized.build(builder, ['validation'], SIZE)
  path = os.path.join(resized.directory(builder, SIZE), 'validation.json')
  info = json.load(open(path))
  json.dump(dict(info, num_examples=63), open(path, 'w'))  # Another source.
  assert resized.missing(builder, ['validation'], SIZE) == ['validation']
  resized.build(builder, ['validation'], SIZE)
  assert not resized.missing(builder, ['validation'], SIZE)
  # A damaged shard: the split is copied again, whole.
  shard = os.path.join(resized.directory(builder, SIZE),
                       'validation-00000.array_record')
  with open(shard, 'r+b') as f:
    f.truncate(1000)
  assert resized.missing(builder, ['validation'], SIZE) == ['validation']
  resized.build(builder, ['validation'], SIZE)
  assert len(resized.source(builder, 'validation', SIZE)) == 64
  os.remove(shard)
  assert resized.missing(builder, ['validation'], SIZE) == ['validation']
  # Another resolution is another copy, beside the dataset.
  assert resized.directory(builder, 24) != resized.directory(builder, SIZE)
  assert resized.directory(builder, 24).startswith(
      os.fspath(builder.data_dir))


def test_jobs_make_the_copy_or_say_how(test_config, tmp_path):
  config = test_config
  config.data.image_size = 24
  data = prepare.prepare(config, str(tmp_path))
  # prepare is on (shapes): made on first use, then reused.
  assert len(data.source('validation')) == 64
  assert not resized.missing(data.builder, ['validation'], 24)
  config.data.prepare = False
  data = prepare.prepare(config, str(tmp_path))
  assert len(data.source('validation')) == 64
  with pytest.raises(UserError, match='no copy of test at 24 px.*--mode=prepare'):
    data.source('test')
  # Without the copy: the originals, images left encoded.
  config.data.resized_copy = False
  example = prepare.prepare(config, str(tmp_path)).source('test')[0]
  assert isinstance(example['image'], bytes)


def test_image_size_must_be_positive(test_config, tmp_path):
  test_config.data.image_size = 0
  with pytest.raises(UserError, match='image_size=0'):
    prepare.prepare(test_config, str(tmp_path))


def test_reduced_decoding_matches_a_full_decode():
  rng = np.random.default_rng(0)
  data = photos.jpeg(photos.photo(rng, 240, 320), 90)
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  for size in (224, 100, 64):
    fast = images.decode_resized(data, size)
    assert fast.shape == (size, size, 3)
    # DCT-domain scaling then bilinear, against a full decode then bilinear.
    assert np.abs(fast.astype(int) - images.resize(full, size)).mean() < 4


def test_reduced_decoding_of_what_simplejpeg_cannot(tmp_path):
  rng = np.random.default_rng(0)
  pixels = photos.photo(rng, 120, 160)
  # CMYK JPEG, and a photo whose EXIF says it is rotated a quarter turn.
  cmyk = io.BytesIO()
  Image.fromarray(pixels).convert('CMYK').save(cmyk, 'JPEG', quality=95)
  out = images.decode_resized(cmyk.getvalue(), 64)
  assert np.abs(out.astype(int) - images.resize(pixels, 64)).mean() < 8
  rotated = io.BytesIO()
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  Image.fromarray(pixels).save(rotated, 'JPEG', quality=95, exif=exif)
  upright = images.load_rgb_bytes(rotated.getvalue(), 'r.jpg')
  assert upright.shape == (160, 120, 3)
  out = images.decode_resized(rotated.getvalue(), 64)
  assert np.abs(out.astype(int) - images.resize(upright, 64)).mean() < 8
  png = io.BytesIO()
  Image.fromarray(pixels).save(png, 'PNG')
  np.testing.assert_array_equal(images.decode_resized(png.getvalue(), 64),
                                images.resize(pixels, 64))


class _FullDisk:
  """An ArrayRecordWriter on a full disk: its error is the OS's, as text."""

  def __init__(self, path, options):
    del options
    self.path = path
    open(path, 'wb').close()  # pylint: disable=consider-using-with

  def write(self, record):
    del record
    raise RuntimeError(f'write() failed: No space left on device; writing '
                       f'{self.path}; at byte 1048576; Could not submit chunk')

  def close(self):
    raise RuntimeError('Failed to close chunk_writer')


def test_a_failed_write_is_one_clear_error(test_config, tmp_path,
                                           monkeypatch):
  data = prepare.prepare(test_config, str(tmp_path))
  folder = resized.directory(data.builder, SIZE)
  for error in (OSError(errno.ENOSPC, 'No space left on device'), None):
    def writer(path, options, error=error):
      if error:
        raise error
      return _FullDisk(path, options)

    monkeypatch.setattr(records.array_record_module, 'ArrayRecordWriter',
                        writer)
    with pytest.raises(UserError) as raised:
      data.source('validation')
    assert re.fullmatch(
        f'no space left for the copy at 32 px in {re.escape(folder)}: '
        r'[0-9.]+ [KMGT]?i?B are free\. Free some space there, then run '
        'again, or read the originals with --config.data.resized_copy=False',
        str(raised.value)), str(raised.value)
    assert not [n for n in os.listdir(folder) if '.tmp-' in n]


def test_a_killed_builds_temporary_file_goes_when_the_next_starts(builder):
  folder = resized.directory(builder, SIZE)
  os.makedirs(folder)
  dead = subprocess.Popen(['true'])  # A process no longer there.
  dead.wait()
  leftover = (f'train-00001.array_record.tmp-{socket.gethostname()}-'
              f'{dead.pid}')
  with open(os.path.join(folder, leftover), 'wb') as f:
    f.write(b'half a shard')
  resized.build(builder, ['validation'], SIZE)
  assert sorted(os.listdir(folder)) == ['validation-00000.array_record',
                                        'validation.json']
