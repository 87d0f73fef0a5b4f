"""Joining a multi-process job (`jax.distributed`, from flags or the
launcher), and noticing when a process of it is gone (`PeerWatch`).

Every process of a multi-host job runs the same `python -m capjax.main`; JAX's
own distributed runtime connects them (the coordinator of process 0, device
discovery, collectives across hosts). Where its settings come from, first
match wins:

  1. --coordinator_address, --num_processes and --process_id;
  2. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID;
  3. a torchrun-style environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
     RANK), as Kubernetes JobSet and PyTorch launchers set it;
  4. a cluster JAX detects itself: SLURM (srun), Open MPI (mpirun) and Cloud
     TPU VM pod slices, when they run more than one process;
  5. none of these: one process, nothing to do.
"""

from collections.abc import Callable, Mapping
import socket
import threading

from absl import logging
import jax

from capjax.errors import UserError

_DEFAULT_PORT = '1234'


def _more_than_one(env: Mapping[str, str], name: str) -> bool:
  try:
    return int(env.get(name, '1')) > 1
  except ValueError:
    return False


def settings(coordinator_address: str | None, num_processes: int | None,
             process_id: int | None, env: Mapping[str, str]
             ) -> dict[str, object] | None:
  """The arguments of `jax.distributed.initialize`, or None for one process.

  `{}` means: let JAX detect the cluster (SLURM, Open MPI, TPU pod).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError('give all three of --coordinator_address, '
                      '--num_processes and --process_id, or none')
    if not 0 <= process_id < num_processes:
      raise UserError(f'--process_id={process_id} must be in 0..'
                      f'{num_processes - 1} (--num_processes={num_processes})')
    return dict(coordinator_address=coordinator_address,
                num_processes=num_processes, process_id=process_id)
  if 'JAX_COORDINATOR_ADDRESS' in env:
    return dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                num_processes=int(env['JAX_NUM_PROCESSES']),
                process_id=int(env['JAX_PROCESS_ID']))
  if 'MASTER_ADDR' in env and _more_than_one(env, 'WORLD_SIZE'):
    port = env.get('MASTER_PORT', _DEFAULT_PORT)
    return dict(coordinator_address=f'{env["MASTER_ADDR"]}:{port}',
                num_processes=int(env['WORLD_SIZE']),
                process_id=int(env['RANK']))
  if (_more_than_one(env, 'SLURM_NTASKS') or
      _more_than_one(env, 'OMPI_COMM_WORLD_SIZE') or
      ',' in env.get('TPU_WORKER_HOSTNAMES', '')):
    return {}
  return None


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, env: Mapping[str, str]) -> None:
  """Joins the job described by the flags or `env`; a no-op for one process.

  Must run before anything touches a JAX device.
  """
  kwargs = settings(coordinator_address, num_processes, process_id, env)
  if kwargs is None:
    return
  # CPU-only processes (tests, laptops) need gloo for cross-process
  # collectives; GPU and TPU backends ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('Joining a multi-process job: %s',
               kwargs or 'detected from the cluster environment')
  jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------
# A process that is gone.
# ----------------------------------------------------------------------------

# Where process 0 publishes its watch's port, in JAX's key-value store.
_WATCH_KEY = 'capjax/peer_watch_port'
_WATCH_SETUP_SECONDS = 60


class PeerWatch:
  """Tells each process at once when another one of the job is gone.

  JAX's own health check notices a process that died only once it has sent
  no heartbeat for `heartbeat_timeout_seconds` (100 s), and then aborts the
  others from a C++ thread: `Fatal Python error: Aborted` and a hundred
  lines of thread dumps, after a collective that waited for the dead process
  has perhaps printed a gloo error. Python cannot take that abort over (the
  client's `missed_heartbeat_callback` cannot be a Python function in
  jaxlib 0.10: it fails with std::bad_cast and aborts all the same).

  The kernel, though, closes a process's sockets the moment it dies, however
  it dies (kill -9, the OOM killer, a crash, its host rebooting): so every
  process keeps one TCP connection to process 0, which passes on what it
  hears. Each line on a connection is a message:

    bye                      the sender ends in order (done, or stopped at
                             the same point as every process, or an error
                             of all of them): nothing to do
    stop <i> <code> <why>    process i stopped at a signal by itself; the
                             others stop too, with status <code>
    lost <i>                 (from process 0) process i closed its
                             connection without a word: it is gone

  A connection that closes without `bye` is a lost process. `on_end(text,
  code)` is called, once, from a thread of the watch, with e.g. 'process 1
  of 2 was lost': it must end this process (its main thread is likely
  blocked in a collective that will never return). JAX's heartbeat stays
  the backstop for what closes no socket (a network cut).
  """

  def __init__(self, client, coordinator_host: str,
               on_end: Callable[[str, int], None]):
    self._index = jax.process_index()
    self._count = jax.process_count()
    self._on_end = on_end
    self._lock = threading.Lock()
    self._conns = {}  # Process index -> socket (process 0: every other).
    self._said_bye = set()
    self._closing = False
    self._ended = False
    if self._index == 0:
      server = _listen()
      client.key_value_set(_WATCH_KEY, str(server.getsockname()[1]))
      threading.Thread(target=self._accept, args=(server,), daemon=True,
                       name='capjax-peer-watch').start()
    else:
      port = int(client.blocking_key_value_get(
          _WATCH_KEY, _WATCH_SETUP_SECONDS * 1000))
      conn = socket.create_connection((coordinator_host, port),
                                      timeout=_WATCH_SETUP_SECONDS)
      conn.settimeout(None)
      conn.sendall(f'hello {self._index}\n'.encode())
      self._conns[0] = conn
      threading.Thread(target=self._read, args=(0, conn), daemon=True,
                       name='capjax-peer-watch').start()

  def _name(self, i: int) -> str:
    return f'process {i} of {self._count}'

  def _accept(self, server: socket.socket) -> None:
    while len(self._conns) < self._count - 1:
      conn, _ = server.accept()
      try:
        conn.settimeout(_WATCH_SETUP_SECONDS)
        hello = conn.makefile('r').readline().split()
        conn.settimeout(None)
        peer = int(hello[1])
      except (OSError, ValueError, IndexError):  # Not one of ours.
        conn.close()
        continue
      with self._lock:
        self._conns[peer] = conn
      threading.Thread(target=self._read, args=(peer, conn), daemon=True,
                       name='capjax-peer-watch').start()
    server.close()

  def _read(self, peer: int, conn: socket.socket) -> None:
    try:
      for line in conn.makefile('r'):
        words = line.split()
        if not words:
          continue
        if words[0] == 'bye':
          self._said_bye.add(peer)
        elif words[0] == 'stop':
          who, code = int(words[1]), int(words[2])
          self._end(f'{self._name(who)} stopped by {" ".join(words[3:])}',
                    code, relay=line.strip(), source=peer)
        elif words[0] == 'lost':
          self._end(f'{self._name(int(words[1]))} was lost', 1)
    except OSError:
      pass
    if peer not in self._said_bye:
      self._end(f'{self._name(peer)} was lost', 1, relay=f'lost {peer}',
                source=peer)

  def _send(self, text: str, skip: int | None = None) -> None:
    for peer, conn in list(self._conns.items()):
      if peer == skip:
        continue
      try:
        conn.sendall((text + '\n').encode())
      except OSError:  # That one is gone too.
        pass

  def _end(self, text: str, code: int, relay: str | None = None,
           source: int | None = None) -> None:
    with self._lock:
      if self._closing or self._ended:
        return
      self._ended = True
    if self._index == 0 and relay:  # The others hear it from process 0.
      self._send(relay, skip=source)
    self._on_end(text, code)

  def close(self) -> None:
    """This process ends in order: the others go on undisturbed."""
    with self._lock:
      self._closing = True
    self._send('bye')
    for conn in self._conns.values():
      conn.close()

  def stopped(self, why: str, code: int) -> None:
    """This process stops alone (a signal): the others stop too."""
    with self._lock:
      self._closing = True
    self._send(f'stop {self._index} {code} {why}')
    for conn in self._conns.values():
      conn.close()


def _listen() -> socket.socket:
  """A server socket on a free port of every interface."""
  if socket.has_dualstack_ipv6():
    return socket.create_server(('', 0), family=socket.AF_INET6,
                                dualstack_ipv6=True)
  return socket.create_server(('', 0))


def watch_peers(on_end: Callable[[str, int], None]) -> PeerWatch | None:
  """A `PeerWatch` of this multi-process job (None for one process, or if it
  cannot be set up: then JAX's heartbeat timeout is all there is)."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return None
  # pylint: disable=g-import-not-at-top
  # The client and the coordinator's address, which `jax.distributed` keeps
  # and does not expose (the latter may come from the cluster's environment).
  from jax._src import distributed as jax_distributed
  # pylint: enable=g-import-not-at-top
  state = jax_distributed.global_state
  try:
    host = state.coordinator_address.rsplit(':', 1)[0].strip('[]')
    return PeerWatch(state.client, host, on_end)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('No watch on the other processes (%s): a process that '
                    'dies stops the others only after JAX\'s heartbeat '
                    'timeout.', e)
    return None
