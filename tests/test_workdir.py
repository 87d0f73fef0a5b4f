"""What a workdir holds (capjax.workdir): paths, config.json, vocab.json, the
trained state, and the one-trainer lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from capjax import models
from capjax import train
from capjax import workdir
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError
from conftest import REPO
from configs import test as test_configs


def test_paths():
  w = os.path.join('runs', 'shapes')
  assert workdir.config_path(w) == os.path.join(w, 'config.json')
  assert workdir.vocab_path(w) == os.path.join(w, vocab_lib.FILENAME)
  # Absolute, as orbax wants it, wherever the job was started.
  assert workdir.checkpoints_dir(w) == os.path.join(os.getcwd(), w,
                                                    'checkpoints')
  assert workdir.decode_results_path(w, 'test', 30, 'beam3') == os.path.join(
      w, 'decode', 'test_step30_beam3.json')
  assert workdir.decode_metrics_path(w, 'test', 30, 'beam3') == os.path.join(
      w, 'decode', 'test_step30_beam3_metrics.json')


def _as_json(config):
  return json.loads(config.to_json_best_effort())


def test_config_roundtrip(tmp_path):
  config = test_configs.get_config()
  config.train.num_steps = 17  # Not a default: read from the file.
  config.data.data_dir = str(tmp_path / 'tfds')
  path = tmp_path / 'new'  # Made by write_config.
  workdir.write_config(str(path), config)
  assert os.listdir(path) == ['config.json']  # No temporary file left.
  loaded = workdir.load_config(str(path))
  assert _as_json(loaded) == _as_json(config)
  assert loaded.train.num_steps == 17
  # Written again (a resumed run): replaced, not appended to.
  config.train.num_steps = 18
  workdir.write_config(str(path), config)
  assert workdir.load_config(str(path)).train.num_steps == 18


def test_only_process_0_writes_the_config(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  workdir.write_config(str(tmp_path), test_configs.get_config())
  assert not os.listdir(tmp_path)


def test_a_restarted_job_removes_what_a_killed_one_was_writing(tmp_path):
  dead = subprocess.Popen(['true'])  # A process no longer there.
  dead.wait()
  leftover = tmp_path / f'config.json.tmp-{socket.gethostname()}-{dead.pid}'
  leftover.write_text('{"half')
  workdir.write_config(str(tmp_path), test_configs.get_config())
  assert os.listdir(tmp_path) == [workdir.CONFIG]


def test_config_of_an_older_workdir_gets_newer_defaults(tmp_path):
  config = test_configs.get_config()
  saved = _as_json(config)
  del saved['train']['discard_data_state']  # A field added later.
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = workdir.load_config(str(tmp_path))
  assert loaded.train.discard_data_state is False
  # What the file holds still wins over the defaults.
  assert loaded.data.image_size == config.data.image_size
  assert loaded.model.encoder.arch == config.model.encoder.arch


def test_what_is_missing_says_how_to_train(tmp_path):
  missing = str(tmp_path / 'nowhere')
  for load in (workdir.load_config, workdir.load_vocab):
    with pytest.raises(UserError, match=(
        rf'--workdir={missing} does not exist; train one first: '
        rf'python -m capjax.main .*--workdir={missing}')):
      load(missing)
  empty = str(tmp_path)
  with pytest.raises(UserError, match='has no config.json; train one first'):
    workdir.load_config(empty)
  with pytest.raises(UserError, match='has no vocab.json; train one first'):
    workdir.load_vocab(empty)
  (tmp_path / 'config.json').write_text('{"data": ')
  with pytest.raises(UserError, match='cannot read .*config.json'):
    workdir.load_config(empty)
  config = test_configs.get_config()
  vocab = vocab_lib.Vocab(vocab_lib.SPECIALS + ('a',))
  predict = models.Predict(models.build_captioner(config.model, len(vocab)))
  with pytest.raises(UserError, match='does not exist; train one first'):
    workdir.restore_trained(missing, config, vocab, predict)
  with pytest.raises(UserError, match='has no checkpoints/; train one first'):
    workdir.restore_trained(empty, config, vocab, predict)


@pytest.fixture(scope='module')
def trained(trained_workdir):
  config = workdir.load_config(trained_workdir)
  vocab = workdir.load_vocab(trained_workdir)
  predict = models.Predict(models.build_captioner(config.model, len(vocab),
                                 config.data.normalization))
  return trained_workdir, config, vocab, predict


def test_the_training_job_config_and_vocab_read_back(trained):
  path, config, vocab, _ = trained
  # configs/test.py as the fixture trained it.
  assert config.train.num_steps == 6
  assert config.evals.val.num_batches == 1
  assert config.data.builder_config == 'tiny'
  assert len(vocab) > len(vocab_lib.SPECIALS)
  assert vocab == vocab_lib.Vocab.load(workdir.vocab_path(path))


def test_restore_trained_latest_or_a_step_on_any_sharding(trained):
  path, config, vocab, predict = trained
  state, step = workdir.restore_trained(path, config, vocab, predict)
  assert step == 6 and int(state.step) == 6
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding == jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0])
  # Replicated over a mesh, as the decode jobs place it.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  again, step = workdir.restore_trained(path, config, vocab, predict,
                                        replicated, step=6)
  assert step == 6
  earlier, step = workdir.restore_trained(path, config, vocab, predict, step=3)
  assert step == 3 and int(earlier.step) == 3
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params)):
    assert b.sharding == replicated
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_trained_refuses_what_does_not_match(trained):
  path, config, vocab, predict = trained
  with pytest.raises(UserError, match='no checkpoint of step 2 in'):
    workdir.restore_trained(path, config, vocab, predict, step=2)
  other = vocab_lib.Vocab(vocab.words + ('zebra',))
  other_predict = models.Predict(models.build_captioner(
      config.model, len(other),
                                       config.data.normalization))
  with pytest.raises(UserError, match='another model or vocabulary'):
    workdir.restore_trained(path, config, other, other_predict)

_HOLD = '''
import sys, time
from capjax import workdir
with workdir.lock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
'''


def _holder(path):
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_trainer_is_refused_until_the_first_ends(tmp_path,
                                                           test_config):
  first = _holder(tmp_path)
  try:
    with pytest.raises(UserError, match=(
        rf'being trained by another job \(pid {first.pid} on '
        rf'{socket.gethostname()}\)')):
      with workdir.lock(str(tmp_path)):
        pass
    # The training job itself, before it reads or writes anything.
    with pytest.raises(UserError, match=f'pid {first.pid}'):
      train.train_and_evaluate(test_config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [workdir.LOCK]
  finally:
    first.kill()  # kill -9: no clean release.
    first.wait()
  # The OS released the lock with the process; the file still names it.
  assert json.loads((tmp_path / workdir.LOCK).read_text())['pid'] == first.pid
  with workdir.lock(str(tmp_path)):
    assert json.loads(
        (tmp_path / workdir.LOCK).read_text())['pid'] == os.getpid()
  # Released cleanly: the file names nobody.
  assert (tmp_path / workdir.LOCK).read_text() == ''


def test_sigterm_releases_the_lock(tmp_path):
  first = _holder(tmp_path)
  first.send_signal(signal.SIGTERM)
  first.wait()
  deadline = time.monotonic() + 10
  while True:
    try:
      with workdir.lock(str(tmp_path)):
        break
    except UserError:
      assert time.monotonic() < deadline
      time.sleep(0.1)
