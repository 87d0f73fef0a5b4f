"""A real multi-process job: 2 processes x 2 CPU devices, gloo collectives.

The job is started by launch/local_multiprocess.sh, over loopback, and must
train and decode exactly as 1 process x 4 devices with the same global
batch; then it resumes from its own checkpoint. Every process runs in its own
process group, killed when the test ends, also when it fails.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import train
from capjax.errors import UserError
from conftest import REPO

# Deterministic and well conditioned, so that float rounding (sums in another
# order across processes) stays rounding: no dropout, BatchNorm on running
# statistics, no attention penalty; a constant learning rate, so that a run
# resumed to step 8 matches one that went there straight.
FLAGS = ['--config=configs/test.py', '--config.model.decoder.dropout=0.0',
         '--config.model.encoder.freeze_bn=True',
         '--config.train.attention_penalty=0.0',
         '--config.train.schedule=constant', '--config.eval.num_batches=1',
         '--config.decode.after_training=test', '--config.decode.meteor=none']


def _run(cmd, env):
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=400)
  finally:
    try:  # The script and every process it started.
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode == 0, err[-4000:]
  return out, err


def _job(workdir, data_dir, steps, processes):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  args = [*FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--config.train.num_steps={steps}']
  if processes == 1:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    return _run([sys.executable, '-m', 'capjax.main', *args], env)
  env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS='2',
             PYTHON=sys.executable)
  return _run(['bash', 'launch/local_multiprocess.sh', *args], env)


def _params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # Restored onto this process's device, whatever the devices that wrote it.
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target)['params']


def _captions(workdir, step):
  path = os.path.join(workdir, 'decode', f'test_step{step}.json')
  with open(path) as f:
    return {r['image_id']: r['caption'] for r in json.load(f)}


@pytest.fixture(scope='module')
def runs(shapes_data_dir, tmp_path_factory):
  one = str(tmp_path_factory.mktemp('one_process'))
  two = str(tmp_path_factory.mktemp('two_processes'))
  _job(one, shapes_data_dir, 8, processes=1)  # Checkpoints 3, 6 and 8.
  first = _job(two, shapes_data_dir, 6, processes=2)
  resumed = _job(two, shapes_data_dir, 8, processes=2)
  return one, two, first, resumed


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-5), a, b)


def test_two_processes_train_and_decode_as_one(runs):
  one, two, (out, err), _ = runs
  assert 'JAX process 0 of 2' in err and 'JAX process 1 of 2' not in err
  _assert_close(_params(two, 6), _params(one, 6))
  # Decoded across both processes, every image once, written once.
  assert out.count('test at step 6, beam 3') == 1
  assert len(_captions(two, 6)) == 64  # The tiny build's test split.


def test_two_processes_resume_from_their_checkpoint(runs):
  one, two, _, (out, err) = runs
  assert 'Restored step 6' in err
  _assert_close(_params(two, 8), _params(one, 8))
  assert _captions(two, 8) == _captions(one, 8)
  assert out.count('test at step 8, beam 3') == 1


def test_another_process_count_needs_discard_data_state(runs, test_config):
  _, two, _, _ = runs
  test_config.model.decoder.dropout = 0.0
  test_config.model.encoder.freeze_bn = True
  test_config.train.attention_penalty = 0.0
  test_config.train.schedule = 'constant'
  test_config.train.num_steps = 9
  test_config.eval.num_batches = 0
  with pytest.raises(UserError, match='written by 2 processes and this job '
                     'has 1'):
    train.train_and_evaluate(test_config, two)
  test_config.train.discard_data_state = True
  state = train.train_and_evaluate(test_config, two)
  assert int(state.step) == 9
