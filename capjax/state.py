"""The train state: what a step reads and writes, and what checkpoints hold.

`create` makes a fresh one (random init, then pretrained encoder weights
when given), `fresh` one around given weights (a run started from another
run's model), `abstract` its shapes for orbax to restore into, and
`apply_gradients` the one guarded optimizer update every objective uses.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from capjax import models
from capjax import optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self, params: Any = None,
                only: str | None = None) -> dict[str, Any]:
    """What the model's predict functions take: `params` (default: the
    state's own, a loss function passes those it differentiates) and the
    BatchNorm statistics; with `only` ('encoder'), that part of them alone.
    The one place the jobs build them."""
    variables = {'params': self.params if params is None else params,
                 'batch_stats': self.batch_stats}
    if only:
      variables = {k: {only: v[only]} for k, v in variables.items()}
    return variables


def example_inputs(config: ml_collections.ConfigDict
                   ) -> tuple[jax.Array, jax.Array]:
  """Inputs of the model's shapes, for `init`: one image, its K captions."""
  d = config.data
  images = jnp.zeros((1, d.image_size, d.image_size, 3),
                     jnp.uint8)  # [1, S, S, 3]
  captions = jnp.zeros((1, d.captions_per_image, d.max_len),
                       jnp.int32)  # [1, K, L]
  return images, captions


def fresh(params: Any, batch_stats: Any,
          tx: optax.GradientTransformation) -> TrainState:
  """Step 0 and a new optimizer state, around given weights."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params))


def create(config: ml_collections.ConfigDict, predict: models.Predict,
           tx: optax.GradientTransformation | None, rng: jax.Array,
           encoder_weights: Any = None) -> TrainState:
  """A fresh state: random init, then pretrained encoder weights if given
  ({'params', 'batch_stats'} of the encoder). `tx` None: the config's."""
  variables = predict.init(rng, *example_inputs(config))
  params, batch_stats = variables['params'], variables['batch_stats']
  if encoder_weights is not None:
    params = dict(params, encoder=encoder_weights['params'])
    batch_stats = dict(batch_stats, encoder=encoder_weights['batch_stats'])
  return fresh(params, batch_stats, tx or optimizer.make(config, params))


def abstract(config: ml_collections.ConfigDict, predict: models.Predict,
             sharding: jax.sharding.Sharding) -> TrainState:
  """The state's shapes and dtypes, placed by `sharding`; no compute."""
  shapes = jax.eval_shape(functools.partial(create, config, predict, None),
                          jax.random.key(0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      shapes)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation, batch_stats: Any = None
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
  """The optimizer update, applied only if `loss` and `grads` are finite.

  Returns the new state (its step counts either way, so that a skipped
  update does not replay the same batch's randomness), the gradient norm
  and whether the update was applied. No checkpoint ever holds a NaN.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = TrainState(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=state.batch_stats if batch_stats is None else batch_stats,
      opt_state=opt_state)
  state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                       state.replace(step=state.step + 1))
  return state, grad_norm, finite
