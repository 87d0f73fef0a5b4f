"""Jobs started from a process that has already imported capjax's libraries.

A capjax job spends about 5 s of CPU importing TensorFlow (through clu's
writers and TFDS), JAX, flax, orbax and grain before it reads a flag, and
the suite starts dozens of them. `Popen` and `run` here take the arguments
of `subprocess.Popen` and `subprocess.run`. A command `python -m capjax.X`
or `python -c CODE` is forked from a preloaded process (one per xdist
worker, started at its first job) instead of starting a new interpreter:
the job is a process of its own, with its own pid, stdio, working
directory, environment, session and exit status, that runs the module as
`__main__` and ends through the interpreter's own shutdown (atexit,
non-daemon threads), as `python -m` does. The preloaded process has only
imported modules: no JAX backend, no flags parsed, nothing compiled.

What a fork cannot show stays a new interpreter:
- the tests of start-up (what a command imports, and when) call
  `subprocess` itself, and so does the README's main command in
  tests/test_main.py;
- any other command (bash, java, `python -X ...`), a job in another folder,
  and one whose environment differs from the preloaded process's in what a
  library reads at import (HF_HUB_CACHE, TMPDIR, ...) go to `subprocess`
  unchanged.
`CAPJAX_TESTS_NEW_INTERPRETERS=1` sends every job there.

`multiprocessing`'s forkserver preloads modules too, but its children run a
function, not a module as `__main__`, take no stdio of the caller's, and
leave through `os._exit`, without the interpreter's shutdown.
"""

import atexit
import gc
import importlib
import inspect
import json
import os
import runpy
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The preloaded process's environment: this one's as the tests start (not
# as a test may have changed it when the first job starts).
_ENV = dict(os.environ)

# What capjax's jobs import, less the commands themselves (main, tune,
# caption, benchmark, score), which define their flags as they run as
# `__main__`.
PRELOAD = ('capjax.train', 'capjax.evaluate', 'capjax.cli', 'capjax.distributed',
           'clu.metric_writers', 'clu.periodic_actions', 'tensorflow_datasets',
           'grain', 'orbax.checkpoint', 'optax', 'flax.linen', 'absl.app',
           'ml_collections.config_flags')

# What a job reads from its environment only as it runs, not at import:
# XLA its flags (when JAX makes its first backend), capjax its own variables.
# pytest sets the first for each test; PYTHONPATH is applied to the job's
# `sys.path` as Python would. A job whose environment differs in anything
# else is a new interpreter.
_READ_LATE = frozenset({'PYTEST_CURRENT_TEST', 'XLA_FLAGS', 'PYTHONPATH'})


def _significant(env) -> dict:
  return {k: v for k, v in env.items()
          if k not in _READ_LATE and not k.startswith('CAPJAX_')}


# Set (to anything) in the tests' environment: every job in a new
# interpreter, as before tests/preload.py, to rule it out.
NO_PRELOAD = 'CAPJAX_TESTS_NEW_INTERPRETERS'

_HEADER = struct.Struct('!I')
_STATUS = struct.Struct('!i')


def _command_forks(args, kwargs) -> bool:
  """Whether the command is `python -m capjax.X ...` or `python -c CODE`,
  started from the repository with no more than stdio, an environment and
  a session of its own (no shell, preexec_fn, pass_fds, ...)."""
  if not isinstance(args, (list, tuple)) or len(args) < 3:
    return False
  if args[0] != sys.executable or not (
      (args[1] == '-m' and str(args[2]).startswith('capjax.'))
      or args[1] == '-c'):
    return False
  allowed = {'cwd', 'env', 'stdin', 'stdout', 'stderr', 'text',
             'start_new_session', 'universal_newlines', 'encoding', 'errors'}
  cwd = kwargs.get('cwd') or os.getcwd()
  return not set(kwargs) - allowed and (
      os.path.realpath(cwd) == os.path.realpath(REPO))


class _Server:
  """The preloaded process, a child of this one, and the socket to it."""

  def __init__(self):
    self._sock, theirs = socket.socketpair()
    self._lock = threading.Lock()
    log = tempfile.TemporaryFile()  # Its imports' warnings; jobs have theirs.
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
        cwd=REPO, env=_ENV, pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    theirs.close()
    reply = _read_message(self._sock)
    if reply is None:
      self.proc.wait()
      log.seek(0)
      raise RuntimeError('the preloaded process failed to start:\n'
                         + log.read().decode(errors='replace')[-3000:])
    # What its imports set in its environment (TensorFlow sets TF2_BEHAVIOR,
    # for one), as they would in a new interpreter's.
    self.set_by_imports = {k: v for k, v in reply.items() if _ENV.get(k) != v}
    self._preloaded = _significant({**_ENV, **self.set_by_imports})
    atexit.register(self.close)

  def environment(self, env) -> dict | None:
    """The environment a new interpreter started with `env` would have once
    it imported the preloaded modules; None where it would differ from this
    process's in what a library reads at import."""
    env = {**self.set_by_imports, **env}
    return env if _significant(env) == self._preloaded else None

  def start(self, request: dict, fds: list[int]) -> int:
    """Sends a job's request and its stdin, stdout, stderr and status pipe;
    returns the job's pid."""
    with self._lock:
      socket.send_fds(self._sock, [_message(request)], fds)
      pid = self._sock.recv(_STATUS.size)
    if len(pid) != _STATUS.size:
      raise RuntimeError('the preloaded process is gone')
    return _STATUS.unpack(pid)[0]

  def close(self):
    self._sock.close()  # It ends; its jobs go on, as a child's would.
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def _message(value) -> bytes:
  body = json.dumps(value).encode()
  return _HEADER.pack(len(body)) + body


def _read_message(sock, data: bytes = b''):
  """The value of the `_message` that `data` begins, read to its end from
  `sock`; None if the socket closes first."""
  while len(data) < _HEADER.size or (
      len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]):
    more = sock.recv(1 << 16)
    if not more:
      return None
    data += more
  return json.loads(data[_HEADER.size:])


