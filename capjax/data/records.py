"""Splits stored as sharded ArrayRecord files: written resumably, read with
random access in TFDS's order.

A store is one folder holding, for each split, shards
`<split>-NNNNN.array_record` and, once the split is complete,
`<split>.json`: a header (what the records are made from and how) and the
size of every shard. Each shard is written under a temporary name and
renamed when complete (`capjax.files`), so an interrupted build resumes at
the first missing shard, and the next build removes the temporary file a
killed one left; a split without its `.json`, with another header, or whose
shards are not the sizes it records, is never read. Two stores use it: the
resized copy of a dataset (`capjax.data.resized`) and the encoder's feature
cache (`capjax.data.feature_cache`).

Why not `tfds.core.DatasetBuilder`: a builder's splits are made in one
`download_and_prepare`, without resuming a half-written split, and its
version, not a header of our choosing, says what it holds.
"""

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
import contextlib
import json
import os
import time
import types
from typing import Any

from absl import logging
from array_record.python import array_record_module
import grain
import tensorflow_datasets as tfds

from capjax import files


def shard_path(folder: str, split: str, index: int) -> str:
  return os.path.join(folder, f'{split}-{index:05d}.array_record')


def _size(path: str) -> int | None:
  try:
    return os.path.getsize(path)
  except OSError:
    return None


def shard_indices(num_examples: int, shard_size: int,
                  shard: int) -> range:
  """The examples of shard `shard`."""
  return range(shard * shard_size, min((shard + 1) * shard_size,
                                       num_examples))


def missing_shards(folder: str, split: str, num_examples: int,
                   shard_size: int) -> list[int]:
  """The shards of `split` not written yet (all, for a complete split that
  `write_split` would make again)."""
  num_shards = -(-num_examples // shard_size)
  if os.path.exists(os.path.join(folder, f'{split}.json')):
    return list(range(num_shards))
  return [i for i in range(num_shards)
          if not os.path.exists(shard_path(folder, split, i))]


def read_info(folder: str, split: str,
              header: Mapping[str, Any]) -> dict[str, Any] | None:
  """The `.json` of a complete `split` made as `header` says, else None."""
  path = os.path.join(folder, f'{split}.json')
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  if {k: info.get(k) for k in header} != dict(header):
    logging.warning('%s was made from other data or in another format; the '
                    'split will be made again.', path)
    return None
  sizes = [_size(shard_path(folder, split, i))
           for i in range(len(info.get('shard_bytes', [])))]
  if not sizes or sizes != info['shard_bytes']:
    logging.warning('%s: shards of %s are missing or damaged; the split will '
                    'be made again.', folder, split)
    return None
  return info


class Progress:
  """Logs shards written, records per second and an ETA over a build."""

  def __init__(self, folder: str, total: int):
    self.folder, self.total = folder, total
    self.done = self.written = 0
    self.started = time.monotonic()

  def skipped(self, n: int) -> None:
    """`n` examples found written by an earlier build."""
    self.done += n

  def wrote(self, split: str, shard: int, num_shards: int, n: int) -> None:
    self.done += n
    self.written += n
    seconds = time.monotonic() - self.started
    logging.info('%s: %s shard %d of %d written; %d of %d examples, %.0f '
                 'examples/s, ETA %.0f s.', self.folder, split, shard + 1,
                 num_shards, self.done, self.total, self.written / seconds,
                 seconds / self.written * (self.total - self.done))


def write_split(folder: str, split: str, header: Mapping[str, Any],
                num_examples: int, shard_size: int,
                records: Callable[[range], Iterable[bytes]],
                progress: Progress | None = None) -> dict[str, Any]:
  """Writes (or completes) `split`: `records(indices)` -> one shard's records.

  Shards already written by an interrupted build are kept. Returns the
  split's info, also written to `<split>.json` (last, atomically).
  """
  with files.reporting(folder):
    os.makedirs(folder, exist_ok=True)
    # The shard a killed build was writing.
    files.remove_leftovers(folder)
    if os.path.exists(os.path.join(folder, f'{split}.json')):
      # Complete once but now damaged or stale: its shards are not reused.
      # (Temporary files are another writer's, or `remove_leftovers`'.)
      for name in os.listdir(folder):
        if ((name.startswith(f'{split}-') or name == f'{split}.json')
            and '.tmp-' not in name):
          os.remove(os.path.join(folder, name))
  num_shards = -(-num_examples // shard_size)
  for shard in range(num_shards):
    path = shard_path(folder, split, shard)
    indices = shard_indices(num_examples, shard_size, shard)
    if os.path.exists(path):  # Written by an earlier, interrupted build.
      if progress:
        progress.skipped(len(indices))
      continue
    with files.atomic_path(path) as tmp:
      writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
      try:
        for record in records(indices):
          writer.write(record)
      except BaseException:
        with contextlib.suppress(Exception):  # The first error is the one.
          writer.close()
        raise
      writer.close()
    if progress:
      progress.wrote(split, shard, num_shards, len(indices))
  shard_bytes = [os.path.getsize(shard_path(folder, split, i))
                 for i in range(num_shards)]
  info = dict(header, shards=num_shards, shard_bytes=shard_bytes,
              bytes=sum(shard_bytes))
  files.write_text(os.path.join(folder, f'{split}.json'),
                   json.dumps(info, indent=1))
  logging.info('%s: %s done, %d examples, %.3f GB (%.1f KB each).', folder,
               split, num_examples, info['bytes'] / 1e9,
               info['bytes'] / max(num_examples, 1) / 1e3)
  return info


class SpecSource(Sequence):
  """Random access to a TFDS split spec ('train+restval', 'train[:10%]')
  of a store, in TFDS's order: `source[i]` is `decode(record bytes)`.

  Picklable (with a picklable `decode`), for grain's worker processes.
  """

  def __init__(self, folder: str, spec: str,
               infos: Mapping[str, Mapping[str, Any]],
               decode: Callable[[bytes], Any]):
    self._decode = decode
    self._sources = {
        n: grain.sources.ArrayRecordDataSource(
            [shard_path(folder, n, i) for i in range(info['shards'])])
        for n, info in infos.items()}
    # TFDS's own arithmetic for the spec.
    sizes = {n: types.SimpleNamespace(num_examples=info['num_examples'],
                                      shard_lengths=[info['num_examples']])
             for n, info in infos.items()}
    self._starts = []  # Where each range begins in this source.
    self._ranges = []  # (split, first index in it)
    length = 0
    for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes):
      first = part.from_ or 0
      last = sizes[part.splitname].num_examples if part.to is None else part.to
      self._starts.append(length)
      self._ranges.append((part.splitname, first))
      length += last - first
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self._length:
      raise IndexError(index)
    which = bisect.bisect_right(self._starts, index) - 1
    split, first = self._ranges[which]
    return self._decode(
        self._sources[split][first + index - self._starts[which]])
