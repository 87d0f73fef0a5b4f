"""The frozen encoder's features of a dataset's images, computed once.

A frozen encoder gives every image the same features at every step, so
training, validation, decoding and SCST can read them instead of running the
encoder (and decoding JPEGs) again. `capjax.cache_features` computes them;
this module stores and reads them.

The cache lives beside the dataset in the TFDS data dir, in a folder named
by the fingerprint of everything that determines the features: dataset,
encoder arch and variant, a hash of its weights, resolution, grid,
normalisation, compute dtype and stored dtype. A cache made with other
weights sits in another folder and is never read by mistake; each split's
`.json` repeats the whole fingerprint, which is checked again on reading.
It is a store of `capjax.data.records` (resumable, finalised atomically):
one record per image, msgpack {'features': bytes of [h, w, C] in the
stored dtype, 'id', 'captions'}.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_dtypes
import msgpack
import numpy as np
import tensorflow_datasets as tfds

from capjax.data import datasets
from capjax.data import locks
from capjax.data import records

FORMAT = 'capjax-features-1'  # Changes whenever the records change.
SHARD_SIZE = 1_024  # Images per shard: ~200 MB at 7x7x2048 in bfloat16.
DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


def weights_hash(tree: Any) -> str:
  """SHA-256 of a tree of arrays: paths, dtypes, shapes and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{leaf.dtype}{leaf.shape}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Decode:
  """Record bytes -> example. Picklable, for grain's worker processes."""
  shape: tuple[int, ...]
  dtype: str

  def __call__(self, record: bytes) -> dict[str, Any]:
    r = msgpack.unpackb(record)
    return {
        'features': np.frombuffer(r['features'], DTYPES[self.dtype]).reshape(
            self.shape),  # [h, w, C]
        'image/id': np.int64(r['id']),
        'captions': {'text': r['captions']},
    }


def encode_record(features: np.ndarray, image_id: int,
                  captions: Sequence[str]) -> bytes:
  return msgpack.packb({'features': np.ascontiguousarray(features).tobytes(),
                        'id': int(image_id), 'captions': list(captions)})


class Cache:
  """The features of one dataset under one encoder: a folder of splits."""

  def __init__(self, builder: tfds.core.DatasetBuilder,
               description: Mapping[str, Any]):
    """`description`: what determines the features (JSON-able), including
    `shape` [h, w, C] and `dtype`, the stored dtype."""
    if description['dtype'] not in DTYPES:
      raise ValueError(f'unknown feature dtype {description["dtype"]!r}')
    self.builder = builder
    self.description = dict(description)
    self.fingerprint = hashlib.sha256(json.dumps(
        self.description, sort_keys=True).encode()).hexdigest()
    # Not a version string, so TFDS never takes it for another version.
    self.folder = (f'{os.fspath(builder.data_dir)}-features-'
                   f'{self.fingerprint[:16]}')

  def lock(self):
    """Held while building: a second job building the same cache waits,
    then finds the splits done, instead of writing over them."""
    return locks.waiting(f'{self.folder}.lock', f'building {self.folder}')

  def others(self) -> list[str]:
    """The folders of this dataset's caches for other encoders."""
    parent, prefix = os.path.split(
        f'{os.fspath(self.builder.data_dir)}-features-')
    if not os.path.isdir(parent):
      return []
    folders = (os.path.join(parent, n) for n in os.listdir(parent)
               if n.startswith(prefix))
    return sorted(f for f in folders
                  if f != self.folder and os.path.isdir(f))

  def header(self, split: str) -> dict[str, Any]:
    return {'format': FORMAT, 'fingerprint': self.fingerprint,
            'description': self.description, 'split': split,
            'num_examples': datasets.num_examples(self.builder, split)}

  def missing(self, splits: Sequence[str]) -> list[str]:
    """The splits (names, not specs) without complete features."""
    return [s for s in dict.fromkeys(splits)
            if records.read_info(self.folder, s, self.header(s)) is None]

  def write(self, split: str,
            shard_records: Callable[[range], Iterable[bytes]],
            progress: records.Progress | None = None) -> dict[str, Any]:
    """Writes (or completes) `split`; see `records.write_split`."""
    header = self.header(split)
    return records.write_split(self.folder, split, header,
                               header['num_examples'], SHARD_SIZE,
                               shard_records, progress)

  def missing_shards(self, split: str) -> list[int]:
    """The shards `write` would make (of a split that is not complete)."""
    return records.missing_shards(self.folder, split,
                                  datasets.num_examples(self.builder, split),
                                  SHARD_SIZE, self.header(split))

  def damaged(self, splits: Sequence[str]) -> str | None:
    """What is wrong with the first complete split of `splits` whose
    shards are not as written, naming the shard; None if there is none."""
    for split in dict.fromkeys(splits):
      if damage := records.damaged(self.folder, split, self.header(split)):
        return damage
    return None

  def shard_indices(self, split: str, shard: int) -> range:
    return records.shard_indices(datasets.num_examples(self.builder, split),
                                 SHARD_SIZE, shard)

  def size_on_disk(self, splits: Sequence[str]) -> int:
    return sum(records.read_info(self.folder, s, self.header(s))['bytes']
               for s in dict.fromkeys(splits))

  def source(self, spec: str) -> records.SpecSource:
    """Random access to a split spec: {'features' [h, w, C], 'image/id',
    'captions': {'text'}} in TFDS's order."""
    names = datasets.split_names(spec)
    infos = {n: records.read_info(self.folder, n, self.header(n))
             for n in names}
    if absent := [n for n, info in infos.items() if info is None]:
      raise FileNotFoundError(f'{self.folder}: no complete features of '
                              f'{absent}')
    d = self.description
    return records.SpecSource(
        self.folder, spec, infos, _Decode(tuple(d['shape']), d['dtype']),
        remake='the next run with --config.data.prepare=True (or '
        '--mode=cache_features)')
