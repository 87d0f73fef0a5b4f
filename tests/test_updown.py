"""Tests for the Up-Down caption decoder cell (capjax.models.updown)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.data import vocab
from capjax.models import decoder as decoder_lib
from capjax.models import updown
from conftest import random_variables

# Distinct sizes, so that a weight read with the wrong input shows in a shape.
VOCAB, EMBED, HIDDEN, ATTENTION = 11, 9, 8, 5
B, K, L, P, C = 2, 3, 5, 4, 6

# On arrays this small XLA's CPU backend optimisations take longer to run
# than they save.
jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_decoder(dtype=jnp.float32) -> decoder_lib.Decoder:
  return decoder_lib.Decoder(updown.UpDownCell(
      vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN,
      attention_dim=ATTENTION, dropout_rate=0.5, dtype=dtype))


@functools.cache
def forward(dtype=jnp.float32, train: bool = False):
  """Jitted teacher forcing, compiled once per (dtype, train, shapes)."""
  return jit(functools.partial(make_decoder(dtype).apply, train=train))


@functools.cache
def step_fn(dtype=jnp.float32):
  """Jitted `Decoder.step`, compiled once per (dtype, shapes)."""
  decoder = make_decoder(dtype)
  return jit(functools.partial(decoder.apply, method=decoder.step))


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


def parameter_tree(variables) -> dict[str, tuple[int, ...]]:
  """{'params/cell/embed/embedding': shape, ...} of a variables pytree."""
  return {'/'.join(key.key for key in path): tuple(leaf.shape)
          for path, leaf in jax.tree.flatten_with_path(variables)[0]}


def lstm_tree(name: str, inputs: int) -> dict[str, tuple[int, ...]]:
  """The leaves of an nn.OptimizedLSTMCell of HIDDEN units."""
  tree = {}
  for gate in 'ifgo':
    tree[f'params/cell/{name}/i{gate}/kernel'] = (inputs, HIDDEN)
    tree[f'params/cell/{name}/h{gate}/kernel'] = (HIDDEN, HIDDEN)
    tree[f'params/cell/{name}/h{gate}/bias'] = (HIDDEN,)
  return tree


PARAMETER_TREE = {
    'params/cell/embed/embedding': (VOCAB, EMBED),
    'params/cell/attend_features/bias': (ATTENTION,),
    'params/cell/attend_features/kernel': (C, ATTENTION),
    'params/cell/attend_hidden/kernel': (HIDDEN, ATTENTION),
    'params/cell/attend_score/kernel': (ATTENTION, 1),
    'params/cell/output_logits/bias': (VOCAB,),
    'params/cell/output_logits/kernel': (HIDDEN, VOCAB),
    # x1_t = [h2_{t-1}; v_bar; W_e Pi_t] and x2_t = [v_hat_t; h1_t].
    **lstm_tree('attention_lstm', HIDDEN + C + EMBED),
    **lstm_tree('language_lstm', C + HIDDEN),
}


def step_loop(variables, features, tokens, dtype=jnp.float32):
  """Teacher forcing by a Python loop over `Decoder.step`."""
  decoder = make_decoder(dtype)
  cache = decoder.apply(variables, features, method=decoder.prepare)
  carry = decoder.apply(variables, cache, tokens.shape[1],
                        method=decoder.initial_carry)
  all_logits, all_alphas = [], []
  for t in range(tokens.shape[2]):
    carry, logits, alpha = step_fn(dtype)(variables, carry, tokens[..., t],
                                          cache)
    all_logits.append(logits)
    all_alphas.append(alpha)
  return carry, jnp.stack(all_logits, axis=2), jnp.stack(all_alphas, axis=2)


def test_step_loop_reproduces_teacher_forcing(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  assert logits.shape == (B, K, L, VOCAB) and logits.dtype == jnp.float32
  assert alphas.shape == (B, K, L, P) and alphas.dtype == jnp.float32
  _, loop_logits, loop_alphas = step_loop(variables, features, tokens)
  np.testing.assert_allclose(logits, loop_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(alphas, loop_alphas, rtol=1e-5, atol=1e-7)
  # The recurrence matters: logits change over time for the same word.
  repeated = jnp.full_like(tokens, vocab.BOS)
  logits, _ = forward()(variables, features, repeated)
  assert not np.allclose(logits[..., 0, :], logits[..., 1, :])


def test_parameter_tree(variables, features, tokens):
  assert parameter_tree(variables) == PARAMETER_TREE

  # prepare/initial_carry/step create the same tree as teacher forcing.
  def through_step(module, features, tokens):
    cache = module.prepare(features)
    carry = module.initial_carry(cache, tokens.shape[1])
    return module.step(carry, tokens[..., 0], cache)

  init = functools.partial(make_decoder().init, method=through_step)
  stepped = jax.eval_shape(init, jax.random.key(2), features, tokens)
  assert parameter_tree(stepped) == PARAMETER_TREE
  # The scan's intermediates collection is empty: the cell sows nothing.
  _, state = jax.eval_shape(
      functools.partial(make_decoder().apply, mutable=['intermediates']),
      variables, features, tokens)
  assert not jax.tree.leaves(state)


def test_cache_and_initial_carry(variables, features):
  decoder = make_decoder()
  cache = decoder.apply(variables, features, method=decoder.prepare)
  assert cache['features'].shape == (B, P, C)
  assert cache['keys'].shape == (B, P, ATTENTION)
  np.testing.assert_allclose(cache['mean'], features.mean(axis=1),
                             rtol=1e-6)
  carry = decoder.apply(variables, cache, 4, method=decoder.initial_carry)
  assert len(carry) == 4
  for state in carry:
    assert state.shape == (B, 4, HIDDEN) and state.dtype == jnp.float32
    np.testing.assert_array_equal(state, 0)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _lstm(params, x, c, h):
  """The LSTM of eq. 2 and 6 in NumPy, on nn.OptimizedLSTMCell's weights."""
  pre = {g: (x @ params[f'i{g}']['kernel'] + h @ params[f'h{g}']['kernel'] +
             params[f'h{g}']['bias']) for g in 'ifgo'}
  c = _sigmoid(pre['f']) * c + _sigmoid(pre['i']) * np.tanh(pre['g'])
  return c, _sigmoid(pre['o']) * np.tanh(c)