_server = None
_server_lock = threading.Lock()


def _the_server() -> _Server:
  global _server
  with _server_lock:
    if _server is None:
      _server = _Server()
    return _server


def forks(args, **kwargs) -> bool:
  """Whether `Popen(args, **kwargs)` forks the job from the preloaded
  process (and starts that process if it has not)."""
  if os.environ.get(NO_PRELOAD):
    return False
  return _command_forks(args, kwargs) and _the_server().environment(
      os.environ if kwargs.get('env') is None else kwargs['env']) is not None


_EXECUTE_CHILD = inspect.signature(subprocess.Popen._execute_child)  # pylint: disable=protected-access


class _Forked(subprocess.Popen):
  """A `subprocess.Popen` whose child the preloaded process forks: its exit
  status comes through a pipe from that process, which reaps it."""

  def _execute_child(self, *args):
    given = _EXECUTE_CHILD.bind(self, *args).arguments
    server = _the_server()
    env = server.environment(
        os.environ if given['env'] is None else given['env'])
    # Where the caller gave no stream, the job has this process's, as a
    # child would.
    stdio = [given[name] if given[name] != -1 else default
             for default, name in enumerate(('p2cread', 'c2pwrite',
                                             'errwrite'))]
    self._status, status_w = os.pipe()
    try:
      self.pid = server.start(
          dict(argv=[str(a) for a in given['args'][1:]], env=env, cwd=REPO,
               start_new_session=given['start_new_session']),
          [*stdio, status_w])
    finally:
      os.close(status_w)
    self._child_created = True
    self._close_pipe_fds(*(given[name] for name in (
        'p2cread', 'p2cwrite', 'c2pread', 'c2pwrite', 'errread', 'errwrite')))

  def _status_of(self, pid, flags):
    """`os.waitpid` for the forked child, read from its status pipe."""
    assert pid == self.pid
    if flags & os.WNOHANG and not select.select([self._status], [], [], 0)[0]:
      return 0, 0
    data = os.read(self._status, _STATUS.size)
    os.close(self._status)
    if len(data) != _STATUS.size:
      raise RuntimeError(f'the preloaded process that started {pid} is gone')
    return pid, _STATUS.unpack(data)[0]

  def _try_wait(self, wait_flags):
    return self._status_of(self.pid, wait_flags)

  def _internal_poll(self, _deadstate=None, _waitpid=None, **kwargs):
    del _waitpid
    return super()._internal_poll(_deadstate, _waitpid=self._status_of,
                                  **kwargs)


