"""Joining a multi-process job: `jax.distributed`, from flags or the launcher.

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

from collections.abc import Mapping

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