def test_step_follows_the_paper_equations(variables, features, tokens):
  """One step from a non-zero carry against eq. 2-7 written in NumPy."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64),
                   variables['params']['cell'])
  rng = np.random.default_rng(5)
  carry = tuple(jnp.asarray(rng.standard_normal((B, K, HIDDEN)) * 0.5,
                            jnp.float32) for _ in range(4))
  words = tokens[..., 1]  # [B, K]
  decoder = make_decoder()
  cache = decoder.apply(variables, features, method=decoder.prepare)
  (c1, h1, c2, h2), logits, alpha = step_fn()(variables, carry, words, cache)

  v = np.asarray(features, np.float64)  # [B, P, C]
  c1_0, h1_0, c2_0, h2_0 = (np.asarray(x, np.float64) for x in carry)
  v_bar = np.broadcast_to(v.mean(axis=1)[:, None], (B, K, C))
  x1 = np.concatenate([h2_0, v_bar, p['embed']['embedding'][words]], -1)
  ref_c1, ref_h1 = _lstm(p['attention_lstm'], x1, c1_0, h1_0)  # eq. 2
  # eq. 3 with the current h1_t.
  a = np.tanh((v @ p['attend_features']['kernel'] +
               p['attend_features']['bias'])[:, None] +
              (ref_h1 @ p['attend_hidden']['kernel'])[:, :, None])
  a = (a @ p['attend_score']['kernel'])[..., 0]  # [B, K, P]
  ref_alpha = np.exp(a - a.max(-1, keepdims=True))
  ref_alpha /= ref_alpha.sum(-1, keepdims=True)  # eq. 4
  v_hat = np.einsum('bkp,bpc->bkc', ref_alpha, v)  # eq. 5
  x2 = np.concatenate([v_hat, ref_h1], -1)
  ref_c2, ref_h2 = _lstm(p['language_lstm'], x2, c2_0, h2_0)  # eq. 6
  ref_logits = (ref_h2 @ p['output_logits']['kernel'] +
                p['output_logits']['bias'])  # eq. 7

  for got, want in ((c1, ref_c1), (h1, ref_h1), (c2, ref_c2), (h2, ref_h2),
                    (alpha, ref_alpha), (logits, ref_logits)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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


def test_hypotheses_are_independent(variables, features, tokens):
  logits, alphas = forward()(variables, features, tokens)
  changed = tokens.at[:, 1, 1:].set((tokens[:, 1, 1:] + 1) % VOCAB)
  changed_logits, changed_alphas = forward()(variables, features, changed)
  np.testing.assert_array_equal(logits[:, 0], changed_logits[:, 0])
  np.testing.assert_array_equal(alphas[:, 0], changed_alphas[:, 0])
  np.testing.assert_array_equal(logits[:, 2], changed_logits[:, 2])
  assert not np.allclose(logits[:, 1, 1:], changed_logits[:, 1, 1:])
  # The attention is a distribution over the P positions.
  assert (alphas >= 0).all()
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)
  # The features are broadcast over K, never held once per hypothesis.
  shapes = intermediate_shapes(jax.make_jaxpr(make_decoder().apply)(
      variables, features, tokens).jaxpr)
  assert (B, K, P, ATTENTION) in shapes  # The attention's tanh layer.
  assert (B, K, P, C) not in shapes and (B * K, P, C) not in shapes


def test_dropout_only_in_training(variables, features, tokens):
  run = lambda key: forward(train=True)(
      variables, features, tokens, rngs={'dropout': jax.random.key(key)})
  eval_logits, eval_alphas = forward()(variables, features, tokens)
  again_logits, again_alphas = forward()(variables, features, tokens)
  np.testing.assert_array_equal(eval_logits, again_logits)
  np.testing.assert_array_equal(eval_alphas, again_alphas)
  np.testing.assert_array_equal(run(3)[0], run(3)[0])
  assert not np.allclose(run(3)[0], run(4)[0])
  assert not np.allclose(run(3)[0], eval_logits)
  # Dropout is on W_p's input only: the recurrence, and so the attention,
  # is the same as without it.
  np.testing.assert_allclose(run(3)[1], eval_alphas, rtol=1e-6, atol=1e-7)
  # Training draws dropout masks, so it needs the 'dropout' rng.
  with pytest.raises(Exception, match='dropout'):
    forward(train=True)(variables, features, tokens)


def test_bfloat16_compute(variables, features, tokens):
  # Parameters are float32 whatever the compute dtype.
  bf16_variables = jax.eval_shape(make_decoder(jnp.bfloat16).init,
                                  jax.random.key(2), features, tokens)
  assert parameter_tree(bf16_variables) == PARAMETER_TREE
  for leaf in jax.tree.leaves(bf16_variables):
    assert leaf.dtype == jnp.float32
  logits, alphas = forward(jnp.bfloat16)(variables, features, tokens)
  assert logits.dtype == alphas.dtype == jnp.float32
  np.testing.assert_allclose(alphas.sum(-1), np.ones((B, K, L)), rtol=1e-5)
  f32_logits, _ = forward()(variables, features, tokens)
  diff = jnp.abs(jax.nn.softmax(logits) - jax.nn.softmax(f32_logits))
  assert diff.max() < 2e-2
  # The bfloat16 step keeps a float32 carry and returns float32 outputs.
  carry, step_logits, step_alphas = step_loop(variables, features, tokens,
                                              jnp.bfloat16)
  for state in carry:
    assert state.dtype == jnp.float32 and state.shape == (B, K, HIDDEN)
  assert step_logits.dtype == step_alphas.dtype == jnp.float32
  np.testing.assert_allclose(step_logits, logits, rtol=2e-2, atol=2e-2)
