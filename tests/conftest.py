"""Shared fixtures: fake CPU devices, and the tiny `shapes` build, made once."""

import atexit
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile


def _known_to_xla(flags: str) -> bool:
  """Whether this jaxlib's XLA takes `flags`: an unknown flag aborts the
  process at JAX's first use, so a flag that a later XLA drops is probed."""
  return subprocess.run(
      [sys.executable, '-c', 'import jax; jax.devices()'],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'),
      capture_output=True, check=False).returncode == 0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's older CPU code generation compiles the tiny models' steps in about
# 60% of the time of its fusion emitters, and compilation is a large share
# of the suite's time.
COMPILE_FLAGS = '--xla_cpu_use_fusion_emitters=false'

# Before JAX is imported anywhere (and inherited by the jobs tests start):
# 8 CPU devices to test data parallelism; quick compiles for tiny models; and
# a compilation cache, since many tests compile the same train step. Set
# once, by pytest's first process: its xdist workers inherit them.
if 'XLA_FLAGS' not in os.environ:
  if not _known_to_xla(COMPILE_FLAGS):
    COMPILE_FLAGS = ''
  os.environ['XLA_FLAGS'] = (
      f'{COMPILE_FLAGS} --xla_force_host_platform_device_count=8'.strip())
else:
  COMPILE_FLAGS = ' '.join(
      f for f in os.environ['XLA_FLAGS'].split()
      if not f.startswith('--xla_force_host_platform_device_count'))
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# The CPU's 8 devices, also where an accelerator is present; and the jobs
# the tests start share this environment (tests/preload.py).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='capjax-test-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  # Not the programs that compile in under 0.1 s (most of them): reading
  # one back costs about as much, and writing them all cost the in-process
  # tests 4% more CPU time.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.1'

# With PYTHONDONTWRITEBYTECODE set, every process the tests start (about 80
# jobs and scripts) would compile capjax from source, 0.2 s of CPU each:
# compiled here once, by pytest's first process, they all read the bytecode.
if sys.dont_write_bytecode and not os.environ.get('PYTEST_XDIST_WORKER'):
  import compileall
  for _folder in ('capjax', 'configs', 'tests'):
    compileall.compile_dir(os.path.join(REPO, _folder), quiet=1)

# The tests stop their jobs with SIGINT. Started in the background of a
# shell script, this process ignores SIGINT, and the jobs would inherit
# that and rightly keep ignoring it (capjax.stopping): handled here, it
# comes back to them as the default.
import signal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
from capjax import garbage

# As capjax's commands set the garbage collector, before the imports below
# (capjax/garbage.py): at Python's defaults it took 4% of the in-process
# tests' CPU time, walking everything JAX had cached so far (test_scst,
# test_cross_entropy and test_decode: 8.2 s of collections in 202 s of CPU,
# then 2.1 s).
garbage.collect_rarely()

import functools

from absl import flags
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from capjax import models
from capjax import optimizer
from capjax import state as state_lib
from capjax.data import datasets
from capjax.data import vocab as vocab_lib
from capjax.models import resnet
# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order

# grain's worker processes read absl flags, which no command line parsed here.
flags.FLAGS.mark_as_parsed()


def imported_modules(stderr: str) -> set[str]:
  """The modules a `python -X importtime` process imported, from its
  stderr."""
  return set(re.findall(r'^import time:.*\|\s*([\w.]+)$', stderr, re.M))


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a job of its own with `devices` CPU devices."""
  return f'{COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}'


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The folder `name`, filled by `build(folder)` once per pytest run: with
  xdist, by the first worker that asks, under a lock that the others wait
  for. A module's expensive set-up is then paid once even when its tests
  are spread over the workers."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # The run's folder, above each worker's own.
  folder, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the 'tiny' shapes build; built once per pytest
  run, by the first xdist worker that asks."""
  from capjax.data import shapes  # pylint: disable=g-import-not-at-top

  def build(folder):
    shapes.Shapes(config='tiny', data_dir=str(folder),
                  file_format='array_record').download_and_prepare()
  return str(built_once(tmp_path_factory, 'tfds', build))


def copy_build(data_dir, dest, copies: bool = False) -> None:
  """Copies the tiny shapes build of `data_dir` to `dest`, without what other
  tests' jobs write beside it, perhaps at that moment: its feature caches,
  their locks and temporary files, and unless `copies`, its resized copies."""
  def beside_the_build(folder, names):
    del folder
    return [n for n in names if '.tmp-' in n or re.match(
        r'\d+\.\d+\.\d+-' + ('features-' if copies else ''), n)]
  shutil.copytree(data_dir, dest, ignore=beside_the_build)


@pytest.fixture
def test_config(shapes_data_dir):
  """configs/test.py reading the tiny shapes build."""
  from configs import test  # pylint: disable=g-import-not-at-top
  config = test.get_config()
  config.data.data_dir = shapes_data_dir
  return config


