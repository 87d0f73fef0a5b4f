"""A dataset's images, once more, at the training resolution.

Decoding a 640x480 COCO JPEG and resizing it to 224 px takes a CPU core
about 3 ms: a 16-core host then feeds ~3,000 images/s, a fraction of what a
GPU trains on. So every split is copied once, resized to
`config.data.image_size` and stored as a small JPEG, and training,
validation and decoding read that copy (about 9x the images per core:
see BENCHMARKS.md). The original TFDS dataset stays the source of truth; a copy at
another resolution is simply another copy.

The copy lives beside the dataset in the TFDS data dir, named by its
resolution: `<data_dir>/coco_captions/2014/1.1.0-224px/`, holding
`<split>-NNNNN.array_record` shards (random access, read by grain's
`ArrayRecordDataSource`) and, once a split is complete, `<split>.json`.
Each shard is written under a temporary name and renamed when complete, so
an interrupted build resumes at the first missing shard, and a split without
its `.json`, or whose shards are not the size it records, is never read
(and is copied again). Splits are copied as jobs first need them (or all
at once by `--mode=prepare`).

Why JPEG (quality 95, colour at full resolution) and not raw pixels: at
224 px a raw image is 150 KB, COCO's copy 18.5 GB, where JPEG takes ~51 KB
and ~6.3 GB, which a host's page cache can hold; and decoding it still
meets the input path's target of 1,500 images/s per core.
"""

import bisect
from collections.abc import Sequence
import json
import os
import time
import types
from typing import Any

from absl import logging
from array_record.python import array_record_module
import grain
import msgpack
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds

from capjax.data import datasets
from capjax.data import images

FORMAT = 'capjax-resized-jpeg-1'  # Changes whenever the records change.
QUALITY = 95
SHARD_SIZE = 4_096  # Examples per shard: the most an interruption loses.


def directory(builder: tfds.core.DatasetBuilder, image_size: int) -> str:
  """Where the copy of `builder`'s dataset at `image_size` px lives."""
  # Not a version string, so TFDS never takes it for another version.
  return f'{os.fspath(builder.data_dir)}-{image_size}px'


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  if split in builder.info.splits:
    return builder.info.splits[split].num_examples
  # Unknown to the metadata (only under tfds.testing.mock_data).
  return len(builder.as_data_source(split))


def _header(builder: tfds.core.DatasetBuilder, split: str,
            image_size: int) -> dict[str, Any]:
  """What a split's copy is made from and how; another one is not used."""
  config = builder.builder_config
  return {'format': FORMAT, 'image_size': image_size, 'quality': QUALITY,
          'dataset': builder.name, 'config': config.name if config else None,
          'version': str(builder.version), 'split': split,
          'num_examples': _num_examples(builder, split)}


def _read_split_info(builder: tfds.core.DatasetBuilder, split: str,
                     image_size: int) -> dict[str, Any] | None:
  path = os.path.join(directory(builder, image_size), f'{split}.json')
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  header = _header(builder, split, image_size)
  if {k: info.get(k) for k in header} != header:
    logging.warning('%s was made from another dataset or in another format; '
                    'the split will be copied again.', path)
    return None
  folder = directory(builder, image_size)
  sizes = [_size(_shard_path(folder, split, i))
           for i in range(len(info.get('shard_bytes', [])))]
  if not sizes or sizes != info['shard_bytes']:
    logging.warning('%s: shards of %s are missing or damaged; the split will '
                    'be copied again.', folder, split)
    return None
  return info


def _size(path: str) -> int | None:
  try:
    return os.path.getsize(path)
  except OSError:
    return None


def missing(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
            image_size: int) -> list[str]:
  """The splits (names, not specs) whose copy is not complete."""
  return [s for s in dict.fromkeys(splits)
          if _read_split_info(builder, s, image_size) is None]


def _shard_path(folder: str, split: str, index: int) -> str:
  return os.path.join(folder, f'{split}-{index:05d}.array_record')


def _encode_example(example: dict[str, Any], image_size: int) -> bytes:
  """One TFDS example (image undecoded) -> one record of the copy."""
  name = datasets.as_str(example.get('image/filename', example['image/id']))
  pixels = images.decode_resized(example['image'], image_size, name)
  return msgpack.packb({
      'image': images.encode_jpeg(pixels, QUALITY),
      'id': int(example['image/id']),
      'captions': [datasets.as_str(t) for t in example['captions']['text']],
  })


