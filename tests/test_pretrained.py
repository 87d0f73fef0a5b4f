"""Tests for the pretrained-weight importers, on locally built weights.

No download happens here: the Keras models get random weights (BatchNorm
statistics included, so that they matter), and torchvision-layout state dicts
are built with numpy and checked against a numpy re-implementation of
torchvision's forward pass, which pins the kernel layout, BatchNorm epsilon
and padding.
"""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from capjax import config as config_lib
from capjax import pretrained
from capjax.errors import UserError
from capjax.models import resnet
import preload
from conftest import torch_state_dict

# Keras's get_weights() trips a NumPy 2 deprecation, once per layer.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # Image side for the Keras parity tests.


def _assert_close(actual, expected, tol: float = 1e-4) -> None:
  """Max abs error, relative to the largest expected magnitude, is <= tol."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error <= tol, f'relative error {error:.2e} > {tol:.0e}'


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _encoder_config(path: str, arch: str = 'resnet_tiny',
                    variant: str = 'v1.5'):
  encoder = config_lib.defaults().model.encoder
  encoder.pretrained = str(path)
  encoder.arch = arch
  encoder.variant = variant
  return encoder


def _abstract_init(arch: str, **kwargs):
  model = resnet.build(arch, **kwargs)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


# ---------------------------------------------------------------------------
# Keras applications.
# ---------------------------------------------------------------------------


def _keras_resnet(depth: int, seed: int):
  """A Keras ResNet{depth} with random weights and BatchNorm statistics."""
  keras = pytest.importorskip('keras')
  application = getattr(keras.applications, f'ResNet{depth}')
  model = application(weights=None, include_top=True,
                      input_shape=(SIZE, SIZE, 3), classifier_activation=None)
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    values = layer.get_weights()
    if not values:
      continue
    if isinstance(layer, keras.layers.BatchNormalization):
      shape = values[0].shape
      values = [rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.1, shape),
                rng.normal(0, 0.1, shape), rng.uniform(0.5, 2.0, shape)]
    else:  # Conv2D or Dense: He-scaled kernel, small bias.
      kernel, bias = values
      fan_in = math.prod(kernel.shape[:-1])
      values = [rng.normal(size=kernel.shape) * np.sqrt(2 / fan_in),
                rng.normal(0, 0.1, bias.shape)]
    layer.set_weights([v.astype(np.float32) for v in values])
  return model


def _keras_notop(model):
  """The feature extractor inside `model`: include_top=False's layers."""
  keras = pytest.importorskip('keras')
  return keras.Model(model.input, model.get_layer('conv5_block3_out').output,
                     name=f'{model.name}_notop')


def _check_keras_parity(model, arch: str) -> None:
  keras = pytest.importorskip('keras')
  # Caffe-style input (BGR minus the ImageNet mean): just numbers here.
  images = np.random.default_rng(1).uniform(
      -120, 130, (2, SIZE, SIZE, 3)).astype(np.float32)

  variables = pretrained.import_keras_resnet(model)
  logits = resnet.build(arch, variant='v1', num_classes=1000).apply(
      variables, images, train=False)
  _assert_close(logits, keras.ops.convert_to_numpy(model(images)))

  notop = _keras_notop(model)
  notop_variables = pretrained.import_keras_resnet(notop)
  assert 'head' not in notop_variables['params']
  features = resnet.build(arch, variant='v1').apply(
      notop_variables, images, train=False)
  assert features.shape == (2, SIZE // 32, SIZE // 32, 2048)
  _assert_close(features, keras.ops.convert_to_numpy(notop(images)))


@pytest.fixture(scope='module')
def keras_resnet50():
  return _keras_resnet(50, seed=0)


@pytest.fixture(scope='module')
def keras_notop_h5(keras_resnet50, tmp_path_factory) -> str:
  """Weights-only legacy .h5 of the no-top model, as Keras applications ship."""
  h5py = pytest.importorskip('h5py')
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('keras') /
             'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5')
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, _keras_notop(keras_resnet50))
  return path


def test_keras_resnet50_parity(keras_resnet50):
  _check_keras_parity(keras_resnet50, 'resnet50')


def test_keras_resnet101_parity():
  _check_keras_parity(_keras_resnet(101, seed=2), 'resnet101')


def test_keras_parameter_count_matches(keras_resnet50):
  variables = pretrained.import_keras_resnet(keras_resnet50)
  count = sum(v.size for v in jax.tree.leaves(variables))
  assert count == keras_resnet50.count_params() == 25_636_712


