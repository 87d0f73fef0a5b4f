"""Tests for the Transformer caption decoder (capjax.models.transformer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.data import vocab
from capjax.models import transformer

VOCAB, DIM, HEADS, MLP, LAYERS = 13, 16, 2, 32, 2
B, K, L, P, C, MAX_LEN = 2, 3, 6, 4, 8, 8
POSITIONS = ('sinusoidal', 'learned')

# On arrays this small XLA's CPU backend optimisations take longer to run
# than they save.
jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_decoder(positions: str = 'sinusoidal', dtype=jnp.float32,
                 dropout_rate: float = 0.1) -> transformer.TransformerDecoder:
  return transformer.TransformerDecoder(
      vocab_size=VOCAB, max_len=MAX_LEN, num_layers=LAYERS,
      num_encoder_layers=LAYERS, model_dim=DIM, num_heads=HEADS, mlp_dim=MLP,
      dropout_rate=dropout_rate, positions=positions, dtype=dtype)


@functools.cache
def forward(positions: str = 'sinusoidal', dtype=jnp.float32,
            train: bool = False):
  """Jitted teacher forcing, compiled once per (positions, dtype, train)."""
  return jit(functools.partial(make_decoder(positions, dtype).apply,
                               train=train))


@functools.cache
def stepper(positions: str = 'sinusoidal', dtype=jnp.float32,
            train: bool = False):
  """Jitted `step`: (variables, carry, tokens [B, k], cache) -> ..."""
  decoder = make_decoder(positions, dtype)
  return jit(functools.partial(decoder.apply, method=decoder.step,
                               train=train))


def prepare(variables, features, k, positions='sinusoidal',
            dtype=jnp.float32):
  """The cache and the initial carry of k hypotheses per image."""
  decoder = make_decoder(positions, dtype)
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, k, method=decoder.initial_carry)
  return cache, carry


def random_variables(init, *args, seed: int = 0):
  """Variables shaped as `init` makes them, filled by NumPy.

  `jax.eval_shape` traces `init` without compiling its initialisers, which
  on CPU takes longer than the tests. Kernels are fan-in scaled; LayerNorm
  scales near 1; biases non-zero so that they are exercised too.
  """
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    names = [getattr(key, 'key', '') for key in path]
    if names[-1] == 'kernel':
      # W^Q, W^K, W^V are D -> [H, d]; every other kernel reads all but
      # its last axis.
      heads = any(n in ('query', 'key', 'value') for n in names)
      fan_in = shape.shape[0] if heads else np.prod(shape.shape[:-1])
      value = rng.standard_normal(shape.shape) / np.sqrt(fan_in)
    elif names[-1] == 'embedding':
      value = rng.standard_normal(shape.shape) / np.sqrt(shape.shape[-1])
    elif names[-1] == 'scale':
      value = 1 + 0.1 * rng.standard_normal(shape.shape)
    else:
      value = 0.1 * rng.standard_normal(shape.shape)
    return value.astype(shape.dtype)

  return jax.tree.map_with_path(
      fill, jax.eval_shape(init, jax.random.key(0), *args))


def gather(x, index):
  """x [B, k, ...] -> x[b, index[b, j], ...], as beam search gathers."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@pytest.fixture(scope='module')
def features():
  return jax.random.normal(jax.random.key(0), (B, P, C))  # [B, P, C]


@pytest.fixture(scope='module')
def tokens():
  tokens = jax.random.randint(jax.random.key(1), (B, K, L), 4, VOCAB)
  return tokens.at[..., 0].set(vocab.BOS)  # [B, K, L]


@pytest.fixture(scope='module')
def variables(features, tokens):
  """positions -> the decoder's variables, made once per module."""
  made = {}

  def get(positions='sinusoidal'):
    if positions not in made:
      made[positions] = random_variables(make_decoder(positions).init,
                                         features, tokens)
    return made[positions]
  return get


def step_loop(variables, features, tokens, positions='sinusoidal'):
  """Teacher forcing by feeding tokens[..., t] to `step`, t = 0, 1, ..."""
  cache, carry = prepare(variables, features, tokens.shape[1], positions)
  step = stepper(positions)
  all_logits, all_alphas = [], []
  for t in range(tokens.shape[2]):
    carry, logits, alpha = step(variables, carry, tokens[..., t], cache)
    all_logits.append(logits)
    all_alphas.append(alpha)
  np.testing.assert_array_equal(carry['position'], tokens.shape[2])
  return jnp.stack(all_logits, axis=2), jnp.stack(all_alphas, axis=2)


