"""Tests for the ResNet encoder: shapes, parameter counts, BatchNorm modes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.errors import UserError
from capjax.models import resnet

ALL_ARCHS = ('resnet_tiny', 'resnet18', 'resnet34', 'resnet50', 'resnet101',
             'resnet152')


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _abstract_init(model: resnet.ResNet, size: int):
  """Variable shapes without computing any (init of ResNet-152 is slow)."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def _numpy_variables(model: resnet.ResNet, size: int, seed: int = 0):
  """Random variables filled by numpy: much faster than `init` on CPU.

  Kernels are He-scaled and BatchNorm statistics non-trivial, so that every
  array affects the output.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if 'kernel' in name:
      value = rng.normal(size=shape) * np.sqrt(2 / math.prod(shape[:-1]))
    elif 'scale' in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif "'var'" in name:
      value = rng.uniform(0.5, 2.0, shape)
    else:  # Biases and running means.
      value = rng.normal(0, 0.1, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, size))


def _apply(model: resnet.ResNet, variables, images, **kwargs):
  # Jitted: compiling the whole net is faster on CPU than op by op.
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


@pytest.fixture(scope='module')
def tiny():
  model = resnet.build('resnet_tiny')
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  return model, _numpy_variables(model, 64), images


def test_feature_dim():
  assert resnet.feature_dim('resnet18') == 512
  assert resnet.feature_dim('resnet34') == 512
  for arch in ('resnet50', 'resnet101', 'resnet152'):
    assert resnet.feature_dim(arch) == 2048
  assert resnet.feature_dim('resnet_tiny') == 8 * 8 * 4
  assert resnet.feature_dim('resnet_small') == 16 * 4  # Three stages.


def test_three_stage_encoder_grid():
  # The shapes encoder keeps a 1/16 grid: 4x4 at 64 px.
  model = resnet.build('resnet_small')
  out = jax.eval_shape(lambda x: model.init_with_output(
      jax.random.key(0), x, train=False)[0], jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, 4, 4, 64)


@pytest.mark.parametrize('arch,variant', [
    ('resnet_tiny', 'v1'), ('resnet_tiny', 'v1.5'), ('resnet18', 'v1.5')])
def test_feature_grid_runs(arch, variant):
  model = resnet.build(arch, variant=variant)
  variables = _numpy_variables(model, 64)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  features = _apply(model, variables, images, train=False)
  assert features.shape == (2, 2, 2, resnet.feature_dim(arch))
  assert features.dtype == jnp.float32
  assert np.all(np.isfinite(features))
  assert np.all(features >= 0)  # The last block ends in a ReLU.


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_feature_grid_shapes(arch):
  model = resnet.build(arch)
  variables = _abstract_init(model, 64)
  for size, grid in ((64, 2), (224, 7)):
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables,
        jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32))
    assert out.shape == (3, grid, grid, resnet.feature_dim(arch))


# torchvision's published parameter counts (torchvision.models docs).
@pytest.mark.parametrize('arch,count', [
    ('resnet18', 11_689_512),
    ('resnet34', 21_797_672),
    ('resnet50', 25_557_032),
    ('resnet101', 44_549_160),
    ('resnet152', 60_192_808),
])
def test_parameter_count_matches_torchvision(arch, count):
  variables = _abstract_init(resnet.build(arch, num_classes=1000), 64)
  # BatchNorm scale and bias are parameters; running statistics are not.
  assert _count(variables['params']) == count


def test_parameter_count_matches_keras_resnet50():
  variables = _abstract_init(
      resnet.build('resnet50', variant='v1', num_classes=1000), 64)
  # Keras's model.summary(): 25,636,712 total = 25,583,592 trainable (with
  # conv biases) + 53,120 non-trainable (BatchNorm moving mean/variance).
  assert _count(variables['params']) == 25_583_592
  assert _count(variables['params']) + _count(
      variables['batch_stats']) == 25_636_712


def test_variants_differ_in_bias_and_stride():
  v1 = _abstract_init(resnet.build('resnet50', variant='v1'), 64)['params']
  v15 = _abstract_init(resnet.build('resnet50'), 64)['params']
  assert 'bias' in v1['stage2_block0']['conv1']
  assert 'bias' not in v15['stage2_block0']['conv1']
  assert 'bias' not in v15['conv_init']
  # torchvision names: layer1.0 projects (64 -> 256 channels) ...
  assert 'proj_conv' in v15['stage1_block0']
  assert 'proj_conv' not in v15['stage1_block1']
  assert set(v15['stage4_block2']) == {'conv1', 'bn1', 'conv2', 'bn2',
                                       'conv3', 'bn3'}
  # ... but a basic ResNet's first stage does not.
  v18 = _abstract_init(resnet.build('resnet18'), 64)['params']
  assert 'proj_conv' not in v18['stage1_block0']
  assert 'proj_conv' in v18['stage2_block0']


def test_build_sets_epsilon_by_variant():
  assert resnet.build('resnet50', variant='v1').bn_epsilon == 1.001e-5
  assert resnet.build('resnet50').bn_epsilon == 1e-5
  assert resnet.build('resnet50', variant='v1',
                      bn_epsilon=1e-3).bn_epsilon == 1e-3


def test_unknown_arch_and_variant():
  with pytest.raises(UserError, match='resnet_tiny, resnet_small, resnet_micro, resnet18.*resnet152'):
    resnet.build('resnet51')
  with pytest.raises(UserError, match='resnet50'):
    resnet.feature_dim('vgg16')
  with pytest.raises(UserError, match='v1, v1.5'):
    resnet.build('resnet18', variant='v2')


def test_eval_and_frozen_batchnorm_keep_statistics(tiny):
  model, variables, images = tiny
  expected, updates = _apply(model, variables, images, train=False,
                             mutable=['batch_stats'])
  again = _apply(model, variables, images, train=False)
  np.testing.assert_array_equal(expected, again)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
               variables['batch_stats'])

  frozen, updates = _apply(model, variables, images, train=True,
                           freeze_bn=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(frozen, expected)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
               variables['batch_stats'])


def test_training_batchnorm_updates_statistics(tiny):
  model, variables, images = tiny
  out, updates = _apply(model, variables, images, train=True,
                        mutable=['batch_stats'])
  before = variables['batch_stats']['stage1_block0']['bn1']
  after = updates['batch_stats']['stage1_block0']['bn1']
  assert not np.allclose(before['mean'], after['mean'])
  assert not np.allclose(before['var'], after['var'])
  assert not np.allclose(out, _apply(model, variables, images, train=False))


def test_bfloat16_compute_close_to_float32():
  model32 = resnet.build('resnet18')
  model16 = resnet.build('resnet18', dtype=jnp.bfloat16)
  variables = _numpy_variables(model32, 64)
  params16 = _abstract_init(model16, 64)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16))
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  out32 = _apply(model32, variables, images, train=False)
  out16 = _apply(model16, variables, images, train=False)
  assert out16.dtype == jnp.bfloat16
  error = np.linalg.norm(np.asarray(out16, np.float32) - out32)
  assert error / np.linalg.norm(out32) < 2e-2


def _reference_pool(x: np.ndarray, grid: int) -> np.ndarray:
  """torch.nn.AdaptiveAvgPool2d's bins, written out with loops."""
  batch, h, w, channels = x.shape
  out = np.zeros((batch, grid, grid, channels), np.float64)
  for i in range(grid):
    top, bottom = math.floor(i * h / grid), math.ceil((i + 1) * h / grid)
    for j in range(grid):
      left, right = math.floor(j * w / grid), math.ceil((j + 1) * w / grid)
      out[:, i, j] = x[:, top:bottom, left:right].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize('h,w,grid', [
    (14, 14, 7),  # Divisible: plain 2x2 means.
    (7, 7, 7),  # Identity.
    (7, 7, 3),  # Overlapping bins.
    (7, 10, 4),  # Different bins per axis.
    (3, 3, 5),  # Upsampling repeats pixels.
])
def test_pool_grid_matches_adaptive_avg_pool(h, w, grid):
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  pooled = resnet.pool_grid(jnp.asarray(x), grid)
  assert pooled.shape == (2, grid, grid, 3)
  np.testing.assert_allclose(pooled, _reference_pool(x, grid), rtol=1e-6,
                             atol=1e-6)


def test_pool_grid_zero_is_identity_and_keeps_dtype():
  x = jnp.ones((1, 7, 7, 4), jnp.bfloat16)
  assert resnet.pool_grid(x, 0) is x
  assert resnet.pool_grid(x, 3).dtype == jnp.bfloat16
  assert resnet.pool_grid(x, 7).dtype == jnp.bfloat16