def test_keras_files_round_trip(keras_resnet50, keras_notop_h5, tmp_path):
  expected = pretrained.import_keras_resnet(keras_resnet50)
  expected_notop = pretrained.import_keras_resnet(_keras_notop(keras_resnet50))

  path = str(tmp_path / 'resnet.keras')
  keras_resnet50.save(path)
  variables, arch = pretrained.load_keras_resnet(path)
  assert arch == 'resnet50'
  _assert_trees_equal(variables, expected)

  path = str(tmp_path / 'whole_model.h5')
  keras_resnet50.save(path)  # Keras's legacy whole-model HDF5.
  variables, arch = pretrained.load_keras_resnet(path)
  assert arch == 'resnet50'
  _assert_trees_equal(variables, expected)

  variables, arch = pretrained.load_keras_resnet(keras_notop_h5)
  assert arch == 'resnet50'
  _assert_trees_equal(variables, expected_notop)


def test_weights_only_h5_loads_without_keras(keras_notop_h5):
  # GPU machines may lack TensorFlow and Keras: the shipped .h5 files must
  # still load. Blocking the imports makes any `import keras` fail.
  code = ('import sys; sys.modules["keras"] = None; '
          'sys.modules["tensorflow"] = None; '
          'from capjax import pretrained; '
          'variables, arch = pretrained.load_keras_resnet(sys.argv[1]); '
          'print(arch, variables["params"]["stage4_block2"]["conv3"]'
          '["kernel"].shape)')
  result = subprocess.run([sys.executable, '-c', code, keras_notop_h5],
                          cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split('\n')[-2] == 'resnet50 (1, 1, 512, 2048)'


def test_load_encoder_weights_from_keras(keras_resnet50, keras_notop_h5):
  target = _abstract_init('resnet50', variant='v1')
  variables = pretrained.load_encoder_weights(
      _encoder_config(keras_notop_h5, 'resnet50', 'v1'), target)
  assert jax.tree.structure(variables) == jax.tree.structure(target)
  _assert_trees_equal(
      variables, pretrained.import_keras_resnet(_keras_notop(keras_resnet50)))


def test_keras_errors(keras_notop_h5):
  target = _abstract_init('resnet50', variant='v1')
  with pytest.raises(UserError, match=r'resnet50 but .*arch=resnet101'):
    pretrained.load_encoder_weights(
        _encoder_config(keras_notop_h5, 'resnet101', 'v1'),
        _abstract_init('resnet101', variant='v1'))
  # The variant is checked before anything is read or downloaded.
  for source in (keras_notop_h5, 'keras:imagenet'):
    with pytest.raises(UserError, match=r'variant=v1 .*normalization=caffe'):
      pretrained.load_encoder_weights(
          _encoder_config(source, 'resnet50', 'v1.5'), target)
  with pytest.raises(UserError, match=r'resnet101 but .*arch=resnet50'):
    pretrained.load_encoder_weights(
        _encoder_config('keras:imagenet:resnet101', 'resnet50', 'v1'), target)
  with pytest.raises(UserError, match='Keras publishes no resnet18'):
    pretrained.load_encoder_weights(
        _encoder_config('keras:imagenet', 'resnet18', 'v1'), target)
  with pytest.raises(UserError, match='keras:imagenet:resnet101'):
    pretrained.load_keras_resnet('keras:imagenet:resnet18')
  # A classifier the feature encoder would need but the file lacks.
  with pytest.raises(UserError, match='no classifier for params/head'):
    pretrained.load_encoder_weights(
        _encoder_config(keras_notop_h5, 'resnet50', 'v1'),
        _abstract_init('resnet50', variant='v1', num_classes=1000))


# ---------------------------------------------------------------------------
# torchvision / timm layout.
# ---------------------------------------------------------------------------


def _np_conv(x, weight, stride: int, pad: int):
  """torch.nn.functional.conv2d: x [n, c, h, w], weight [o, c, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = weight.shape[2:]
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  windows = windows[:, :, ::stride, ::stride]  # [n, c, h', w', kh, kw]
  return np.einsum('nchwij,ocij->nohw', windows, weight, optimize=True)


def _np_max_pool(x):
  """torch MaxPool2d(3, stride=2, padding=1): pads with -inf."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
  return windows[:, :, ::2, ::2].max(axis=(4, 5))


def _torch_forward(state, arch: str, images_nchw):
  """torchvision ResNet.forward in float64 numpy: (features, logits)."""
  spec = resnet.ARCHS[arch]
  w = {k: np.asarray(v, np.float64) for k, v in state.items()}
  relu = lambda x: np.maximum(x, 0)

  def bn(x, name):
    scale = w[f'{name}.weight'] / np.sqrt(w[f'{name}.running_var'] + 1e-5)
    shift = w[f'{name}.bias'] - w[f'{name}.running_mean'] * scale
    return x * scale[:, None, None] + shift[:, None, None]

  x = relu(bn(_np_conv(images_nchw, w['conv1.weight'], 2, 3), 'bn1'))
  x = _np_max_pool(x)
  for s, num_blocks in enumerate(spec.stage_sizes, start=1):
    for b in range(num_blocks):
      p = f'layer{s}.{b}'
      stride = 2 if s > 1 and b == 0 else 1
      if spec.bottleneck:  # v1.5: the 3x3 conv strides.
        out = relu(bn(_np_conv(x, w[f'{p}.conv1.weight'], 1, 0), f'{p}.bn1'))
        out = relu(bn(_np_conv(out, w[f'{p}.conv2.weight'], stride, 1),
                      f'{p}.bn2'))
        out = bn(_np_conv(out, w[f'{p}.conv3.weight'], 1, 0), f'{p}.bn3')
      else:
        out = relu(bn(_np_conv(x, w[f'{p}.conv1.weight'], stride, 1),
                      f'{p}.bn1'))
        out = bn(_np_conv(out, w[f'{p}.conv2.weight'], 1, 1), f'{p}.bn2')
      identity = x
      if f'{p}.downsample.0.weight' in w:
        identity = bn(_np_conv(x, w[f'{p}.downsample.0.weight'], stride, 0),
                      f'{p}.downsample.1')
      x = relu(out + identity)
  logits = x.mean(axis=(2, 3)) @ w['fc.weight'].T + w['fc.bias']
  return x, logits


@pytest.fixture(scope='module')
def torch_files(tmp_path_factory):
  """arch -> (state dict, .safetensors path) for resnet_tiny and resnet18."""
  folder = tmp_path_factory.mktemp('torch')
  files = {}
  for seed, arch in enumerate(('resnet_tiny', 'resnet18')):
    state = torch_state_dict(arch, seed)
    path = str(folder / f'{arch}.safetensors')
    safetensors_numpy.save_file(state, path)
    files[arch] = state, path
  return files


# 56 px gives odd and even grids (28, 14, 7, 4, 2): a stride-2 conv padded
# 'SAME' would differ from torch on the even ones.
@pytest.mark.parametrize('arch', ['resnet_tiny', 'resnet18'])
def test_torch_layout_matches_reference_forward(arch, torch_files):
  state, path = torch_files[arch]
  variables = pretrained.load_safetensors(path, arch)
  _assert_trees_equal(variables, pretrained.import_torch_resnet(state, arch))

  images = np.random.default_rng(3).normal(size=(2, 56, 56, 3))
  want_features, want_logits = _torch_forward(
      state, arch, images.transpose(0, 3, 1, 2))
  images = jnp.asarray(images, jnp.float32)

  logits = jax.jit(functools.partial(
      resnet.build(arch, num_classes=10).apply, train=False))(variables, images)
  _assert_close(logits, want_logits)

  model = resnet.build(arch)
  target = jax.eval_shape(lambda: model.init(
      jax.random.key(0), images, train=False))
  encoder_variables = pretrained.load_encoder_weights(
      _encoder_config(path, arch), target)
  features = jax.jit(functools.partial(model.apply, train=False))(
      encoder_variables, images)
  _assert_close(features, want_features.transpose(0, 2, 3, 1))


def test_torch_import_details(torch_files):
  state, _ = torch_files['resnet_tiny']
  variables = pretrained.import_torch_resnet(state, 'resnet_tiny')
  kernel = variables['params']['stage2_block0']['conv2']['kernel']
  # OIHW -> HWIO.
  np.testing.assert_array_equal(
      kernel, state['layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['head']['kernel'],
                                state['fc.weight'].T)
  np.testing.assert_array_equal(
      variables['batch_stats']['stage1_block0']['proj_bn']['var'],
      state['layer1.0.downsample.1.running_var'])
  # A DataParallel checkpoint's 'module.' prefix is dropped.
  wrapped = {f'module.{k}': v for k, v in state.items()}
  _assert_trees_equal(pretrained.import_torch_resnet(wrapped, 'resnet_tiny'),
                      variables)


def test_load_encoder_weights_keeps_target_tree(torch_files):
  state, path = torch_files['resnet_tiny']
  # Zeros rather than a random init, which takes seconds to compile on CPU.
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        _abstract_init('resnet_tiny'))
  config = _encoder_config(path)
  assert pretrained.load_encoder_weights(_encoder_config(''), target) is target

  variables = pretrained.load_encoder_weights(config, target)
  assert jax.tree.structure(variables) == jax.tree.structure(target)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(target)):
    assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32
  np.testing.assert_array_equal(
      variables['params']['conv_init']['kernel'],
      state['conv1.weight'].transpose(2, 3, 1, 0))
  # Nothing was left at its initial value.
  for leaf in jax.tree.leaves(variables):
    assert np.any(leaf != 0)


