"""Where a multi-process job's settings come from (capjax.distributed), and
the launch scripts' checks."""

import os
import subprocess

import pytest

from capjax import distributed
from capjax.errors import UserError
from conftest import REPO


def test_one_process_needs_nothing():
  assert distributed.settings(None, None, None, {}) is None
  assert distributed.settings(None, None, None, {'SLURM_NTASKS': '1'}) is None
  assert distributed.settings(None, None, None, {'WORLD_SIZE': '1',
                                                 'MASTER_ADDR': 'h'}) is None


def test_flags_first_then_jax_then_torchrun_style_then_clusters():
  env = {'JAX_COORDINATOR_ADDRESS': 'a:1', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3', 'MASTER_ADDR': 'm', 'WORLD_SIZE': '2',
         'RANK': '1', 'SLURM_NTASKS': '8'}
  assert distributed.settings('f:9', 2, 0, env) == dict(
      coordinator_address='f:9', num_processes=2, process_id=0)
  assert distributed.settings(None, None, None, env) == dict(
      coordinator_address='a:1', num_processes=4, process_id=3)
  del env['JAX_COORDINATOR_ADDRESS']
  assert distributed.settings(None, None, None, env) == dict(
      coordinator_address='m:1234', num_processes=2, process_id=1)
  # SLURM, Open MPI and TPU pods: JAX reads their environment itself.
  for cluster in ({'SLURM_NTASKS': '8'}, {'OMPI_COMM_WORLD_SIZE': '2'},
                  {'TPU_WORKER_HOSTNAMES': 'w0,w1'}):
    assert distributed.settings(None, None, None, cluster) == {}


def test_incomplete_or_inconsistent_flags():
  with pytest.raises(UserError, match='all three'):
    distributed.settings('h:1', 2, None, {})
  with pytest.raises(UserError, match=r'--process_id=2 must be in 0\.\.1'):
    distributed.settings('h:1', 2, 2, {})


@pytest.mark.parametrize('script, variable', [
    ('launch/slurm.sbatch', 'CONFIG'), ('launch/tpu_vm.sh', 'TPU_NAME'),
    ('launch/local_multiprocess.sh', 'NUM_PROCESSES')])
def test_launch_scripts_name_what_is_missing(script, variable):
  env = {'PATH': os.environ['PATH']}
  out = subprocess.run(['bash', script, '--config=configs/test.py'], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60,
                       check=False)
  assert out.returncode != 0
  assert f'{variable}: set {variable}' in out.stderr