@pytest.mark.parametrize('positions', POSITIONS)
def test_step_loop_equals_parallel_forward(variables, features, tokens,
                                           positions):
  logits, alphas = forward(positions)(variables(positions), features, tokens)
  assert logits.shape == (B, K, L, VOCAB) and logits.dtype == jnp.float32
  assert alphas.shape == (B, K, L, P) and alphas.dtype == jnp.float32
  loop_logits, loop_alphas = step_loop(variables(positions), features,
                                       tokens, positions)
  np.testing.assert_allclose(loop_logits, logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loop_alphas, alphas, rtol=1e-4, atol=1e-5)


def test_step_path_creates_the_same_parameters(variables, features, tokens):
  """`init` through prepare/initial_carry/step gives `__call__`'s tree."""

  def through_step(module, features, tokens):
    cache = module.prepare(features)
    carry = module.initial_carry(cache, tokens.shape[1])
    return module.step(carry, tokens[..., 0], cache)

  decoder = make_decoder('learned')
  stepped = jax.eval_shape(
      functools.partial(decoder.init, method=through_step),
      jax.random.key(2), features, tokens)
  shapes = lambda v: jax.tree.map(lambda x: (x.shape, x.dtype), v)
  assert shapes(stepped) == shapes(variables('learned'))
  assert set(variables('learned')['params']) == {
      'feature_embed', 'feature_norm', 'grid_positions', 'encoder_layers_0',
      'encoder_layers_1', 'encoder_norm', 'embed', 'word_positions',
      'decoder_layers_0', 'decoder_layers_1', 'decoder_norm', 'output'}
  assert 'word_positions' not in variables('sinusoidal')['params']


def test_causal(variables, features, tokens):
  """Changing the token at position t changes no logits before t."""
  logits, alphas = forward()(variables(), features, tokens)
  t = 3
  changed = tokens.at[..., t].set(4 + (tokens[..., t] - 3) % (VOCAB - 4))
  assert (changed[..., t] != tokens[..., t]).all()
  changed_logits, changed_alphas = forward()(variables(), features, changed)
  np.testing.assert_array_equal(changed_logits[..., :t, :],
                                logits[..., :t, :])
  np.testing.assert_array_equal(changed_alphas[..., :t, :],
                                alphas[..., :t, :])
  assert not np.allclose(changed_logits[..., t, :], logits[..., t, :])


def test_carry_gathered_along_hypotheses(variables, features, tokens):
  """Reordering the carry and tokens on axis 1 reorders the next logits."""
  cache, carry = prepare(variables(), features, K)
  for leaf in jax.tree.leaves(carry):
    assert leaf.shape[:2] == (B, K), leaf.shape
  step = stepper()
  for t in range(2):
    next_carry, _, _ = step(variables(), carry, tokens[..., t], cache)
    # A step keeps the carry's structure, shapes and dtypes (a while loop's
    # state must).
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), next_carry) ==
            jax.tree.map(lambda x: (x.shape, x.dtype), carry))
    carry = next_carry
  order = jnp.array([[2, 0, 1], [1, 1, 0]])  # [B, K]; a beam may repeat.
  gathered = jax.tree.map(lambda x: gather(x, order), carry)
  _, logits, alpha = step(variables(), gathered,
                          gather(tokens[..., 2], order), cache)
  _, ref_logits, ref_alpha = step(variables(), carry, tokens[..., 2], cache)
  np.testing.assert_allclose(logits, gather(ref_logits, order), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(alpha, gather(ref_alpha, order), rtol=1e-5,
                             atol=1e-6)
  # The hypotheses differ, so the reordering is visible.
  assert not np.allclose(logits, ref_logits)


def test_hypotheses_at_different_positions(variables, features, tokens):
  """Each row of the carry steps from its own position."""
  cache, carry = prepare(variables(), features, K)
  step = stepper()
  carries, logits = [carry], []
  for t in range(L):
    carry, step_logits, _ = step(variables(), carry, tokens[..., t], cache)
    carries.append(carry)
    logits.append(step_logits)
  # Rows of image 0 at positions 1, 4, 2; of image 1 at 3, 0, 5.
  at = np.array([[1, 4, 2], [3, 0, 5]])  # [B, K]
  pick = lambda i, j, x: x[i, j]
  mixed = jax.tree.map(
      lambda *leaves: jnp.stack([jnp.stack([
          leaves[at[i, j]][i, j] for j in range(K)]) for i in range(B)]),
      *carries)
  np.testing.assert_array_equal(mixed['position'], at)
  mixed_tokens = jnp.take_along_axis(tokens, jnp.asarray(at)[..., None],
                                     axis=2)[..., 0]  # [B, K]
  _, mixed_logits, _ = step(variables(), mixed, mixed_tokens, cache)
  expected = np.array([[pick(i, j, logits[at[i, j]]) for j in range(K)]
                       for i in range(B)])  # [B, K, V]
  np.testing.assert_allclose(mixed_logits, expected, rtol=1e-5, atol=1e-6)


def test_alphas_are_distributions(variables, features, tokens):
  _, alphas = forward()(variables(), features, tokens)
  assert (alphas >= 0).all()
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)
  cache, carry = prepare(variables(), features, K)
  _, _, alpha = stepper()(variables(), carry, tokens[..., 0], cache)
  assert alpha.shape == (B, K, P) and alpha.dtype == jnp.float32
  assert (alpha >= 0).all()
  np.testing.assert_allclose(alpha.sum(-1), np.ones((B, K)), rtol=1e-5)