def test_torch_errors(torch_files, tmp_path):
  state, path = torch_files['resnet_tiny']
  target = _abstract_init('resnet_tiny')

  def load(file, arch='resnet_tiny', variant='v1.5', target=target):
    return pretrained.load_encoder_weights(
        _encoder_config(file, arch, variant), target)

  def saved(changed_state) -> str:
    file = str(tmp_path / f'changed{len(os.listdir(tmp_path))}.safetensors')
    safetensors_numpy.save_file(changed_state, file)
    return file

  missing = str(tmp_path / 'nope.safetensors')
  with pytest.raises(UserError, match='nope.safetensors does not exist'):
    load(missing)
  with pytest.raises(UserError, match='nope.h5 does not exist'):
    load(str(tmp_path / 'nope.h5'), variant='v1')

  other = tmp_path / 'weights.npz'
  other.write_bytes(b'')
  with pytest.raises(UserError, match='Unknown pretrained weights'):
    load(str(other))
  pickle = tmp_path / 'model.pth'
  pickle.write_bytes(b'')
  with pytest.raises(UserError, match='safetensors.torch.save_file'):
    load(str(pickle))
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'not a safetensors file')
  with pytest.raises(UserError, match='garbage.safetensors is not a readable'):
    load(str(garbage))

  with pytest.raises(UserError, match=r'variant=v1.5 .*normalization=imagenet'):
    load(path, variant='v1')
  with pytest.raises(
      UserError, match=r'holds a resnet18 but the encoder arch is resnet34'):
    load(torch_files['resnet18'][1], arch='resnet34',
         target=_abstract_init('resnet34'))

  wrong_shape = dict(state)
  wrong_shape['layer3.0.conv2.weight'] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(
      UserError,
      match=r'layer3\.0\.conv2\.weight .*\(1, 1, 32, 32\) .*\(3, 3, 32, 32\)'):
    load(saved(wrong_shape))

  no_var = {k: v for k, v in state.items() if k != 'layer1.0.bn2.running_var'}
  with pytest.raises(UserError, match=r'lacks layer1\.0\.bn2\.running_var'):
    load(saved(no_var))

  extra = dict(state, **{'layer1.0.se.fc1.weight': np.zeros((2, 2))})
  with pytest.raises(UserError, match=r'layer1\.0\.se\.fc1\.weight'):
    load(saved(extra))

  no_head = {k: v for k, v in state.items() if not k.startswith('fc.')}
  with pytest.raises(UserError, match='no classifier for params/head'):
    load(saved(no_head), target=_abstract_init('resnet_tiny', num_classes=10))


