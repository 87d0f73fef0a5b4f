"""A dataset's images, once more, at the training resolution.

Decoding a 640x480 COCO JPEG and resizing it to 224 px takes a CPU core
about 3 ms: a 16-core host then feeds ~3,000 images/s, a fraction of what a
GPU trains on. So every split is copied once, resized to
`config.data.image_size` and stored as a small JPEG, and training,
validation and decoding read that copy (about 9x the images per core:
see BENCHMARKS.md). The original TFDS dataset stays the source of truth; a
copy at another resolution is simply another copy.

The copy lives beside the dataset in the TFDS data dir, named by its
resolution: `<data_dir>/coco_captions/2014/1.1.0-224px/`, a store of
`capjax.data.records` (per split: ArrayRecord shards, read by grain with
random access, and once complete `<split>.json`), so an interrupted build
resumes at the first missing shard, and a split made from other data or
damaged is never read (and is copied again). Splits are copied as jobs first
need them (or all at once by `--mode=prepare`).

Why JPEG (quality 95, colour at full resolution) and not raw pixels: at
224 px a raw image is 150 KB, COCO's copy 18.5 GB, where JPEG takes ~51 KB
and ~6.3 GB, which a host's page cache can hold; and decoding it still
meets the input path's target of 1,500 images/s per core.
"""

from collections.abc import Sequence
import os
from typing import Any

from absl import logging
import msgpack
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds

from capjax.data import datasets
from capjax.data import images
from capjax.data import records

FORMAT = 'capjax-resized-jpeg-1'  # Changes whenever the records change.
QUALITY = 95
SHARD_SIZE = 4_096  # Examples per shard: the most an interruption loses.


def directory(builder: tfds.core.DatasetBuilder, image_size: int) -> str:
  """Where the copy of `builder`'s dataset at `image_size` px lives."""
  # Not a version string, so TFDS never takes it for another version.
  return f'{os.fspath(builder.data_dir)}-{image_size}px'


def _header(builder: tfds.core.DatasetBuilder, split: str,
            image_size: int) -> dict[str, Any]:
  """What a split's copy is made from and how; another one is not used."""
  config = builder.builder_config
  return {'format': FORMAT, 'image_size': image_size, 'quality': QUALITY,
          'dataset': builder.name, 'config': config.name if config else None,
          'version': str(builder.version), 'split': split,
          'num_examples': datasets.num_examples(builder, split)}


def _info(builder, split: str, image_size: int) -> dict[str, Any] | None:
  return records.read_info(directory(builder, image_size), split,
                           _header(builder, split, image_size))


def missing(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
            image_size: int) -> list[str]:
  """The splits (names, not specs) whose copy is not complete."""
  return [s for s in dict.fromkeys(splits)
          if _info(builder, s, image_size) is None]


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
  todo = missing(builder, splits, image_size)
  headers = {s: _header(builder, s, image_size) for s in todo}
  progress = records.Progress(
      folder, sum(h['num_examples'] for h in headers.values()))
  if todo:
    logging.info('Copying %s (%d images) at %d px to %s.', ', '.join(todo),
                 progress.total, image_size, folder)
  for split, header in headers.items():
    source = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})
    encode = lambda i, source=source: _encode_example(source[i], image_size)
    records.write_split(
        folder, split, header, header['num_examples'], SHARD_SIZE,
        lambda indices, encode=encode: (
            r for _, r in images.ordered_map(encode, indices, workers)),
        progress)
  return folder


def damaged(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
            image_size: int) -> str | None:
  """What is wrong with the first complete copy of `splits` whose shards
  are not as written, naming the shard; None if there is none."""
  folder = directory(builder, image_size)
  for split in dict.fromkeys(splits):
    if damage := records.damaged(folder, split,
                                 _header(builder, split, image_size)):
      return damage
  return None


def size_on_disk(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
                 image_size: int) -> int:
  """Bytes of the complete copies of `splits`, as their records say."""
  return sum(_info(builder, s, image_size)['bytes']
             for s in dict.fromkeys(splits))


def _decode_record(record: bytes) -> dict[str, Any]:
  record = msgpack.unpackb(record)
  return {
      'image': simplejpeg.decode_jpeg(record['image']),  # [S, S, 3]
      'image/id': np.int64(record['id']),
      'captions': {'text': record['captions']},
  }


def source(builder: tfds.core.DatasetBuilder, split: str,
           image_size: int) -> records.SpecSource:
  """Random access to a split spec of the copy, in TFDS's order.

  `source[i]` is the example `builder.as_data_source(spec)[i]` would be,
  with the image already at the copy's resolution: {'image': uint8
  [S, S, 3], 'image/id', 'captions': {'text'}}. Picklable, for grain's
  worker processes.
  """
  folder = directory(builder, image_size)
  names = datasets.split_names(split)
  if absent := missing(builder, names, image_size):
    raise FileNotFoundError(f'{folder}: no complete copy of {absent}')
  return records.SpecSource(
      folder, split, {n: _info(builder, n, image_size) for n in names},
      _decode_record, remake='the next run with --config.data.prepare=True '
      '(or --mode=prepare)')
