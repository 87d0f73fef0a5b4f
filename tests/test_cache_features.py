"""The feature cache: built once, resumable, keyed by the encoder, and the
same results as the images."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from clu import metric_writers
import jax
import numpy as np
import pytest

from capjax import cache_features
from capjax import config as config_lib
from capjax import evaluate
from capjax import evaluators
from capjax import start as start_lib
from capjax import train
from capjax.data import feature_cache
from capjax.data import pipeline
from capjax.errors import UserError
from capjax.models import decoders
import preload
from conftest import REPO


def _frozen(config, dtype='float32', seed=0):
  """configs/test.py with a frozen encoder and the feature cache on.

  Each test its own `seed`, so its own encoder and cache: tests running
  side by side share the TFDS data dir."""
  config.seed = seed
  config.model.encoder.frozen = True
  config.model.encoder.freeze_bn = True
  config.train.allow_random_frozen_encoder = True
  config.data.features.use = True
  config.data.features.dtype = dtype
  config.data.features.batch_size = 16
  return config


@pytest.fixture
def small_shards(monkeypatch):
  monkeypatch.setattr(feature_cache, 'SHARD_SIZE', 48)  # 256 train: 6.


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), a, b)


def _files(folder):
  """File -> bytes; a split's .json without the times of its shards, which
  a build made again does not repeat."""
  out = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      out[name] = f.read()
    if name.endswith('.json'):
      info = json.loads(out[name])
      del info['shard_mtimes']
      out[name] = json.dumps(info).encode()
  return out


def _validate(config, s, data, monkeypatch):
  """Validation's metrics, and the captions it decoded by image id."""
  evaluator = evaluators.Validation(
      'val', config.evals.val, config=config, par=s.par, predict=s.predict,
      data=data, workdir='')
  writer = metric_writers.create_default_writer(None, just_logging=True)
  captions = {}
  original = evaluators.common.captions_of

  def keep(rows, vocab):
    out = original(rows, vocab)
    captions.update(out)
    return out

  with monkeypatch.context() as patch:
    patch.setattr(evaluators.common, 'captions_of', keep)
    metrics = evaluator.run(s.par.put_state(s.state), 0, writer)
  return metrics, captions


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_features_give_the_results_of_the_images(test_config, tmp_path,
                                                 small_shards, monkeypatch,
                                                 dtype):
  config = _frozen(test_config, dtype, seed=1)
  config.evals.val.num_batches = -1  # All 64 images.
  s = start_lib.start(config, str(tmp_path))
  s.checkpoints.close()
  data = cache_features.attach(config, s.data, s.predict, s.state, s.par)
  assert data.features and s.data.features is None
  example = data.source('validation')[0]
  assert 'image' not in example
  assert example['features'].dtype == feature_cache.DTYPES[dtype]
  from_images, captions_images = _validate(config, s, s.data, monkeypatch)
  from_features, captions_features = _validate(config, s, data, monkeypatch)
  if dtype == 'float32':
    for k, v in from_images.items():
      assert from_features[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert captions_features == captions_images
  else:
    # bfloat16 keeps 8 bits of the features: the losses move by about
    # that, and an untrained model's near ties may decode otherwise.
    for k in ('val_loss', 'val_cross_entropy'):
      assert from_features[k] == pytest.approx(from_images[k], rel=1e-2), k
    same = sum(captions_features[i] == c for i, c in captions_images.items())
    assert same >= 0.8 * len(captions_images)


def test_the_fingerprint_follows_weights_and_resolution(test_config,
                                                        tmp_path):
  config = _frozen(test_config, seed=2)
  s = start_lib.start(config, str(tmp_path))
  s.checkpoints.close()
  cache = cache_features.cache_of(config, s.data, s.predict, s.state)
  # configs/test.py's resnet_micro at 32 px: an 8x8 grid of 16 channels.
  assert cache.description['shape'] == [8, 8, 16]
  again = cache_features.cache_of(config, s.data, s.predict, s.state)
  assert again.fingerprint == cache.fingerprint
  leaves, tree = jax.tree.flatten(s.state.params['encoder'])
  leaves[0] = np.asarray(leaves[0]) + 0.01  # One weight tensor, moved.
  changed = s.state.replace(params=dict(
      s.state.params, encoder=jax.tree.unflatten(tree, leaves)))
  other = cache_features.cache_of(config, s.data, s.predict, changed)
  assert other.fingerprint != cache.fingerprint
  assert other.folder != cache.folder
  config.data.image_size = 48
  bigger = cache_features.cache_of(config, s.data, s.predict, s.state)
  assert bigger.fingerprint not in (cache.fingerprint, other.fingerprint)


def test_an_interrupted_build_resumes_to_the_same_files(
    test_config, tmp_path, small_shards, monkeypatch):
  config = _frozen(test_config, seed=3)
  s = start_lib.start(config, str(tmp_path / 'run'))
  s.checkpoints.close()
  whole = cache_features.build(config, s.data, s.predict, s.state, s.par,
                               ['train'])
  expected = _files(whole.folder)
  assert len([n for n in expected if n.startswith('train-')]) == 6
  for name in os.listdir(whole.folder):
    os.remove(os.path.join(whole.folder, name))

  calls = []
  real = pipeline.pixels

  def dies_in_shard_3(example, size):
    calls.append(1)
    if len(calls) > 3 * 48:  # Shard 3's first image.
      raise RuntimeError('killed')
    return real(example, size)

  monkeypatch.setattr(pipeline, 'pixels', dies_in_shard_3)
  with pytest.raises(RuntimeError, match='killed'):
    cache_features.build(config, s.data, s.predict, s.state, s.par, ['train'])
  left = sorted(os.listdir(whole.folder))
  assert left == [f'train-{i:05d}.array_record' for i in range(3)]
  monkeypatch.setattr(pipeline, 'pixels', real)
  calls.clear()
  monkeypatch.setattr(pipeline, 'pixels', lambda x, size: (
      calls.append(1), real(x, size))[1])
  cache_features.build(config, s.data, s.predict, s.state, s.par, ['train'])
  assert len(calls) == 256 - 3 * 48  # Shards 0-2 were not encoded again.
  assert _files(whole.folder) == expected


def test_refusals_are_one_line(test_config, tmp_path):
  config = _frozen(test_config, seed=4)
  config.model.encoder.frozen = False
  with pytest.raises(UserError, match='frozen=False trains it'):
    config_lib.check(config)
  config.model.encoder.frozen = True
  config.train.encoder_from_step = 10
  with pytest.raises(UserError, match='encoder_from_step=10 trains it'):
    config_lib.check(config)
  config.train.encoder_from_step = 0
  config.data.features.dtype = 'float16'
  with pytest.raises(UserError, match="features.dtype='float16'"):
    config_lib.check(config)
  config.data.features.dtype = 'bfloat16'
  s = start_lib.start(config, str(tmp_path))
  s.checkpoints.close()
  # A cache of these weights, stored otherwise: not the one asked for.
  cache_features.build(config, s.data, s.predict, s.state, s.par,
                       ['validation'], force=True)
  config.data.features.dtype = 'float32'
  config.data.prepare = False
  with pytest.raises(UserError, match='no features of train, test, '
                     'validation for this encoder.*other caches there are of '
                     'other weights.*--mode=cache_features'):
    cache_features.attach(config, s.data, s.predict, s.state, s.par)
  # Made for one split only: asking for another is named.
  built = cache_features.build(config, s.data, s.predict, s.state, s.par,
                               ['validation'], force=True)
  data = dataclasses.replace(s.data, features=built)
  with pytest.raises(UserError, match='has no features of test'):
    data.source('test')
  # A damaged shard: the split is not read (and is made again if allowed).
  shard = os.path.join(built.folder, 'validation-00000.array_record')
  with open(shard, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(UserError, match='has no features of validation'):
    data.source('validation')
  config.data.prepare = True
  cache_features.attach(config, s.data, s.predict, s.state, s.par)
  assert len(data.source('validation')) == 64


def test_one_cache_serves_every_decoder(test_config, tmp_path):
  """The cache holds the encoder's grid: a run of any decoder on the same
  encoder reads the cache another decoder's run made."""
  config = _frozen(test_config, seed=7)
  config.evals.val.every_steps = config.evals.test.every_steps = -1
  config.train.num_steps = 1
  made = train.train_and_evaluate(config, str(tmp_path / 'made'))
  assert int(made.step) == 1
  for name in decoders.NAMES[1:]:
    other = config.copy_and_resolve_references()
    other.model.decoder.name = name
    other.data.prepare = False  # A missing split would be an error.
    s = start_lib.start(other, str(tmp_path / name))
    s.checkpoints.close()
    cache = cache_features.cache_of(other, s.data, s.predict, s.state)
    assert not cache.missing(cache_features.splits(other)), name
    state = train.train_and_evaluate(other, str(tmp_path / name))
    assert int(state.step) == 1, name


def test_training_and_decoding_run_from_the_cache(test_config, tmp_path):
  config = _frozen(test_config, seed=5)
  workdir = str(tmp_path / 'run')
  straight = train.train_and_evaluate(config, workdir)
  # Cut back to its step 3 and resumed: the very state of the straight run.
  shutil.copytree(workdir, tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '6')
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed),
               jax.device_get(straight))
  # From the images: the same training, to float32's rounding.
  config.data.features.use = False
  from_images = train.train_and_evaluate(config, str(tmp_path / 'images'))
  _assert_close(from_images.params, straight.params)
  s = start_lib.start(config, workdir)  # At step 6.
  s.checkpoints.close()
  cache = cache_features.cache_of(config, s.data, s.predict, s.state)
  assert not cache.missing(cache_features.splits(config))
  # A batch of the training pipeline carries features, not images.
  batch = next(iter(pipeline.train_dataset(
      config, dataclasses.replace(s.data, features=cache).source('train'),
      s.data.vocab)))
  assert batch['features'].shape == (8, 8, 8, 16) and 'image' not in batch

  # The decode job: the captions of the images, from the cache.
  from_cache = evaluate.decode_checkpoint(config, workdir)
  with open(os.path.join(workdir, 'decode', 'test_step6_beam3.json')) as f:
    captions_from_cache = f.read()
  # The sidecar, on another split: from the cache, and done at the last step.
  sidecar = config.copy_and_resolve_references()
  sidecar.decode.split = 'validation'
  sidecar.decode.poll_seconds = sidecar.decode.timeout_seconds = 0
  evaluate.evaluate_continuously(sidecar, workdir)
  assert os.path.exists(os.path.join(workdir, 'decode',
                                     'validation_step6_beam3_metrics.json'))
  config.data.features.use = False
  from_images = evaluate.decode_checkpoint(config, workdir)
  with open(os.path.join(workdir, 'decode', 'test_step6_beam3.json')) as f:
    assert f.read() == captions_from_cache
  assert from_cache == pytest.approx(from_images)

  # SCST from that model, from the cache.
  config.data.features.use = True
  config.train.objective = 'scst'
  config.init_from = workdir
  config.train.num_steps = 2
  config.scst.num_samples = 2
  config.evals.val.every_steps = -1
  config.evals.test.every_steps = -1
  state = train.train_and_evaluate(config, str(tmp_path / 'scst'))
  assert int(state.step) == 2
  config.data.features.use = False
  from_images = train.train_and_evaluate(config, str(tmp_path / 'scst_im'))
  _assert_close(from_images.params, state.params)