def test_download_timm_resnet_errors():
  with pytest.raises(UserError, match='resnet18, resnet34'):
    pretrained.download_timm_resnet('resnet_tiny')
  with pytest.raises(UserError, match='resnet18, resnet34'):
    pretrained.load_encoder_weights(_encoder_config('timm', 'resnet_tiny'),
                                    _abstract_init('resnet_tiny'))


# ---------------------------------------------------------------------------
# The real-photo configs, the Hugging Face cache, and a random frozen encoder.
# ---------------------------------------------------------------------------

TIMM_REPO = 'timm/resnet101.a1h_in1k'
_COMMIT = '0123456789abcdef0123456789abcdef01234567'


def _fill_hub_cache(cache, repo: str, weights: str) -> str:
  """Serves `weights` as `repo`'s model.safetensors from a Hugging Face cache,
  laid out as huggingface_hub writes it: blobs, snapshots, refs/main."""
  folder = cache / f'models--{repo.replace("/", "--")}'
  blob = folder / 'blobs' / ('e' * 64)
  snapshot = folder / 'snapshots' / _COMMIT
  for directory in (blob.parent, snapshot, folder / 'refs'):
    directory.mkdir(parents=True, exist_ok=True)
  os.link(weights, blob)
  (snapshot / 'model.safetensors').symlink_to(
      os.path.relpath(blob, snapshot))
  (folder / 'refs' / 'main').write_text(_COMMIT)
  return str(snapshot / 'model.safetensors')


