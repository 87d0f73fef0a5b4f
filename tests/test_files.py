"""Writing files safely (capjax.files): whole or not at all, a failed write
as one line, and no temporary file left behind."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from capjax import files
from capjax.errors import UserError
from conftest import REPO, in_a_tmpfs


def _temporaries(folder):
  return [n for n in os.listdir(folder) if '.tmp-' in n]


def test_a_write_is_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'results.json'
  files.write_text(path, 'first')
  files.write_text(path, 'second')
  assert path.read_text() == 'second'
  for error in (ValueError('while writing'), KeyboardInterrupt()):
    with pytest.raises(type(error)):
      with files.atomic_write(path) as f:
        f.write('half')
        raise error
    assert path.read_text() == 'second'
  # A writer that takes a path writes beside the target, under a name of
  # its own process.
  with files.atomic_path(path) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path)
    assert tmp.endswith(f'.tmp-{socket.gethostname()}-{os.getpid()}')
    with open(tmp, 'w') as f:
      f.write('third')
  assert path.read_text() == 'third'
  with pytest.raises(FileExistsError):
    files.write_text(path, 'never', exclusive=True)
  assert path.read_text() == 'third'
  assert os.listdir(tmp_path) == ['results.json']


_WRITE = '''
import json, os, sys
from capjax import files
from capjax.errors import UserError
folder, size = sys.argv[1], int(sys.argv[2])
message = None
try:
  files.write_text(os.path.join(folder, 'big.txt'), 'x' * size)
except UserError as e:
  message = str(e)
print(json.dumps({'message': message, 'listing': os.listdir(folder)}))
'''


def _write_in_a_tmpfs(tmp_path, num_bytes, **kwargs):
  mount_point = tmp_path / 'mnt'
  proc = in_a_tmpfs(mount_point, sys.executable, '-c', _WRITE, mount_point,
                    num_bytes, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return mount_point, json.loads(proc.stdout.splitlines()[-1])


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space(tmp_path):
  mount_point, result = _write_in_a_tmpfs(tmp_path, 2**20, size='64k')
  assert re.fullmatch(
      f'no space left for big.txt in {re.escape(str(mount_point))}: it needs '
      r'about 1\.0 MiB and [0-9.]+ (B|KiB) are free\. Free some space there, '
      'then run again', result['message']), result['message']
  assert result['listing'] == []  # Its temporary file is gone.


def test_a_read_only_folder_is_one_line(tmp_path):
  mount_point, result = _write_in_a_tmpfs(tmp_path, 10, read_only=True)
  assert result['message'] == (
      f'cannot write big.txt in {mount_point}: the file system is read-only. '
      'Choose a writable folder')


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_the_os_saying_no_space_is_one_line(tmp_path, monkeypatch, code):
  def full(src, dst):
    raise OSError(code, os.strerror(code), src)

  monkeypatch.setattr(os, 'replace', full)
  with pytest.raises(UserError, match=(
      f'^no space left for config.json in {re.escape(str(tmp_path))}: it '
      r'needs about 5 B and .* are free\. Free some space there, then run '
      'again$')):
    files.write_text(tmp_path / 'config.json', 'hello')
  assert not _temporaries(tmp_path)


def test_a_writer_in_cpp_saying_so_in_its_text(tmp_path):
  """ArrayRecord and tensorstore raise the OS's error as text."""
  with pytest.raises(UserError, match=(
      '^no space left for the copy at 32 px in .*: .* are free. Free some '
      'space there, then run again, or read the originals$')):
    with files.reporting(tmp_path, 'the copy at 32 px',
                         instead='read the originals'):
      with files.atomic_path(tmp_path / 'train-00000.array_record'):
        raise RuntimeError(
            f'write() failed: No space left on device; writing {tmp_path}/'
            'train-00000.array_record; at byte 1048576')
  assert not _temporaries(tmp_path)