def test_dropout_only_when_training(variables, features, tokens):
  run = lambda key: forward(train=True)(
      variables(), features, tokens, rngs={'dropout': jax.random.key(key)})
  eval_logits, eval_alphas = forward()(variables(), features, tokens)
  # Evaluation draws nothing: deterministic, and needs no rng.
  again_logits, again_alphas = forward()(
      variables(), features, tokens, rngs={'dropout': jax.random.key(5)})
  np.testing.assert_array_equal(eval_logits, again_logits)
  np.testing.assert_array_equal(eval_alphas, again_alphas)
  np.testing.assert_array_equal(run(3)[0], run(3)[0])
  assert not np.allclose(run(3)[0], run(4)[0])
  assert not np.allclose(run(3)[1], run(4)[1])  # The encoder's dropout too.
  assert not np.allclose(run(3)[0], eval_logits)
  with pytest.raises(Exception, match='dropout'):
    forward(train=True)(variables(), features, tokens)
  # The step, likewise.
  cache, carry = prepare(variables(), features, K)
  step = lambda key: stepper(train=True)(
      variables(), carry, tokens[..., 0], cache,
      rngs={'dropout': jax.random.key(key)})[1]
  assert not np.allclose(step(3), step(4))
  _, first, _ = stepper()(variables(), carry, tokens[..., 0], cache)
  _, second, _ = stepper()(variables(), carry, tokens[..., 0], cache)
  np.testing.assert_array_equal(first, second)


def test_bfloat16(variables, features, tokens):
  bf16_variables = jax.eval_shape(make_decoder(dtype=jnp.bfloat16).init,
                                  jax.random.key(2), features, tokens)
  for leaf in jax.tree.leaves(bf16_variables):
    assert leaf.dtype == jnp.float32
  logits, alphas = forward(dtype=jnp.bfloat16)(variables(), features, tokens)
  assert logits.dtype == alphas.dtype == jnp.float32
  f32_logits, _ = forward()(variables(), features, tokens)
  diff = jnp.abs(jax.nn.softmax(logits) - jax.nn.softmax(f32_logits))
  assert diff.max() < 5e-2
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)
  cache, carry = prepare(variables(), features, K, dtype=jnp.bfloat16)
  for leaf in carry['keys'] + carry['values']:
    assert leaf.dtype == jnp.bfloat16
  carry, logits, alpha = stepper(dtype=jnp.bfloat16)(
      variables(), carry, tokens[..., 0], cache)
  assert logits.dtype == alpha.dtype == jnp.float32
  assert carry['keys'][0].dtype == jnp.bfloat16
  assert np.isfinite(logits).all()


def test_memory_not_tiled_over_hypotheses(variables, features, tokens):
  """No value holds the memory or its keys once per hypothesis."""
  decoder = make_decoder()
  jaxpr = jax.make_jaxpr(decoder.apply)(variables(), features, tokens).jaxpr
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert (B, P, HEADS, DIM // HEADS) in shapes  # The memory's keys.
  assert (B, K, P, HEADS, DIM // HEADS) not in shapes
  assert (B, K, P, DIM) not in shapes and (B * K, P, DIM) not in shapes


def test_tokens_longer_than_max_len(variables, features):
  long = jnp.full((B, K, MAX_LEN + 1), vocab.BOS, jnp.int32)
  decoder = make_decoder()
  with pytest.raises(ValueError, match=r'length 9 .* max_len=8'):
    decoder.apply(variables(), features, long)
  with pytest.raises(ValueError, match='max_len'):
    jax.eval_shape(decoder.init, jax.random.key(0), features, long)
  # max_len tokens fit.
  logits, _ = forward()(variables(), features, long[..., :MAX_LEN])
  assert logits.shape == (B, K, MAX_LEN, VOCAB)
