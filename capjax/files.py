"""Writing files safely: whole or not at all, and a failed write as one line.

Every file capjax writes (config.json, vocab.json, the dataset's copy and
feature cache, decode results, reports, the tuner's results) is written
under a temporary name beside its target, `<name>.tmp-<host>-<pid>`, and
renamed when complete: a reader never sees half a file, and two processes
never share a temporary file. A write that fails removes its temporary
file; one killed before it could (SIGKILL, a lost node) is removed by
`remove_leftovers` at the next start that writes the folder.

A write that fails for a reason the user can fix raises `WriteError`, a
`UserError` of one line naming the folder, the space it needs (when known)
and the space free: a full disk or quota, a read-only file system, no
permission, a missing folder, or a directory where a file should be.
Writers in C++ (ArrayRecord, tensorstore) report the OS's error as text in
a RuntimeError or ValueError; those are recognised by the text.
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import IO

from capjax.errors import UserError

# How the OS says why a write failed, by what the user can do about it.
# (EEXIST: os.makedirs finding a file where a folder should be.)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_KINDS = {errno.ENOSPC: 'full', errno.EDQUOT: 'full',
          errno.EROFS: 'read-only', errno.EACCES: 'permission',
          errno.EPERM: 'permission', errno.ENOENT: 'missing',
          errno.ENOTDIR: 'missing', errno.EEXIST: 'missing',
          errno.EISDIR: 'directory'}
# The texts C++ writers pass on. Only those that cannot come from reading:
# a "No such file" or "Permission denied" may be about an input file.
_DISK_FULL_TEXTS = tuple(os.strerror(e) for e in _DISK_FULL_ERRNOS)
_TEXTS = {os.strerror(errno.ENOSPC): 'full', os.strerror(errno.EDQUOT): 'full',
          os.strerror(errno.EROFS): 'read-only'}

_LEFTOVER = re.compile(r'\.tmp-(?:(?P<host>[A-Za-z0-9_.-]+)-)?(?P<pid>\d+)$')
# A leftover of another host is removed only once it is this old: whether
# its process still runs cannot be known from here.
FOREIGN_LEFTOVER_SECONDS = 24 * 3600


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def human_bytes(size: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if size < 1024 or unit == 'TiB':
      break
    size /= 1024
  return f'{size:.0f} B' if unit == 'B' else f'{size:.1f} {unit}'


def _existing(folder: str) -> str:
  """`folder`, or its nearest ancestor that exists."""
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  return folder


def _free(folder: str) -> str:
  try:
    return human_bytes(shutil.disk_usage(_existing(folder)).free)
  except OSError:  # A remote file system.
    return 'an unknown amount'


def _writable(folder: str) -> bool:
  # os.access sees a read-only file system even for root, whom permission
  # bits never stop.
  return os.access(_existing(folder), os.W_OK | os.X_OK)


def _file_in_the_way(folder: str) -> str | None:
  """The file that stands where `folder` or a folder above it should be."""
  while os.path.dirname(folder) != folder:
    if os.path.lexists(folder) and not os.path.isdir(folder):
      return folder
    folder = os.path.dirname(folder)
  return None


def _read_only(folder: str) -> bool:
  try:
    return bool(os.statvfs(_existing(folder)).f_flag & os.ST_RDONLY)
  except OSError:
    return False


class WriteError(UserError):
  """A write that failed for a reason the user can fix, as one line."""

  def __init__(self, kind: str, folder: str, what: str, *,
               path: str | None = None, needs: int | None = None,
               instead: str | None = None):
    self.kind, self.folder, self.what = kind, folder, what
    self.path, self.needs, self.instead = path, needs, instead
    super().__init__(self._message())

  def _message(self) -> str:
    if self.kind == 'full':
      space = f'{_free(self.folder)} are free'
      if self.needs:
        space = f'it needs about {human_bytes(self.needs)} and {space}'
      text = (f'no space left for {self.what} in {self.folder}: {space}. '
              'Free some space there, then run again')
    elif self.kind == 'read-only':
      text = (f'cannot write {self.what} in {self.folder}: the file system '
              'is read-only. Choose a writable folder')
    elif self.kind == 'permission':
      text = (f'cannot write {self.what} in {self.folder}: permission '
              'denied. Choose a folder you may write')
    elif self.kind == 'missing':
      blocker = _file_in_the_way(self.folder)
      text = (f'cannot write {self.what}: {blocker} is a file, not a folder. '
              'Choose another path' if blocker else
              f'cannot write {self.what}: the folder {self.folder} does not '
              'exist. Create it, or choose another')
    else:
      text = (f'cannot write {self.what}: {self.path or self.folder} is a '
              'directory. Give a file name')
    return f'{text}, or {self.instead}' if self.instead else text

  def within(self, what: str | None, instead: str | None) -> 'WriteError':
    """The same failure, told as the write of `what`, the caller's name."""
    return WriteError(self.kind, self.folder, what or self.what,
                      path=self.path, needs=self.needs,
                      instead=instead or self.instead)


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _related(filename, folder: str) -> bool:
  """Whether an error about `filename` is about writing in `folder`: a file
  under it, or one in a folder above it (making it, or a lock beside it)."""
  if filename is None:
    return True
  filename = os.path.abspath(os.fsdecode(filename))
  return (_inside(filename, folder)
          or _inside(folder, os.path.dirname(filename)))