_BUILD = '''
import sys
from absl import logging
from capjax import cache_features
from capjax import start as start_lib
import test_cache_features as t
from configs import test
logging.set_verbosity(logging.INFO)
config = t._frozen(test.get_config(), seed=6)
config.data.data_dir = sys.argv[1]
s = start_lib.start(config, sys.argv[2])
s.checkpoints.close()
cache = cache_features.build(config, s.data, s.predict, s.state, s.par,
                             ['validation'])
print(cache.folder)
'''


def test_a_second_builder_waits_for_the_first(test_config, tmp_path):
  config = _frozen(test_config, seed=6)
  s = start_lib.start(config, str(tmp_path / 'one'))
  s.checkpoints.close()
  cache = cache_features.cache_of(config, s.data, s.predict, s.state)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(__file__), REPO]))
  lines = []
  with cache.lock():  # As a first builder would hold it.
    proc = preload.Popen(
        [sys.executable, '-c', _BUILD, config.data.data_dir,
         str(tmp_path / 'two')], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr))
    reader.start()
    try:
      deadline = time.monotonic() + 120
      while not any('Waiting for another job building' in l for l in lines):
        assert proc.poll() is None and time.monotonic() < deadline, lines
        time.sleep(0.2)
      time.sleep(1)  # Still waiting: nothing written meanwhile.
      assert cache.missing(['validation']) == ['validation']
    except BaseException:
      proc.kill()
      raise
  out = proc.stdout.read()
  assert proc.wait(timeout=120) == 0, ''.join(lines)[-3000:]
  reader.join()
  assert out.strip() == cache.folder
  assert not cache.missing(['validation'])
