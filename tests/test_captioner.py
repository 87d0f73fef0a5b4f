"""Tests for the captioner (capjax.models.captioner) and `build_captioner`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib
from capjax import models
from capjax.data import vocab
from capjax.errors import UserError
from capjax.models import captioner as captioner_lib
from capjax.models import resnet
from conftest import random_variables

VOCAB = 20
# The stem and one block (configs/test.py's encoder): its grid is 1/4 of the
# image, 2x2 at 8 px, P = 4.
ARCH, STRIDE = 'resnet_micro', 4
B, K, L, S = 2, 3, 6, 8
P = (S // STRIDE)**2

# On arrays this small XLA's CPU backend optimisations take longer to run
# than they save; without them each compile here takes half the time.
jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def model_config(**encoder):
  config = config_lib.defaults().model
  config.encoder.arch = ARCH
  config.encoder.update(encoder)
  config.decoder.update(embed_dim=16, hidden_dim=24, attention_dim=12)
  return config


def make_model(**encoder) -> models.CaptionModel:
  return models.build_captioner(model_config(**encoder), VOCAB)


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.key(0), (B, S, S, 3))  # [B, S, S, 3]


@pytest.fixture(scope='module')
def captions():
  captions = jax.random.randint(jax.random.key(1), (B, K, L), 4, VOCAB)
  return captions.at[..., 0].set(vocab.BOS)  # [B, K, L]


@pytest.fixture(scope='module')
def variables(images, captions):
  return random_variables(make_model().init, images, captions)


@functools.cache
def forward(frozen: bool = True):
  return jit(make_model(frozen=frozen).apply)


@functools.cache
def encode():
  return jit(models.Predict(make_model()).encode)


def count_convs(jaxpr) -> int:
  """Convolutions in a jaxpr, nested jaxprs (jit, remat, ...) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'conv_general_dilated'
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          count += count_convs(sub)
  return count


DECODER_PATHS = {
    f'cell/{name}' for name in (
        'attend_features/bias', 'attend_features/kernel',
        'attend_hidden/kernel', 'attend_score/kernel', 'embed/embedding',
        'gate/bias', 'gate/kernel', 'init_c/bias', 'init_c/kernel',
        'init_h/bias', 'init_h/kernel', 'lstm/hf/bias', 'lstm/hf/kernel',
        'lstm/hg/bias', 'lstm/hg/kernel', 'lstm/hi/bias', 'lstm/hi/kernel',
        'lstm/ho/bias', 'lstm/ho/kernel', 'lstm/if/kernel', 'lstm/ig/kernel',
        'lstm/ii/kernel', 'lstm/io/kernel', 'output_context/bias',
        'output_context/kernel', 'output_hidden/bias', 'output_hidden/kernel',
        'output_logits/bias', 'output_logits/kernel')
}


def test_variables(variables):
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'encoder', 'decoder'}
  assert set(variables['batch_stats']) == {'encoder'}
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  # The decoder's attention keys read the encoder's channels.
  keys = variables['params']['decoder']['cell']['attend_features']['kernel']
  assert keys.shape == (resnet.feature_dim(ARCH), 12)
  # The decoder's paths as trained checkpoints hold them.
  decoder = {'/'.join(key.key for key in path) for path, _ in
             jax.tree.flatten_with_path(variables['params']['decoder'])[0]}
  assert decoder == DECODER_PATHS


