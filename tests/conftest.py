"""Shared fixtures: fake CPU devices, and the tiny `shapes` build, made once."""

import atexit
import os
import shutil
import tempfile

# Before JAX is imported anywhere (and inherited by the jobs tests start):
# 8 CPU devices to test data parallelism; quick compiles for tiny models; and
# a compilation cache, since many tests compile the same train step.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='capjax-test-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# grain's worker processes read absl flags, which no command line parsed here.
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the 'tiny' shapes build."""
  from capjax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  shapes.Shapes(config='tiny', data_dir=data_dir,
                file_format='array_record').download_and_prepare()
  return data_dir


@pytest.fixture
def test_config(shapes_data_dir):
  """configs/test.py reading the tiny shapes build."""
  from configs import test  # pylint: disable=g-import-not-at-top
  config = test.get_config()
  config.data.data_dir = shapes_data_dir
  return config