@pytest.fixture(scope='module')
def resnet101_weights(tmp_path_factory):
  """Random ResNet-101 weights in timm's layout, float16 (~90 MB): the state
  dict, and a Hugging Face cache that holds them as timm/resnet101.a1h_in1k."""
  folder = tmp_path_factory.mktemp('resnet101')
  state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
           for k, v in torch_state_dict('resnet101', 5, 1000).items()}
  path = str(folder / 'model.safetensors')
  safetensors_numpy.save_file(state, path)
  cache = folder / 'hub'
  _fill_hub_cache(cache, TIMM_REPO, path)
  return state, str(cache)


@pytest.fixture
def offline_hub(monkeypatch):
  """huggingface_hub offline, reading the cache given: what HF_HUB_OFFLINE=1
  and HF_HUB_CACHE do, which huggingface_hub reads once, at import."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top

  def use(cache):
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return use


def test_real_photo_configs_ask_for_pretrained_resnet101():
  from configs import caption_files  # pylint: disable=g-import-not-at-top
  from configs import coco  # pylint: disable=g-import-not-at-top
  from configs import coco_scst  # pylint: disable=g-import-not-at-top
  for get_config in (coco.get_config, caption_files.get_config):
    config = get_config()
    e = config.model.encoder
    assert (e.arch, e.variant, e.pretrained) == (
        'resnet101', 'v1.5', 'timm:a1h_in1k')
    assert pretrained.TIMM_TAGS['resnet101'] == 'a1h_in1k'
    assert config.data.normalization == 'imagenet'
    assert config.data.image_size == 224
    pretrained.check_random_frozen(config)  # Passes: pretrained.
  config = coco.get_config()
  t = config.train
  epoch = coco.TRAIN_IMAGES / config.batch_size
  assert t.num_steps / epoch == pytest.approx(30, abs=0.01)
  assert t.encoder_from_step / epoch == pytest.approx(20, abs=0.01)
  assert not config.model.encoder.frozen
  assert (t.learning_rate, t.encoder_learning_rate) == (4e-4, 1e-4)
  assert (t.attention_penalty, config.model.decoder.dropout) == (1.0, 0.5)
  assert config.model.decoder.hidden_dim == 512
  assert (config.decode.beam_size, config.decode.split) == (3, 'test')
  # Self-critical training starts from the cross-entropy run's weights.
  scst = coco_scst.get_config()
  assert scst.model.encoder.frozen
  pretrained.check_random_frozen(scst)


def test_random_frozen_encoder_is_refused():
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from configs import test  # pylint: disable=g-import-not-at-top
  config = test.get_config()  # Trained from scratch: not frozen.
  pretrained.check_random_frozen(config)
  pretrained.check_random_frozen(shapes.get_config())
  config.model.encoder.frozen = True
  with pytest.raises(UserError) as error:
    pretrained.check_random_frozen(config)
  message = str(error.value)
  assert message.startswith('the encoder is frozen and has random weights')
  assert '--config.model.encoder.pretrained' in message
  assert '--config.train.allow_random_frozen_encoder=True' in message
  # Frozen for its first steps is refused too.
  config.model.encoder.frozen = False
  config.train.encoder_from_step = 3
  with pytest.raises(UserError, match='frozen until step 3 and has random'):
    pretrained.check_random_frozen(config)
  # What allows it: the field, weights, or a start from another run's.
  allowed = [config.copy_and_resolve_references() for _ in range(3)]
  allowed[0].train.allow_random_frozen_encoder = True
  allowed[1].model.encoder.pretrained = 'timm'
  allowed[2].init_from = 'runs/ce'
  for c in allowed:
    pretrained.check_random_frozen(c)


def test_random_frozen_encoder_is_one_line_from_main(tmp_path):
  # Refused before any data is read: the data dir does not even exist.
  result = preload.run(
      [sys.executable, '-m', 'capjax.main', '--config=configs/test.py',
       f'--workdir={tmp_path / "run"}', '--config.model.encoder.frozen=True',
       f'--config.data.data_dir={tmp_path / "none"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('capjax: error: the encoder is frozen and has '
                         'random weights: set --config.model.encoder.'
                         'pretrained'), result.stderr[-3000:]
  assert '--config.train.allow_random_frozen_encoder=True' in last
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'none').exists()


def test_timm_weights_come_from_the_hub_cache(resnet101_weights, offline_hub):
  state, cache = resnet101_weights
  offline_hub(cache)
  path = pretrained.download_timm_resnet('resnet101')  # The default tag.
  assert path.startswith(cache) and path.endswith('model.safetensors')
  assert f'models--timm--resnet101.a1h_in1k/snapshots/{_COMMIT}' in path
  from configs import coco  # pylint: disable=g-import-not-at-top
  encoder = coco.get_config().model.encoder
  target = pretrained.encoder_variables_shape(encoder)
  variables = pretrained.load_encoder_weights(encoder, target)
  assert jax.tree.structure(variables) == jax.tree.structure(target)
  # Exactly the file's values (float16 -> float32 is exact), in capjax's
  # layout; the ImageNet classifier is left out.
  features = {k: v for k, v in state.items() if not k.startswith('fc.')}
  _assert_trees_equal(variables,
                      pretrained.import_torch_resnet(features, 'resnet101'))
  np.testing.assert_array_equal(
      variables['params']['stage3_block22']['conv2']['kernel'],
      state['layer3.22.conv2.weight'].astype(np.float32).transpose(2, 3, 1, 0))
  assert pretrained.fetch_encoder_weights(coco.get_config()) == (
      'timm:a1h_in1k')


def test_offline_without_the_weights_is_one_clear_error(tmp_path,
                                                        offline_hub):
  offline_hub(tmp_path / 'empty')
  with pytest.raises(UserError) as error:
    pretrained.download_timm_resnet('resnet101', 'a1h_in1k')
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(
      f'Cannot get the ImageNet weights {TIMM_REPO} (HF_HUB_OFFLINE is set '
      f'and they are not in the cache {tmp_path / "empty"})')
  assert (f'https://huggingface.co/{TIMM_REPO}/resolve/main/'
          'model.safetensors') in message
  assert '--config.model.encoder.pretrained=PATH.safetensors' in message
  # Never random weights instead: training stops at the same error.
  with pytest.raises(UserError, match='Cannot get the ImageNet weights'):
    pretrained.load_encoder_weights(
        _encoder_config('timm', 'resnet101'),
        pretrained.encoder_variables_shape(_encoder_config('timm',
                                                           'resnet101')))


def test_nothing_to_fetch_without_weights_or_for_another_runs_weights():
  from configs import coco  # pylint: disable=g-import-not-at-top
  config = coco.get_config()
  config.init_from = 'runs/ce'  # Its weights are the run's, not ImageNet's.
  assert pretrained.fetch_encoder_weights(config) is None
  config.init_from = ''
  config.model.encoder.pretrained = ''
  assert pretrained.fetch_encoder_weights(config) is None


_PREPARE_COCO = """
import sys
sys.path.insert(0, 'tests')
from absl import app
import tensorflow_datasets as tfds
from capjax import cli, main
from conftest import coco_data_source
with tfds.testing.mock_data(as_data_source_fn=coco_data_source):
  app.run(main.main, argv=['capjax.main'] + sys.argv[1:],
          flags_parser=cli.parse_flags)
