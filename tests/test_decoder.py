"""Tests for the attention LSTM decoder (capjax.models.decoder)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.data import vocab
from capjax.models import decoder as decoder_lib
from conftest import random_variables

VOCAB, EMBED, HIDDEN, ATTENTION = 20, 16, 24, 12
B, K, L, P, C = 2, 3, 6, 5, 8

# On arrays this small XLA's CPU backend optimisations take longer to run
# than they save; without them each compile here takes half the time.
jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_decoder(dtype=jnp.float32, dropout_rate=0.5) -> decoder_lib.Decoder:
  return decoder_lib.Decoder(decoder_lib.AttentionLSTMCell(
      vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN,
      attention_dim=ATTENTION, dropout_rate=dropout_rate, dtype=dtype))


@functools.cache
def forward(dtype=jnp.float32, train: bool = False):
  """Jitted teacher forcing, compiled once per (dtype, train, shapes)."""
  return jit(functools.partial(make_decoder(dtype).apply, train=train))


@pytest.fixture(scope='module')
def features():
  return jax.random.normal(jax.random.key(0), (B, P, C))  # [B, P, C]


@pytest.fixture(scope='module')
def tokens():
  tokens = jax.random.randint(jax.random.key(1), (B, K, L), 4, VOCAB)
  return tokens.at[..., 0].set(vocab.BOS)  # [B, K, L]


@pytest.fixture(scope='module')
def variables(features, tokens):
  return random_variables(make_decoder().init, features, tokens)


def step_loop(variables, features, tokens):
  """Teacher forcing by a Python loop over `step`: the reference."""
  decoder = make_decoder()
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, tokens.shape[1],
                        method=decoder.initial_carry)
  step = jit(functools.partial(decoder.apply, method=decoder.step))
  all_logits, all_alphas = [], []
  for t in range(tokens.shape[2]):
    carry, logits, alpha = step(variables, carry, tokens[..., t], cache)
    all_logits.append(logits)
    all_alphas.append(alpha)
  return jnp.stack(all_logits, axis=2), jnp.stack(all_alphas, axis=2)


def intermediate_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value a jaxpr computes, nested jaxprs (scan) included."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          shapes |= intermediate_shapes(sub)
  return shapes


# The decoder's parameter tree as trained checkpoints hold it (under
# params/decoder in the captioner): changing a path breaks their restore.
# Shapes for E=16, H=24, A=12, C=8, V=20; the LSTM input is E + C = 24.
PARAMETER_TREE = {
    'params/cell/attend_features/bias': (ATTENTION,),
    'params/cell/attend_features/kernel': (C, ATTENTION),
    'params/cell/attend_hidden/kernel': (HIDDEN, ATTENTION),
    'params/cell/attend_score/kernel': (ATTENTION, 1),
    'params/cell/embed/embedding': (VOCAB, EMBED),
    'params/cell/gate/bias': (1,),
    'params/cell/gate/kernel': (HIDDEN, 1),
    'params/cell/init_c/bias': (HIDDEN,),
    'params/cell/init_c/kernel': (C, HIDDEN),
    'params/cell/init_h/bias': (HIDDEN,),
    'params/cell/init_h/kernel': (C, HIDDEN),
    'params/cell/lstm/hf/bias': (HIDDEN,),
    'params/cell/lstm/hf/kernel': (HIDDEN, HIDDEN),
    'params/cell/lstm/hg/bias': (HIDDEN,),
    'params/cell/lstm/hg/kernel': (HIDDEN, HIDDEN),
    'params/cell/lstm/hi/bias': (HIDDEN,),
    'params/cell/lstm/hi/kernel': (HIDDEN, HIDDEN),
    'params/cell/lstm/ho/bias': (HIDDEN,),
    'params/cell/lstm/ho/kernel': (HIDDEN, HIDDEN),
    'params/cell/lstm/if/kernel': (EMBED + C, HIDDEN),
    'params/cell/lstm/ig/kernel': (EMBED + C, HIDDEN),
    'params/cell/lstm/ii/kernel': (EMBED + C, HIDDEN),
    'params/cell/lstm/io/kernel': (EMBED + C, HIDDEN),
    'params/cell/output_context/bias': (EMBED,),
    'params/cell/output_context/kernel': (C, EMBED),
    'params/cell/output_hidden/bias': (EMBED,),
    'params/cell/output_hidden/kernel': (HIDDEN, EMBED),
    'params/cell/output_logits/bias': (VOCAB,),
    'params/cell/output_logits/kernel': (EMBED, VOCAB),
}


def parameter_tree(variables) -> dict[str, tuple[int, ...]]:
  """{'params/cell/embed/embedding': shape, ...} of a variables pytree."""
  return {'/'.join(key.key for key in path): tuple(leaf.shape)
          for path, leaf in jax.tree.flatten_with_path(variables)[0]}


def test_parameter_tree_is_unchanged(variables):
  assert parameter_tree(variables) == PARAMETER_TREE


def test_shapes_and_dtypes(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  assert logits.shape == (B, K, L, VOCAB) and logits.dtype == jnp.float32
  assert alphas.shape == (B, K, L, P) and alphas.dtype == jnp.float32
  decoder = make_decoder()
  cache = decoder.apply(variables, features, method=decoder.prepare)
  assert cache['features'].shape == (B, P, C)
  assert cache['keys'].shape == (B, P, ATTENTION)
  c, h = decoder.apply(variables, cache, 4, method=decoder.initial_carry)
  assert c.shape == h.shape == (B, 4, HIDDEN)
  assert c.dtype == h.dtype == jnp.float32


def test_step_path_has_the_same_parameters(variables, features, tokens):
  """Initialising through prepare/initial_carry/step gives the same tree."""

  def through_step(module, features, tokens):
    cache = module.prepare(features)
    carry = module.initial_carry(cache, tokens.shape[1])
    return module.step(carry, tokens[..., 0], cache)

  init = functools.partial(make_decoder().init, method=through_step)
  stepped = jax.eval_shape(init, jax.random.key(2), features, tokens)
  shapes = lambda v: jax.tree.map(lambda x: (x.shape, x.dtype), v)
  assert shapes(stepped) == shapes(variables)
  assert jax.tree.leaves(variables['params']['cell'])


def test_scan_equals_step_loop(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  loop_logits, loop_alphas = step_loop(variables, features, tokens)
  np.testing.assert_allclose(logits, loop_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alphas, loop_alphas, rtol=1e-5, atol=1e-6)


def test_hypotheses_broadcast_over_features(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  # Each of the K hypotheses alone.
  for k in range(K):
    one_logits, one_alphas = forward()(variables, features,
                                       tokens[:, k:k + 1])
    np.testing.assert_allclose(logits[:, k:k + 1], one_logits,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alphas[:, k:k + 1], one_alphas,
                               rtol=1e-5, atol=1e-6)
  # No step ever holds the features once per hypothesis.
  shapes = intermediate_shapes(jax.make_jaxpr(make_decoder().apply)(
      variables, features, tokens).jaxpr)
  assert (B, K, P, ATTENTION) in shapes  # The attention's tanh layer.
  assert (B, K, P, C) not in shapes and (B * K, P, C) not in shapes
  # Features tiled K times, one hypothesis per (image, k) row.
  tiled = jnp.repeat(features, K, axis=0)  # [B * K, P, C]
  tiled_logits, _ = forward()(variables, tiled, tokens.reshape(B * K, 1, L))
  np.testing.assert_allclose(logits, tiled_logits.reshape(B, K, L, VOCAB),
                             rtol=1e-5, atol=1e-5)


def test_causal(variables, features, tokens):
  """Tokens after position t change no logits at positions <= t."""
  logits, _ = forward()(variables, features, tokens)
  t = 2
  changed = tokens.at[..., t + 1:].set(vocab.PAD)
  changed_logits, _ = forward()(variables, features, changed)
  np.testing.assert_array_equal(logits[..., :t + 1, :],
                                changed_logits[..., :t + 1, :])
  assert not np.allclose(logits[..., t + 1:, :], changed_logits[..., t + 1:, :])


def test_padded_rows_do_not_affect_other_rows(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  # Image 1 all padding, and caption 0 of image 0 padded after <bos>.
  padded = tokens.at[1].set(vocab.PAD).at[0, 0, 1:].set(vocab.PAD)
  padded_logits, padded_alphas = forward()(variables, features, padded)
  np.testing.assert_array_equal(logits[0, 1:], padded_logits[0, 1:])
  np.testing.assert_array_equal(alphas[0, 1:], padded_alphas[0, 1:])


def test_eval_is_deterministic_without_dropout_rng(variables, features,
                                                   tokens):
  first, _ = forward()(variables, features, tokens)
  second, _ = forward()(variables, features, tokens)
  np.testing.assert_array_equal(first, second)
  # Training draws dropout masks, so it needs the 'dropout' rng.
  with pytest.raises(Exception, match='dropout'):
    forward(train=True)(variables, features, tokens)


def test_dropout_depends_on_rng(variables, features, tokens):
  run = lambda key: forward(train=True)(
      variables, features, tokens, rngs={'dropout': jax.random.key(key)})[0]
  eval_logits, _ = forward()(variables, features, tokens)
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))
  assert not np.allclose(run(3), eval_logits)


def test_dropout_masks_differ_across_time_steps(variables, features, tokens):
  apply = jit(functools.partial(
      make_decoder().apply, train=True, mutable=['intermediates'],
      capture_intermediates=lambda m, _: isinstance(m, nn.Dropout)))
  _, state = apply(variables, features, tokens,
                   rngs={'dropout': jax.random.key(3)})
  # Dropout's output, stacked over time on axis 2: [B, K, L, E].
  (dropped,) = state['intermediates']['cell']['output_dropout']['__call__']
  assert dropped.shape == (B, K, L, EMBED)
  kept = np.asarray(dropped != 0)
  assert 0.2 < kept.mean() < 0.8  # rate 0.5
  for t in range(1, L):
    assert (kept[:, :, t] != kept[:, :, 0]).any(), t


def test_attention_sums_to_one_and_gate_in_unit_interval(variables, features,
                                                         tokens):
  apply = jit(functools.partial(make_decoder().apply,
                                mutable=['intermediates']))
  (_, alphas), state = apply(variables, features, tokens)
  assert (alphas >= 0).all()
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)
  (beta,) = state['intermediates']['cell']['beta']
  assert beta.shape == (B, K, L)
  assert ((beta > 0) & (beta < 1)).all()


def test_bfloat16_close_to_float32(variables, features, tokens):
  # Parameters are float32 whatever the compute dtype.
  bf16_variables = jax.eval_shape(make_decoder(jnp.bfloat16).init,
                                  jax.random.key(2), features, tokens)
  for leaf in jax.tree.leaves(bf16_variables):
    assert leaf.dtype == jnp.float32
  logits, alphas = forward(jnp.bfloat16)(variables, features, tokens)
  assert logits.dtype == alphas.dtype == jnp.float32
  f32_logits, _ = forward()(variables, features, tokens)
  diff = jnp.abs(jax.nn.softmax(logits) - jax.nn.softmax(f32_logits))
  assert diff.max() < 2e-2
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)


def test_jitted_step_traces_once(variables, features):
  decoder = make_decoder()
  traces = []

  @jax.jit
  def step(variables, carry, tokens, cache):
    traces.append(1)  # Runs only while tracing.
    return decoder.apply(variables, carry, tokens, cache,
                         method=decoder.step)

  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, K, method=decoder.initial_carry)
  tokens = jnp.full((B, K), vocab.BOS, jnp.int32)
  carry, logits, _ = step(variables, carry, tokens, cache)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  carry, logits, _ = step(variables, carry, tokens, cache)
  assert len(traces) == 1
  assert logits.shape == (B, K, VOCAB)