@pytest.fixture(scope='session')
def trained_workdir(shapes_data_dir, tmp_path_factory) -> str:
  """A workdir trained for 6 steps of configs/test.py on the tiny shapes
  build, validated on one batch: its config.json, vocab.json and checkpoints
  3 and 6, for the tests of what reads a trained run back. Only read, never
  written, by those tests (copy it to change it); trained once per pytest
  run, by the first xdist worker that asks."""
  # As in the fixtures above: imported only by the sessions that need it.
  # pylint: disable=g-import-not-at-top
  from capjax import train
  from configs import test
  # pylint: enable=g-import-not-at-top

  def build(folder):
    config = test.get_config()
    config.data.data_dir = shapes_data_dir
    config.evals.val.num_batches = 1
    train.train_and_evaluate(config, str(folder))
  return str(built_once(tmp_path_factory, 'trained', build))


# Shared helpers: tiny steps on random batches, mock COCO, made weights.

VOCAB_SIZE = 12


def step_config(test_config, kind='jit'):
  config = test_config
  config.parallel = kind
  config.batch_size = 16
  config.data.captions_per_image = 2
  config.data.max_len = 7
  # Deterministic per device count: no dropout, BatchNorm on running stats.
  config.model.decoder.dropout = 0.0
  config.model.encoder.freeze_bn = True
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, k = config.batch_size, config.data.captions_per_image
  l = config.data.max_len
  captions = rng.integers(4, VOCAB_SIZE, (b, k, l)).astype(np.int32)
  captions[..., 0] = vocab_lib.BOS
  lengths = rng.integers(2, l, (b, k))
  for i in range(b):
    for j in range(k):
      captions[i, j, lengths[i, j]] = vocab_lib.EOS
      captions[i, j, lengths[i, j] + 1:] = vocab_lib.PAD
  size = config.data.image_size
  # uint8 pixels as the pipeline sends them; after the model's ImageNet
  # normalisation, about standard normal.
  pixels = np.clip(rng.normal(117, 58, (b, size, size, 3)), 0, 255)
  return {'image': pixels.astype(np.uint8),
          'captions': captions, 'mask': np.ones(b, bool),
          'image/id': np.arange(b)}


def random_variables(init, *args, seed: int = 0):
  """Variables shaped as `init` makes them, filled by NumPy.

  `jax.eval_shape` traces `init` without compiling it: compiling the random
  initialisers costs more CPU seconds than the tests themselves.
  """
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    name = path[-1].key
    if name == 'var':  # BatchNorm running variance: positive.
      value = 1 + 0.1 * np.abs(rng.standard_normal(shape.shape))
    elif name == 'scale':  # BatchNorm scale: near 1.
      value = 1 + 0.1 * rng.standard_normal(shape.shape)
    elif len(shape.shape) >= 2:  # Kernels and embeddings, fan-in scaled.
      value = (rng.standard_normal(shape.shape) /
               np.sqrt(np.prod(shape.shape[:-1])))
    else:  # Biases and running means, non-zero so that they count.
      value = 0.1 * rng.standard_normal(shape.shape)
    return value.astype(shape.dtype)

  shapes = jax.eval_shape(init, jax.random.key(0), *args)
  return jax.tree.map_with_path(fill, shapes)


def init_model(config):
  """(predict, schedule, state): the model of `config` with VOCAB_SIZE
  words, and the train step's schedule input."""
  predict = models.Predict(models.build_captioner(
      config.model, VOCAB_SIZE, max_len=config.data.max_len))
  state = jax.jit(functools.partial(state_lib.create, config, predict,
                                    None))(jax.random.key(0))
  return predict, optimizer.schedule_values(config), state


COCO_WORDS = ('a man woman dog cat riding sitting on the red bench table '
              'with').split()
KARPATHY_SIZES = {'train': 12, 'restval': 5, 'val': 4, 'test': 4}


def coco_data_source(builder, split, decoders=None, **kwargs):
  """What a prepared coco_captions would return, through its real features.

  Each example is serialised and parsed back with the builder's own feature
  spec, exactly as TFDS reads ArrayRecord files, so decoders such as
  `SkipDecoding` behave as they do on the real dataset. (TFDS's default
  mock draws sequence features of unequal lengths, which cannot be encoded.)
  """
  del kwargs
  features = builder.info.features
  records = []
  for name in datasets.split_names(split):
    offset = list(KARPATHY_SIZES).index(name) * 1000
    for i in range(KARPATHY_SIZES[name]):
      rng = np.random.default_rng(offset + i)
      captions = [
          ' '.join(rng.choice(COCO_WORDS, rng.integers(4, 12))).capitalize()
          + '.' for _ in range(rng.integers(5, 8))]
      records.append(features.serialize_example({
          'image': rng.integers(0, 256, (rng.integers(30, 60), 50, 3),
                                dtype=np.uint8),
          'image/id': offset + i,
          'image/filename': f'COCO_{name}2014_{offset + i:012d}.jpg',
          'captions': {'id': list(range(len(captions))), 'text': captions},
          'objects': {'area': [10],
                      'bbox': [tfds.features.BBox(.1, .1, .5, .5)],
                      'id': [1], 'is_crowd': [False], 'label': [3]},
      }))

  class Source:
    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      return features.deserialize_example_np(records[i], decoders=decoders)
  return Source()