def test_shapes(variables, images, captions):
  logits, alphas = forward()(variables, images, captions)
  assert logits.shape == (B, K, L - 1, VOCAB) and logits.dtype == jnp.float32
  assert alphas.shape == (B, K, L - 1, P) and alphas.dtype == jnp.float32
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L - 1)),
                             rtol=1e-5)
  predict = models.Predict(make_model())
  features = jax.eval_shape(predict.encode, variables, {'image': images})
  assert features.shape == (B, P, resnet.feature_dim(ARCH))
  grid = jax.eval_shape(predict.grid, variables, images)
  assert grid.shape == (B, S // STRIDE, S // STRIDE, resnet.feature_dim(ARCH))


def test_predict_from_features_and_on_a_clone(variables, images, captions):
  """encode then logits is __call__, also through a clone."""
  logits, alphas = forward()(variables, images, captions)
  # The predict functions of a clone of the model (as the FLOP count runs
  # them): its decoder's scan unrolled.
  unrolled = models.Predict(make_model()).unrolled()

  def from_features(variables, images, captions):
    features = unrolled.encode(variables, {'image': images})  # [B, P, C]
    return unrolled.logits(variables, features, captions)

  split_logits, split_alphas = jit(from_features)(variables, images,
                                                  captions)
  np.testing.assert_allclose(split_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(split_alphas, alphas, rtol=1e-5, atol=1e-6)
  # The clone's fields hold: its scan unrolls all L - 1 steps.
  jaxpr = jax.make_jaxpr(from_features)(variables, images, captions)
  assert [(eqn.params['unroll'], eqn.params['length']) for eqn in jaxpr.eqns
          if eqn.primitive.name == 'scan'] == [(L - 1, L - 1)]


def test_grid_pools_features(images, captions):
  model = make_model(grid=1)
  variables = jax.eval_shape(model.init, jax.random.key(2), images, captions)
  _, alphas = jax.eval_shape(model.apply, variables, images, captions)
  assert alphas.shape == (B, K, L - 1, 1)


def test_encoder_runs_once_per_image(variables, images, captions):
  model = make_model()
  # As many convolutions for K captions as for one: one encoder pass.
  convs = [count_convs(jax.make_jaxpr(model.apply)(
      variables, images, captions[:, :k]).jaxpr) for k in (1, K)]
  encoder_kernels = [
      x for x in jax.tree.leaves(variables['params']['encoder']) if x.ndim == 4]
  assert convs == [len(encoder_kernels)] * 2
  # And K captions at once give what each gives alone.
  logits, _ = forward()(variables, images, captions)
  for k in range(K):
    one_logits, _ = forward()(variables, images, captions[:, k:k + 1])
    np.testing.assert_allclose(logits[:, k:k + 1], one_logits,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('frozen', [True, False])
def test_frozen_encoder(variables, images, captions, frozen):
  """Frozen: no gradient into the encoder, BatchNorm on running statistics.

  freeze_bn=False, so a trainable encoder's BatchNorm is live in training.
  """
  model = make_model(frozen=frozen, freeze_bn=False)

  @jit
  def grads(params):
    def total(params):
      (logits, _), updates = model.apply(
          {**variables, 'params': params}, images, captions, train=True,
          rngs={'dropout': jax.random.key(3)}, mutable=['batch_stats'])
      return logits.sum(), updates['batch_stats']
    return jax.grad(total, has_aux=True)(params)

  grads, batch_stats = grads(variables['params'])
  encoder = [np.abs(g).max() for g in jax.tree.leaves(grads['encoder'])]
  decoder = [np.abs(g).max() for g in jax.tree.leaves(grads['decoder'])]
  assert max(decoder) > 0
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool((a != b).any()), variables['batch_stats'],
      batch_stats))
  if frozen:
    assert max(encoder) == 0
    assert not any(changed)
  else:
    assert max(encoder) > 0
    assert all(changed)


def test_decode_steps_match_teacher_forcing(variables, images, captions):
  predict = models.Predict(make_model())
  logits, alphas = forward()(variables, images, captions)
  decoding = predict.decoding(variables,
                              encode()(variables, {'image': images}), K)
  step = jit(decoding.step)
  carry = decoding.carry
  for t in range(L - 1):
    carry, step_logits, alpha = step(carry, captions[..., t])
    np.testing.assert_allclose(step_logits, logits[:, :, t],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alpha, alphas[:, :, t], rtol=1e-5, atol=1e-6)


def test_jitted_decode_step_traces_once(variables, images):
  predict = models.Predict(make_model())
  features = encode()(variables, {'image': images})
  cache = predict.decoding(variables, features, K).cache
  traces = []

  @jax.jit
  def step(variables, carry, tokens, cache):
    traces.append(1)  # Runs only while tracing.
    return predict.decoding(variables, features, K,
                            cache=cache).step(carry, tokens)

  carry = predict.decoding(variables, features, K, cache=cache).carry
  tokens = jnp.full((B, K), vocab.BOS, jnp.int32)
  for _ in range(3):
    carry, logits, _ = step(variables, carry, tokens, cache)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  assert len(traces) == 1


@pytest.mark.parametrize('arch', list(resnet.ARCHS))
def test_build_every_arch(arch):
  config = model_config(arch=arch)
  config.dtype = 'bfloat16'
  model = models.build_captioner(config, VOCAB)
  assert model.dtype == jnp.bfloat16
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  captions = jax.ShapeDtypeStruct((1, 2, 4), jnp.int32)
  # eval_shape: traced, nothing computed, so resnet152 costs no FLOPs.
  (logits, _), variables = jax.eval_shape(
      model.init_with_output, jax.random.key(0), images, captions)
  assert logits.shape == (1, 2, 3, VOCAB) and logits.dtype == jnp.float32
  keys = variables['params']['decoder']['cell']['attend_features']['kernel']
  assert keys.shape == (resnet.feature_dim(arch), 12)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32


def test_build_rejects_bad_config():
  config = model_config()
  config.dtype = 'float64'
  with pytest.raises(UserError, match='dtype'):
    models.build_captioner(config, VOCAB)
  with pytest.raises(UserError, match='arch'):
    models.build_captioner(model_config(arch='resnet_huge'), VOCAB)


def test_normalization_on_the_device():
  pixels = jnp.full((1, 4, 4, 3), jnp.array([255, 128, 0], jnp.uint8))
  out = captioner_lib.normalize(pixels, 'imagenet')
  np.testing.assert_allclose(
      out[0, 0, 0], (np.array([255, 128, 0]) / 255 - [0.485, 0.456, 0.406]) /
      [0.229, 0.224, 0.225], rtol=1e-5)
  out = captioner_lib.normalize(pixels, 'caffe')
  np.testing.assert_allclose(out[0, 0, 0], [0 - 103.939, 128 - 116.779,
                                            255 - 123.68], rtol=1e-5)


def test_the_model_takes_uint8_pixels():
  model = make_model()
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  captions = jnp.ones((2, 1, 5), jnp.int32)
  # Compiled, not run op by op: eagerly, the three forward passes below
  # and the initialiser took 8 s of CPU.
  variables = random_variables(model.init, images, captions)
  from_uint8, _ = jax.jit(model.apply)(variables, jnp.asarray(images),
                                       captions)
  from_float, _ = jax.jit(model.apply)(
      variables, jnp.asarray(images, jnp.float32), captions)
  np.testing.assert_array_equal(from_uint8, from_float)
  # The normalisation is the model's: 'caffe' gives other features.
  caffe = models.build_captioner(model_config(), VOCAB, 'caffe')
  other, _ = jax.jit(caffe.apply)(variables, jnp.asarray(images), captions)
  assert np.abs(np.asarray(other) - np.asarray(from_uint8)).max() > 1e-3
  with pytest.raises(UserError, match='normalization'):
    models.build_captioner(model_config(), VOCAB, 'bgr')