def test_bad_paths_are_one_line(tmp_path):
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'file').write_text('')
  cases = {
      tmp_path / 'missing' / 'a.json':
          f'cannot write a.json: the folder {tmp_path}/missing does not '
          'exist. Create it, or choose another',
      tmp_path / 'folder':
          f'cannot write folder: {tmp_path}/folder is a directory. Give a '
          'file name',
      tmp_path / 'file' / 'a.json':
          f'cannot write a.json: {tmp_path}/file is a file, not a folder. '
          'Choose another path',
  }
  for path, message in cases.items():
    with pytest.raises(files.WriteError) as raised:
      files.write_text(path, '{}')
    assert str(raised.value) == message
  assert sorted(os.listdir(tmp_path)) == ['file', 'folder']
  # The output of a tool, checked before its work: the same line, but its
  # missing folder is made.
  for path in list(cases)[1:]:
    with pytest.raises(files.WriteError) as raised:
      files.check_output(path, os.path.basename(path))
    assert str(raised.value) == cases[path]
  files.check_output(tmp_path / 'missing' / 'a.json', 'a.json')
  assert sorted(os.listdir(tmp_path)) == ['file', 'folder', 'missing']


_CHECK = """
import sys
from capjax import files
try:
  files.check_output(sys.argv[1], '--html=' + sys.argv[1])
except files.WriteError as e:
  print(e)
"""


def test_an_output_in_a_read_only_folder_is_told_first(tmp_path):
  mount_point = tmp_path / 'mnt'
  proc = in_a_tmpfs(mount_point, sys.executable, '-c', _CHECK,
                    mount_point / 'new' / 'report.html', read_only=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == (
      f'cannot write --html={mount_point}/new/report.html in {mount_point}/'
      'new: the file system is read-only. Choose a writable folder')


def test_an_error_about_another_file_passes_as_it_is(tmp_path):
  """A file read while writing (an image of the dataset) that is missing is
  not taken for a missing output folder."""
  with pytest.raises(FileNotFoundError):
    with files.atomic_write(tmp_path / 'out.json') as f:
      f.write('{}')
      # pylint: disable-next=consider-using-with
      open(tmp_path / 'input.jpg', 'rb')
  with pytest.raises(FileNotFoundError):
    with files.reporting(tmp_path / 'out'):
      # pylint: disable-next=consider-using-with
      open('/nonexistent/images/1.jpg', 'rb')
  assert not os.listdir(tmp_path)


def test_the_leftover_of_a_killed_writer_goes_at_the_next_start(tmp_path):
  path = tmp_path / 'train-00000.array_record'
  writer = subprocess.Popen(
      [sys.executable, '-c',
       'import sys, time\nfrom capjax import files\n'
       'with files.atomic_write(sys.argv[1]) as f:\n'
       '  f.write("half"); f.flush(); print("writing", flush=True)\n'
       '  time.sleep(300)\n', path],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert writer.stdout.readline() == 'writing\n'
  # Another process's temporary file is never taken while it writes.
  assert files.remove_leftovers(tmp_path) == []
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  leftover = f'{path.name}.tmp-{socket.gethostname()}-{writer.pid}'
  assert _temporaries(tmp_path) == [leftover]
  # Another host's, and an older capjax's, only once they are a day old.
  recent, old = 'a.json.tmp-otherhost-12', 'b.json.tmp-13'
  for name in (recent, old):
    (tmp_path / name).write_text('')
  day = time.time() - files.FOREIGN_LEFTOVER_SECONDS - 60
  os.utime(tmp_path / old, (day, day))
  assert sorted(files.remove_leftovers(tmp_path)) == [old, leftover]
  assert os.listdir(tmp_path) == [recent]


def test_human_bytes():
  assert [files.human_bytes(n) for n in (0, 1023, 1536, 3 * 2**29)] == [
      '0 B', '1023 B', '1.5 KiB', '1.5 GiB']
