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

A shard whose bytes change after it is written (same size: a write into it,
a bad copy, a failing disk) fails riegeli's hash check only when a damaged
record is read, as a long traceback that does not name the file. Reading
every shard through at every open would find it first, but costs (measured
at 1 to 2 GB/s from the page cache on one CPU core) 3 to 6 s for COCO's copy
at 224 px (6.3 GB) and 12 to 25 s for its 7x7 feature cache (25 GB), per
job, and minutes from a cold disk. So the `.json` also records each shard's
modification time, and opening a split stats its shards (about a
microsecond each): only a shard whose time changed is read through, so
that a damaged one is named before the job starts and, where the job may
prepare data, made again alone. A shard that reads back intact (a copy that
did not keep the times) gets its recorded time back, to be read through
once, not by every job. A change that keeps the time is caught where the
record is read (`SpecSource`), as one `UserError` naming the shard.
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
from capjax.errors import UserError


def shard_path(folder: str, split: str, index: int) -> str:
  return os.path.join(folder, f'{split}-{index:05d}.array_record')


# Records read at a time when a shard is read through: a few MB.
_CHECK_BATCH = 64

# (path, size, mtime_ns) -> what reading it through found ('' if nothing):
# a split's shards are looked at by several calls of one job.
_checked: dict[tuple[str, int, int], str] = {}
_warned: set[str] = set()


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _read_through(path: str, stat: os.stat_result) -> str:
  """'' if every record of the shard reads back, else what is wrong.

  Riegeli checks the hash of every chunk it reads, so a record that reads
  back is the record written.
  """
  key = (path, stat.st_size, stat.st_mtime_ns)
  if key not in _checked:
    try:
      reader = array_record_module.ArrayRecordReader(
          path, 'readahead_buffer_size:0')
      try:
        n = reader.num_records()
        for start in range(0, n, _CHECK_BATCH):
          reader.read(list(range(start, min(start + _CHECK_BATCH, n))))
      finally:
        reader.close()
    except (RuntimeError, ValueError, OSError) as e:
      _checked[key] = _one_line(e)
    else:
      _checked[key] = ''
  return _checked[key]


def _damage(folder: str, split: str, info: Mapping[str, Any]) -> dict[int, str]:
  """Shard -> what is wrong with it, for the shards of the split `info`
  describes that are not as written: missing, of another size, or changed
  since (by their time) and not reading back."""
  damage = {}
  mtimes = info.get('shard_mtimes')  # None in a .json of an older capjax.
  for i, size in enumerate(info['shard_bytes']):
    path = shard_path(folder, split, i)
    try:
      stat = os.stat(path)
    except OSError:
      damage[i] = 'is missing'
      continue
    if stat.st_size != size:
      damage[i] = f'is {stat.st_size} bytes, not the {size} written'
    elif mtimes and stat.st_mtime_ns != mtimes[i]:
      if problem := _read_through(path, stat):
        damage[i] = f'changed after it was written ({problem})'
      else:
        # Owned by another user, or a read-only data dir: then it is read
        # through by every job.
        with contextlib.suppress(OSError):
          os.utime(path, ns=(stat.st_atime_ns, mtimes[i]))
  return damage


def _complete(folder: str, split: str,
              header: Mapping[str, Any]) -> dict[str, Any] | None:
  """The `.json` of `split` if it is there, made as `header` says."""
  try:
    with open(os.path.join(folder, f'{split}.json')) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  if {k: info.get(k) for k in header} != dict(header):
    return None
  return info


def shard_indices(num_examples: int, shard_size: int,
                  shard: int) -> range:
  """The examples of shard `shard`."""
  return range(shard * shard_size, min((shard + 1) * shard_size,
                                       num_examples))


def _remake(folder: str, split: str, header: Mapping[str, Any],
            shard_size: int) -> list[int] | None:
  """The damaged shards of a complete split made as `header` says, in
  shards of `shard_size`; None where there is no such split."""
  info = _complete(folder, split, header)
  if info is None or info.get('shard_size') != shard_size:
    return None
  return sorted(_damage(folder, split, info))