def coco_config(get_config=None):
  """configs/coco.py (or a config built on it), for the mock data."""
  from configs import coco  # pylint: disable=g-import-not-at-top
  config = (get_config or coco.get_config)()
  config.batch_size = 4
  config.data.image_size = 32
  config.data.min_count = 2
  config.data.workers = 0
  return config


def tiny_coco_training(config):
  """`config` shrunk to 2 training steps of a tiny model on the mock data."""
  config.batch_size = 8
  config.model.encoder.arch = 'resnet_tiny'
  for name in ('embed_dim', 'hidden_dim', 'attention_dim'):
    config.model.decoder[name] = 16
  config.train.num_steps = 2
  config.evals.val.num_batches = 1
  config.evals.val.num_samples = 1
  config.decode.batch_size = 8
  config.decode.meteor = 'none'
  # Mocked, "preparing" downloads nothing; TFDS's real call still runs.
  config.data.prepare = True
  return config


def torch_state_dict(arch: str, seed: int, num_classes: int = 10):
  """Random weights named and shaped as torchvision's ResNet state_dict()."""
  spec = resnet.ARCHS[arch]
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, out_channels, in_channels, k):
    std = np.sqrt(2 / (in_channels * k * k))
    state[f'{name}.weight'] = rng.normal(
        0, std, (out_channels, in_channels, k, k))

  def bn(name, channels):
    state[f'{name}.weight'] = rng.uniform(0.5, 1.5, channels)
    state[f'{name}.bias'] = rng.normal(0, 0.1, channels)
    state[f'{name}.running_mean'] = rng.normal(0, 0.1, channels)
    state[f'{name}.running_var'] = rng.uniform(0.5, 2.0, channels)
    state[f'{name}.num_batches_tracked'] = np.array(100, np.int64)

  conv('conv1', spec.width, 3, 7)
  bn('bn1', spec.width)
  expansion = 4 if spec.bottleneck else 1
  inplanes = spec.width
  for s, num_blocks in enumerate(spec.stage_sizes, start=1):
    planes = spec.width * 2**(s - 1)
    for b in range(num_blocks):
      p = f'layer{s}.{b}'
      if spec.bottleneck:
        conv(f'{p}.conv1', planes, inplanes, 1)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', planes * 4, planes, 1)
        bn(f'{p}.bn3', planes * 4)
      else:
        conv(f'{p}.conv1', planes, inplanes, 3)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
      stride = 2 if s > 1 and b == 0 else 1
      if stride != 1 or inplanes != planes * expansion:
        conv(f'{p}.downsample.0', planes * expansion, inplanes, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  state['fc.weight'] = rng.normal(0, 1 / np.sqrt(inplanes),
                                  (num_classes, inplanes))
  state['fc.bias'] = rng.normal(0, 0.1, num_classes)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32)
          for k, v in state.items()}


def chromium() -> str | None:
  """A headless-capable Chromium, for the tests of pages we write."""
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    if shutil.which(name):
      return shutil.which(name)
  return None


def chromium_flags() -> list[str]:
  return ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
          '--disable-background-networking', '--disable-component-update',
          '--disable-sync', f'--user-data-dir={tempfile.mkdtemp()}']


def in_a_tmpfs(mount_point, *argv, size='1m', read_only=False,
               timeout=300) -> subprocess.CompletedProcess:
  """Runs `argv` (from the repository, tests/ importable) with a tmpfs of
  `size`, read-only if asked, at `mount_point`, seen by it alone (a user and
  mount namespace); skips the test where the machine allows none.

  The tests run as root, whom permission bits never stop: a read-only or
  small file system is what really refuses a write.
  """
  os.makedirs(mount_point, exist_ok=True)
  if not shutil.which('unshare'):
    pytest.skip('needs unshare (util-linux) to mount a tmpfs')
  options = f'size={size}' + (',ro' if read_only else '')

  def run(command, **kwargs):
    return subprocess.run(
        ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
         f'mount -t tmpfs -o {options} capjax-test "{mount_point}" '
         '&& exec "$@"', 'sh', *map(str, command)],
        text=True, capture_output=True, check=False, **kwargs)
  probe = run(['true'])
  if probe.returncode:
    pytest.skip('needs user and mount namespaces (unshare --user '
                '--map-root-user --mount) to mount a tmpfs, which this '
                f'machine refuses: {probe.stderr.strip()}')
  return run(argv, cwd=REPO, timeout=timeout, env=dict(
      os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO,
                                                                 'tests')])))


def saved_state(workdir: str, step: int):
  """The state a job saved at checkpoint `step`, read back as orbax wrote
  it, onto this process's first device whatever devices wrote it."""
  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target)