def build(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
          image_size: int, workers: int | None = None) -> str:
  """Copies (or completes) `splits`; returns the copy's folder.

  Images are decoded, resized and encoded on `workers` threads (default:
  every core); complete shards and splits are kept.
  """
  folder = directory(builder, image_size)
  os.makedirs(folder, exist_ok=True)
  todo = missing(builder, splits, image_size)
  headers = {s: _header(builder, s, image_size) for s in todo}
  total = sum(h['num_examples'] for h in headers.values())
  done, written, started = 0, 0, time.monotonic()
  if todo:
    logging.info('Copying %s (%d images) at %d px to %s.', ', '.join(todo),
                 total, image_size, folder)
  for split, header in headers.items():
    n = header['num_examples']
    if os.path.exists(os.path.join(folder, f'{split}.json')):
      # Complete once but now damaged or stale: its shards are not reused.
      for f in os.listdir(folder):
        if f.startswith(f'{split}-') or f == f'{split}.json':
          os.remove(os.path.join(folder, f))
    source = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})
    num_shards = -(-n // SHARD_SIZE)
    for shard in range(num_shards):
      path = _shard_path(folder, split, shard)
      indices = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, n))
      done += len(indices)
      if os.path.exists(path):
        continue  # Written by an earlier, interrupted build.
      tmp = f'{path}.tmp-{os.getpid()}'
      writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
      try:
        for _, record in images.ordered_map(
            lambda i: _encode_example(source[i], image_size), indices,
            workers):
          writer.write(record)
        writer.close()
      except BaseException:
        writer.close()
        os.remove(tmp)
        raise
      os.replace(tmp, path)
      written += len(indices)
      seconds = time.monotonic() - started
      logging.info('%s: %s shard %d of %d written; %d of %d images, '
                   '%.0f images/s, ETA %.0f s.', folder, split, shard + 1,
                   num_shards, done, total, written / seconds,
                   seconds / written * (total - done))
    shard_bytes = [os.path.getsize(_shard_path(folder, split, i))
                   for i in range(num_shards)]
    size = sum(shard_bytes)
    info = dict(header, shards=num_shards, shard_bytes=shard_bytes,
                bytes=size)
    tmp = os.path.join(folder, f'{split}.json.tmp-{os.getpid()}')
    with open(tmp, 'w') as f:
      json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(folder, f'{split}.json'))
    logging.info('%s: %s done, %d images, %.3f GB (%.1f KB per image).',
                 folder, split, n, size / 1e9, size / max(n, 1) / 1e3)
  return folder


def size_on_disk(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
                 image_size: int) -> int:
  """Bytes of the complete copies of `splits`, as their records say."""
  return sum(_read_split_info(builder, s, image_size)['bytes']
             for s in dict.fromkeys(splits))


class ResizedSource(Sequence):
  """Random access to a split spec of the copy, in TFDS's order.

  `source[i]` is the example `builder.as_data_source(spec)[i]` would be,
  with the image already at the copy's resolution: {'image': uint8
  [S, S, 3], 'image/id', 'captions': {'text'}}. Picklable, for grain's
  worker processes.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str,
               image_size: int):
    folder = directory(builder, image_size)
    names = datasets.split_names(split)
    if absent := missing(builder, names, image_size):
      raise FileNotFoundError(f'{folder}: no complete copy of {absent}')
    infos = {n: _read_split_info(builder, n, image_size) for n in names}
    self._sources = {
        n: grain.sources.ArrayRecordDataSource(
            [_shard_path(folder, n, i) for i in range(info['shards'])])
        for n, info in infos.items()}
    # TFDS's own arithmetic for 'train+restval', 'train[:10%]', ...
    sizes = {n: types.SimpleNamespace(num_examples=info['num_examples'],
                                      shard_lengths=[info['num_examples']])
             for n, info in infos.items()}
    self._starts = []  # Where each range begins in this source.
    self._ranges = []  # (split, first index in it)
    length = 0
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes):
      first = part.from_ or 0
      last = sizes[part.splitname].num_examples if part.to is None else part.to
      self._starts.append(length)
      self._ranges.append((part.splitname, first))
      length += last - first
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(index)
    which = bisect.bisect_right(self._starts, index) - 1
    split, first = self._ranges[which]
    record = msgpack.unpackb(
        self._sources[split][first + index - self._starts[which]])
    return {
        'image': simplejpeg.decode_jpeg(record['image']),  # [S, S, 3]
        'image/id': np.int64(record['id']),
        'captions': {'text': record['captions']},
    }