def missing_shards(folder: str, split: str, num_examples: int,
                   shard_size: int, header: Mapping[str, Any]) -> list[int]:
  """The shards of `split` that `write_split` would write: those not written
  yet, or the damaged ones of a complete split (all, for one made otherwise
  or by an older capjax)."""
  num_shards = -(-num_examples // shard_size)
  if os.path.exists(os.path.join(folder, f'{split}.json')):
    remake = _remake(folder, split, header, shard_size)
    return list(range(num_shards)) if remake is None else remake
  return [i for i in range(num_shards)
          if not os.path.exists(shard_path(folder, split, i))]


def read_info(folder: str, split: str,
              header: Mapping[str, Any]) -> dict[str, Any] | None:
  """The `.json` of a complete `split` made as `header` says whose shards
  are as written, else None."""
  info = _complete(folder, split, header)
  if info is None:
    path = os.path.join(folder, f'{split}.json')
    if os.path.exists(path):
      logging.warning('%s was made from other data or in another format; the '
                      'split will be made again.', path)
    return None
  if not info.get('shard_bytes') or _describe(folder, split, info):
    return None
  return info


def damaged(folder: str, split: str, header: Mapping[str, Any]) -> str | None:
  """What is wrong with a complete `split` made as `header` says, naming
  its first damaged shard; None where it is intact or not complete.

  E.g. '.../train-00003.array_record changed after it was written (Corrupted
  Riegeli/records file: ...)'.
  """
  info = _complete(folder, split, header)
  return None if info is None else _describe(folder, split, info)


def _describe(folder: str, split: str,
              info: Mapping[str, Any]) -> str | None:
  """`damaged` of the split `info` describes; logged once per process."""
  if not (damage := _damage(folder, split, info)):
    return None
  shard, problem = min(damage.items())
  more = (f' (and {len(damage) - 1} more of its shards)'
          if len(damage) > 1 else '')
  message = f'{shard_path(folder, split, shard)} {problem}{more}'
  if message not in _warned:  # A job looks at a split several times.
    _warned.add(message)
    logging.warning('%s.', message)
  return message


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
    # Complete once, as `header` says, with damaged shards: only those are
    # made again. The `.json` goes after them, so that a build killed here
    # does not leave a damaged shard in what the next one resumes.
    if (remake := _remake(folder, split, header, shard_size)) is not None:
      for shard in remake:
        with contextlib.suppress(FileNotFoundError):
          os.remove(shard_path(folder, split, shard))
      os.remove(os.path.join(folder, f'{split}.json'))
    if os.path.exists(os.path.join(folder, f'{split}.json')):
      # Complete once but made otherwise, in shards of another size, or by
      # an older capjax (which did not record it): no shard is reused.
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
  stats = [os.stat(shard_path(folder, split, i)) for i in range(num_shards)]
  shard_bytes = [stat.st_size for stat in stats]
  info = dict(header, shards=num_shards, shard_size=shard_size,
              shard_bytes=shard_bytes, bytes=sum(shard_bytes),
              shard_mtimes=[stat.st_mtime_ns for stat in stats])
  files.write_text(os.path.join(folder, f'{split}.json'),
                   json.dumps(info, indent=1))
  logging.info('%s: %s done, %d examples, %.3f GB (%.1f KB each).', folder,
               split, num_examples, info['bytes'] / 1e9,
               info['bytes'] / max(num_examples, 1) / 1e3)
  return info


class SpecSource(Sequence):
  """Random access to a TFDS split spec ('train+restval', 'train[:10%]')
  of a store, in TFDS's order: `source[i]` is `decode(record bytes)`.

  Picklable (with a picklable `decode`), for grain's worker processes. A
  shard that cannot be read is a `UserError` naming it, where `remake` says
  how to make it again ('--mode=prepare').
  """

  def __init__(self, folder: str, spec: str,
               infos: Mapping[str, Mapping[str, Any]],
               decode: Callable[[bytes], Any], remake: str):
    self._decode = decode
    self._remake = remake
    self._paths = {n: [shard_path(folder, n, i) for i in range(info['shards'])]
                   for n, info in infos.items()}
    self._sources = {}
    for n, paths in self._paths.items():
      try:  # Reads the index at the end of every shard.
        self._sources[n] = grain.sources.ArrayRecordDataSource(paths)
      except (RuntimeError, ValueError, OSError) as e:
        raise self._damaged(n, None, e) from None
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
    index = first + index - self._starts[which]
    try:
      record = self._sources[split][index]
    except (RuntimeError, OSError) as e:  # riegeli's are RuntimeErrors.
      raise self._damaged(split, index, e) from None
    return self._decode(record)

  def _damaged(self, split: str, index: int | None,
               error: Exception) -> UserError:
    """The error for record `index` of `split` (None: opening it)."""
    path = self._paths[split][-1]
    for shard in self._paths[split]:
      try:  # Cheap: the index at the end of the file.
        reader = array_record_module.ArrayRecordReader(shard)
        records = reader.num_records()
        reader.close()
      except (RuntimeError, ValueError, OSError):
        path = shard
        break
      if index is not None and index < records:
        path = shard
        break
      if index is not None:
        index -= records
    return UserError(
        f'{path} is damaged ({_one_line(error)}): its bytes changed after '
        f'it was written. Delete it; {self._remake} makes it again')