"""


def test_prepare_coco_fetches_the_encoder_weights(resnet101_weights,
                                                  tmp_path):
  """--mode=prepare of configs/coco.py on mock COCO, as a user runs it, with
  the weights from a pre-filled Hugging Face cache, offline."""
  _, cache = resnet101_weights
  (tmp_path / 'tfds').mkdir()
  args = ['--config=configs/coco.py', f'--workdir={tmp_path / "run"}',
          '--mode=prepare', f'--config.data.data_dir={tmp_path / "tfds"}',
          # The mock images are small (tests/test_datasets.py).
          '--config.data.image_size=32', '--config.data.min_count=2',
          '--config.data.workers=0']

  def prepare(hub_cache):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(hub_cache))
    return subprocess.run([sys.executable, '-c', _PREPARE_COCO, *args],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)

  # Offline without the weights: the data is prepared, then one line.
  result = prepare(tmp_path / 'empty')
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'capjax: error: Cannot get the ImageNet weights '
                         f'{TIMM_REPO} (HF_HUB_OFFLINE is set'), last
  assert 'Traceback' not in result.stderr
  assert (tmp_path / 'run' / 'vocab.json').exists()

  # With them in the cache: ready for training offline.
  result = prepare(cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Encoder weights timm:a1h_in1k: ready.' in result.stderr