def Popen(args, **kwargs) -> subprocess.Popen:  # pylint: disable=invalid-name
  """`subprocess.Popen`, forked from a preloaded process where it can be."""
  cls = _Forked if forks(args, **kwargs) else subprocess.Popen
  return cls(args, **kwargs)


def run(args, *, input=None, timeout=None, check=False,  # pylint: disable=redefined-builtin
        capture_output=False, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run`, forked from a preloaded process where it can be."""
  if capture_output:
    kwargs['stdout'] = kwargs['stderr'] = subprocess.PIPE
  if input is not None:
    kwargs['stdin'] = subprocess.PIPE
  with Popen(args, **kwargs) as proc:
    try:
      out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
      proc.kill()
      proc.wait()
      raise
  result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
  if check:
    result.check_returncode()
  return result


# ------------------------------------------------- the preloaded process

def _serve(sock: socket.socket) -> dict:
  """Forks a job for each request; reaps them and sends each one's status.
  Returns only in a forked job, with its request."""
  statuses = {}  # pid -> the write end of its status pipe
  sock.setblocking(True)
  while True:
    readable, _, _ = select.select([sock], [], [], 0.05)
    while statuses:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if not pid:
        break
      os.write(statuses[pid], _STATUS.pack(status))
      os.close(statuses.pop(pid))
    if not readable:
      continue
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
    request = _read_message(sock, data) if data else None
    if request is None:
      return {}  # The tests are done.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      sock.close()
      for f in statuses.values():
        os.close(f)
      for target, f in enumerate(fds[:3]):
        os.dup2(f, target)
      for f in fds:
        os.close(f)
      return request
    for f in fds[:3]:
      os.close(f)
    statuses[pid] = fds[3]
    sock.sendall(_STATUS.pack(pid))


def _run_job(request: dict) -> None:
  """What `python ARGV` does, in this forked process."""
  if request['start_new_session']:
    os.setsid()
  os.chdir(request['cwd'])
  os.environ.clear()
  os.environ.update(request['env'])
  # sys.path: the module's folder or '', then PYTHONPATH, then the rest.
  def entries(env):
    return [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
  ours = entries(_ENV)
  rest = sys.path[1 + len(ours):]
  argv = request['argv']
  first = request['cwd'] if argv[0] == '-m' else ''
  sys.path[:] = [first, *entries(request['env']), *rest]
  if argv[0] == '-m':
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
  else:  # -c CODE
    sys.argv = ['-c', *argv[2:]]
    main = types.ModuleType('__main__')
    sys.modules['__main__'] = main
    exec(compile(argv[1], '<string>', 'exec'), vars(main))  # pylint: disable=exec-used


def _preload(fd: int) -> None:
  sock = socket.socket(fileno=fd)
  sys.path[0] = REPO  # As `python -m` from the repository has it.
  from capjax import garbage  # pylint: disable=g-import-not-at-top
  garbage.collect_rarely()  # As capjax's commands do, before the imports.
  for module in PRELOAD:
    importlib.import_module(module)
  gc.freeze()  # Kept out of the jobs' collections, and shared with them.
  sock.sendall(_message(dict(os.environ)))
  request = _serve(sock)
  if request:
    _run_job(request)


if __name__ == '__main__':
  _preload(int(sys.argv[1]))
