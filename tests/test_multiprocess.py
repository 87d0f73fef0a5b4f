"""A real multi-process job: 2 processes x 2 CPU devices, gloo collectives.

The job is started by launch/local_multiprocess.sh, over loopback, and must
train and decode exactly as 1 process x 8 devices (the tests' own, in this
process) with the same global batch, 2 images a device against 1; then it
resumes from its own checkpoint. Every process runs in its own process
group, killed when the test ends, also when it fails.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from capjax import train
from capjax.errors import UserError
from capjax.tuning import sweep as sweep_lib
import preload
from conftest import REPO
from conftest import built_once
from conftest import saved_state
from conftest import xla_flags
from configs import test as test_configs

# Deterministic and well conditioned, so that float rounding (sums in another
# order across processes) stays rounding: no dropout, BatchNorm on running
# statistics, no attention penalty; a constant learning rate, so that a run
# resumed to step 8 matches one that went there straight.
SETTINGS = {'model.decoder.dropout': 0.0, 'model.encoder.freeze_bn': True,
            'train.attention_penalty': 0.0, 'train.schedule': 'constant',
            'evals.val.num_batches': 1, 'evals.test.every_steps': 0}
FLAGS = ['--config=configs/test.py',
         *(f'--config.{name}={value}' for name, value in SETTINGS.items())]


def _config(data_dir, steps):
  """configs/test.py as FLAGS set it, for a run in this process."""
  config = sweep_lib.apply(test_configs.get_config(), SETTINGS)
  config.data.data_dir = data_dir
  config.train.num_steps = steps
  return config


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


def _job(workdir, data_dir, steps, extra=()):
  """The job on 2 processes of 2 CPU devices each, by the launcher."""
  # Process 1's log beside the workdir, not in a folder of /tmp of its own.
  env = dict(os.environ, NUM_PROCESSES='2',
             DEVICES_PER_PROCESS='2', PYTHON=sys.executable,
             LOG_DIR=f'{workdir}-logs')
  args = [*FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--config.train.num_steps={steps}', *extra]
  return _run(['bash', 'launch/local_multiprocess.sh', *args], env)


def _captions(workdir, step):
  path = os.path.join(workdir, 'decode', f'test_step{step}_beam3.json')
  with open(path) as f:
    return {r['image_id']: r['caption'] for r in json.load(f)}


@pytest.fixture(scope='module')
def runs(shapes_data_dir, tmp_path_factory):
  """(the reference's workdir, the job's, (stdout, stderr) of its first run
  and of its resumed one); made once, whichever worker asks first."""

  def build(folder):
    # The reference, on this process's 8 devices: checkpoints 3, 6 and 8.
    train.train_and_evaluate(_config(shapes_data_dir, 8),
                             str(folder / 'one'))
    # The first run stops at step 6 without its final decode; the resumed
    # one decodes at step 8.
    for name, steps, extra in (
        ('first', 6, ['--config.evals.test.every_steps=-1']),
        ('resumed', 8, [])):
      out, err = _job(folder / 'two', shapes_data_dir, steps, extra)
      (folder / f'{name}.out').write_text(out)
      (folder / f'{name}.err').write_text(err)

  folder = built_once(tmp_path_factory, 'multiprocess_runs', build)
  outputs = [tuple((folder / f'{name}.{kind}').read_text()
                   for kind in ('out', 'err')) for name in ('first', 'resumed')]
  return str(folder / 'one'), str(folder / 'two'), *outputs


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-5), a, b)


def test_two_processes_train_as_one(runs):
  one, two, (_, err), _ = runs
  assert 'JAX process 0 of 2' in err and 'JAX process 1 of 2' not in err
  _assert_close(saved_state(two, 6)['params'], saved_state(one, 6)['params'])


def test_two_processes_resume_and_decode_as_one(runs):
  one, two, _, (out, err) = runs
  assert 'Restored step 6' in err
  _assert_close(saved_state(two, 8)['params'], saved_state(one, 8)['params'])
  # Decoded across both processes, every image once, written once, as one
  # process decodes.
  assert len(_captions(two, 8)) == 64  # The tiny build's test split.
  assert _captions(two, 8) == _captions(one, 8)
  assert out.count('test at step 8, beam 3') == 1


def test_another_process_count_needs_discard_data_state(
    runs, shapes_data_dir, tmp_path):
  _, two, _, _ = runs
  workdir = str(tmp_path / 'two')
  shutil.copytree(two, workdir)  # The other tests read the original.
  config = _config(shapes_data_dir, 9)
  config.evals.val.every_steps = config.evals.test.every_steps = -1
  with pytest.raises(UserError, match='written by 2 processes and this job '
                     'has 1'):
    train.train_and_evaluate(config, workdir)
  config.train.discard_data_state = True
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 9


def test_two_processes_build_and_train_from_the_feature_cache(
    shapes_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  out, err = _job(workdir, shapes_data_dir, 3, extra=[
      '--config.seed=11',  # An encoder, so a cache, of this test's own.
      '--config.model.encoder.frozen=True',
      '--config.train.allow_random_frozen_encoder=True',
      '--config.data.features.use=True', '--config.data.features.dtype=float32',
      '--config.data.features.batch_size=12'])
  assert 'Encoding train, test, validation (384 images)' in err
  folder = err.split(' into ')[1].split('.\n')[0]
  # Written once, by process 0, complete: 256 + 64 + 64 images.
  for split, n in (('train', 256), ('validation', 64), ('test', 64)):
    with open(os.path.join(folder, f'{split}.json')) as f:
      assert json.load(f)['num_examples'] == n
  assert not [f for f in os.listdir(folder) if '.tmp-' in f]
  assert out.count('test at step 3, beam 3') == 1
  assert len(_captions(workdir, 3)) == 64


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_until_all_log(procs, logs, text, timeout):
  """Until every log holds `text`; fails at once if a process ends first."""
  deadline = time.time() + timeout
  while not all(text in log.read_text() for log in logs):
    for p, log in zip(procs, logs):
      assert p.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, f'no {text!r} in every log'
    time.sleep(0.5)


def _preemptible_args(workdir, data_dir, steps):
  return ['--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}',
          f'--config.train.num_steps={steps}',
          '--config.train.log_every_steps=1',
          # The only checkpoint is the one the signal asks for.
          '--config.train.checkpoint_every_steps=100000',
          '--config.evals.val.every_steps=-1']


def test_sigterm_to_one_process_stops_both_at_one_step(shapes_data_dir,
                                                        tmp_path):
  # The processes are started here, not by the launcher (which stops the
  # others when one exits), so that the signal reaches process 1 only.
  workdir = str(tmp_path / 'run')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:
        procs.append(preload.Popen(
            [sys.executable, '-m', 'capjax.main',
             *_preemptible_args(workdir, shapes_data_dir, 100_000),
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}'],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f,
            start_new_session=True))
    # Both past step 2: compiled, and stepping.
    _wait_until_all_log(procs, logs, '] [2] train/', timeout=300)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=120)
      except subprocess.TimeoutExpired:
        pytest.fail('a process did not stop after the SIGTERM:\n' +
                    '\n'.join(log.read_text()[-2000:] for log in logs))
  finally:
    for p in procs:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  errs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(
      err[-2000:] for err in errs)
  # One step, saved by both and complete: orbax gives the step's folder its
  # name only once every process has written its part.
  checkpoints = os.path.join(workdir, 'checkpoints')
  steps = os.listdir(checkpoints)
  assert len(steps) == 1 and steps[0].isdigit(), steps
  step = int(steps[0])
  assert 2 < step < 100_000
  for err in errs:
    assert f'saved step {step}, stopping' in err
  assert sorted(os.listdir(os.path.join(checkpoints, steps[0], 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  # Resuming from it is resuming from any checkpoint of the 2 processes:
  # test_two_processes_resume_and_decode_as_one.