def _kind(error: BaseException, folder: str, path: str | None) -> str | None:
  """What the user can fix about a failed write in `folder`, else None.

  Each diagnosis is checked against the disk (the folder is missing, not
  writable, the path a directory), so an error about an input file read
  meanwhile is never taken for one about the output.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    kind = None
    if isinstance(error, OSError) and error.errno in _KINDS:
      if _related(error.filename, folder):
        kind = _KINDS[error.errno]
    else:
      kind = next((k for text, k in _TEXTS.items() if text in str(error)),
                  None)
    if kind == 'full':
      return kind
    if kind in ('read-only', 'permission') and not _writable(folder):
      return 'read-only' if _read_only(folder) else 'permission'
    if kind == 'missing' and not os.path.isdir(folder):
      return kind
    if kind == 'directory' and path and os.path.isdir(path):
      return kind
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def reporting(folder: str, what: str | None = None, *,
              needs: int | None = None,
              instead: str | None = None) -> Iterator[None]:
  """Raises a failed write in `folder` as one line (`WriteError`).

  Args:
    folder: where the writes go.
    what: what is written, as the user knows it ('the copy at 224 px').
    needs: the bytes the writes need, when known.
    instead: what the user may do instead, after "or" ('read the originals
      with --config.data.resized_copy=False').

  A `WriteError` from a write inside `folder` is told again with `what`
  and `instead`. Other errors pass as they are.
  """
  folder = os.path.abspath(os.fspath(folder))
  try:
    yield
  except WriteError as e:
    if (what is None and instead is None) or not _inside(e.folder, folder):
      raise
    raise e.within(what, instead) from None
  except Exception as e:  # pylint: disable=broad-except
    kind = _kind(e, folder, None)
    if kind is None:
      raise
    raise WriteError(kind, folder, what or 'files', needs=needs,
                     instead=instead) from None


def _temporary(path: str) -> str:
  return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


@contextlib.contextmanager
def atomic_path(path: str, *, what: str | None = None,
                needs: int | None = None, instead: str | None = None,
                exclusive: bool = False) -> Iterator[str]:
  """Yields a temporary path beside `path` to write; renames it to `path`
  when the block ends, and removes it if the block fails.

  For writers that take a path (ArrayRecord, plotly, matplotlib). With
  `exclusive`, an existing `path` is never replaced: FileExistsError. The
  other arguments are `reporting`'s; `what` defaults to the file's name.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  tmp = _temporary(path)
  try:
    with reporting(folder, what or os.path.basename(path), needs=needs,
                   instead=instead):
      try:
        yield tmp
        if exclusive:
          os.link(tmp, path)  # Atomic, and fails if `path` appeared meanwhile.
        else:
          os.replace(tmp, path)
      except Exception as e:  # pylint: disable=broad-except
        # What is at `path` says more than the temporary's name does.
        if _kind(e, folder, path) == 'directory':
          raise WriteError('directory', folder,
                           what or os.path.basename(path), path=path,
                           instead=instead) from None
        raise
  finally:
    with contextlib.suppress(OSError):  # Never there, or renamed.
      os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', *, encoding: str | None = None,
                 what: str | None = None, needs: int | None = None,
                 instead: str | None = None,
                 exclusive: bool = False) -> Iterator[IO]:
  """`open(path, mode)`, written whole or not at all: see `atomic_path`."""
  if mode not in ('w', 'wb'):
    raise ValueError(f'atomic_write writes a new file: mode "w" or "wb", not '
                     f'{mode!r}')
  if encoding is None and mode == 'w':
    encoding = 'utf-8'
  with atomic_path(path, what=what, needs=needs, instead=instead,
                   exclusive=exclusive) as tmp:
    with open(tmp, mode, encoding=encoding) as f:
      yield f


def write_text(path: str, text: str, *, what: str | None = None,
               instead: str | None = None, exclusive: bool = False) -> None:
  """Writes `text` (UTF-8) to `path` whole; see `atomic_path`."""
  data = text.encode('utf-8')
  with atomic_write(path, 'wb', what=what, needs=len(data), instead=instead,
                    exclusive=exclusive) as f:
    f.write(data)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def remove_leftovers(folder: str) -> list[str]:
  """Removes the temporary files that killed writers left in `folder`;
  returns their names.

  A temporary file of this host whose process has ended is removed; one of
  another host (a folder shared by a cluster) once it is a day old.
  Temporaries of older capjax versions name no host, and count as
  another host's.
  """
  try:
    names = os.listdir(folder)
  except OSError:  # Not made yet.
    return []
  host, removed = socket.gethostname(), []
  for name in names:
    match = _LEFTOVER.search(name)
    if not match:
      continue
    path = os.path.join(folder, name)
    if match['host'] == host:
      pid = int(match['pid'])
      if pid == os.getpid() or _alive(pid):
        continue
    else:
      try:
        if time.time() - os.path.getmtime(path) < FOREIGN_LEFTOVER_SECONDS:
          continue
      except OSError:
        continue
    try:
      os.remove(path)
    except OSError:  # Removed by another process meanwhile, or read-only.
      continue
    removed.append(name)
  return removed


def check_output(path: str, what: str) -> None:
  """Makes the folder of `path`, a file a tool writes at the end of its
  work, and raises now the `WriteError` that writing `path` would raise
  then: a wrong path is one line before the work, not a traceback after it.
  """
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  if os.path.isdir(path):
    raise WriteError('directory', folder, what, path=path)
  with reporting(folder, what):
    os.makedirs(folder, exist_ok=True)
  if not _writable(folder):
    raise WriteError('read-only' if _read_only(folder) else 'permission',
                     folder, what)
