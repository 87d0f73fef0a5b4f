"""Data parallelism: one per-device step, two wrappers.

The train and eval steps are written once, for one device's share of the
batch, with collectives over the axis `AXIS` (`lax.pmean`, `lax.psum`). Two
wrappers run them on every device of every process:

  * 'jit' (the form JAX recommends): `jax.jit` of `jax.shard_map` over a 1-D
    mesh of all devices. The state is replicated (`P()`), the batch split
    along its first axis (`P('data')`) and assembled from each process's
    local batch with `jax.make_array_from_process_local_data`.
  * 'pmap': `jax.pmap` over the local devices; the state carries a leading
    axis of one replica per local device, the batch [devices, per_device, ...].

Both keep the state in the same canonical form outside the loop (one copy,
what checkpoints hold), and `Parallel.put_state` / `get_state` convert.

Inside a step, this module owns every collective, so that an objective
computes its loss over the batch it sees and reads the same under both
wrappers: `device_rng` (the random stream of this device at this step),
`total` (sums over the global batch), `gradients` (of the global loss, from
this device's share of it), `mean` (of what each device estimated alone:
BatchNorm statistics) and `first` (the first device's value, for logs).
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from capjax.errors import UserError

AXIS = 'data'
KINDS = ('jit', 'pmap')


# --- Inside a step: the collectives. ----------------------------------------


def device_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """This device's key at `step`: a pure function of (seed, step, device),
  so a resumed run draws what the straight one drew."""
  return jax.random.fold_in(jax.random.fold_in(rng, step),
                            jax.lax.axis_index(AXIS))


def total(tree: Any) -> Any:
  """Sums over the devices' shares: the global batch's."""
  return jax.lax.psum(tree, AXIS)


def mean(tree: Any) -> Any:
  """The mean over devices of what each estimated from its share alone
  (BatchNorm's batch statistics)."""
  return jax.lax.pmean(tree, AXIS)


def first(x: jax.Array) -> jax.Array:
  """The first device's `x`, on every device (examples for the logs)."""
  return jax.lax.all_gather(x, AXIS)[0]


def gradients(loss_fn: Callable[..., Any], params: Any) -> tuple[Any, Any]:
  """(the gradient of the global loss in `params`, this device's aux).

  `loss_fn(params) -> (share, aux)` gives this device's share of the
  global loss: its batch's sums over the global batch's counts (`total`),
  so that the shares add up to the loss of one device holding the whole
  batch; the gradients add up the same way.
  """
  n = jax.lax.psum(1, AXIS)

  def scaled(params):
    share, aux = loss_fn(params)
    return n * share, aux

  # The mean of n times each share's gradient is their sum. (A sum of the
  # shares' own gradients is the same in exact arithmetic, but rounds
  # otherwise where XLA flushes tiny values to zero: this form keeps the
  # numbers of runs trained before it.)
  grads, aux = jax.grad(scaled, has_aux=True)(params)
  return mean(grads), aux


class Parallel:
  """Places states and batches, and wraps per-device steps, for one kind."""

  def __init__(self, config: ml_collections.ConfigDict):
    if config.parallel not in KINDS:
      raise UserError(f'unknown --config.parallel={config.parallel!r}; choose '
                      f'one of {", ".join(KINDS)}')
    if config.batch_size % jax.device_count():
      raise UserError(
          f'--config.batch_size={config.batch_size} is not divisible by the '
          f'{jax.device_count()} devices; use a multiple of '
          f'{jax.device_count()}')
    self.kind = config.parallel
    self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  # --- The state. ---------------------------------------------------------

  def put_state(self, state: Any) -> Any:
    """Canonical state -> the form the wrapped step takes."""
    if self.kind == 'jit':
      return jax.device_put(state, self.replicated)
    return self._replicas(jax.tree.map(_local, state))

  def get_state(self, state: Any) -> Any:
    """The wrapped step's state -> canonical (the first replica for pmap)."""
    if self.kind == 'jit':
      return state
    return jax.tree.map(lambda x: x[0], state)

  def put_constant(self, tree: Any) -> Any:
    """A tree the steps read but never change (a lookup table), placed on
    every device once; name its argument in `step(constant_argnums=...)`."""
    if self.kind == 'jit':
      return jax.device_put(tree, self.replicated)
    return self._replicas(tree)

  def _replicas(self, tree: Any) -> Any:
    # A copy on every local device, as pmap's own outputs are: pmap then
    # reads them in place, and sees the same kind of input at every call
    # (host arrays at the first call and device ones after would compile
    # the step twice).
    n = jax.local_device_count()
    return jax.pmap(lambda x: x, axis_name=AXIS)(
        jax.tree.map(lambda x: _stack(x, n), tree))

  # --- Batches. -----------------------------------------------------------

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """This process's batch -> the global batch of the wrapped step."""
    if self.kind == 'jit':
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              self.batch_sharding, x), batch)
    n = jax.local_device_count()
    return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)

  # --- Steps. -------------------------------------------------------------

  def step(self, fn: Callable[..., Any], donate_state: bool = True,
           batch_argnums: tuple[int, ...] = (1,),
           constant_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
    """Wraps `fn(state, batch, *rest) -> outputs`, written per device.

    The state (argument 0) is in `put_state` form; arguments in
    `batch_argnums` are split over devices (`put_batch` form); the others
    (an rng) are the same everywhere, and those in `constant_argnums` are
    already placed by `put_constant`. When `donate_state`, the first output
    is the new state (same form) and the rest must be the same on every
    device (reduced with `lax.pmean` / `psum`); otherwise all outputs must.
    """
    donate = (0,) if donate_state else ()
    if self.kind == 'pmap':
      mapped = jax.pmap(fn, axis_name=AXIS, donate_argnums=donate)

      def call(*args):
        out = mapped(*_pmap_args(args, batch_argnums + constant_argnums))
        if donate_state:
          return (out[0],) + tuple(jax.tree.map(_first, o) for o in out[1:])
        return jax.tree.map(_first, out)
      # For cost analysis (benchmarks): the compiled step of these arguments.
      call.lower = lambda *args: mapped.lower(
          *_pmap_args(args, batch_argnums + constant_argnums))
      return call

    # The step's outputs are replicated by its own pmean/psum.
    return self._shard_map(fn, batch_argnums, P(), donate)

  def map(self, fn: Callable[..., Any],
          batch_argnums: tuple[int, ...] = (1,)) -> Callable[..., Any]:
    """Wraps `fn(state, batch, *rest) -> outputs`, one row per batch row.

    Like `step`, but nothing is reduced across devices: each device computes
    the rows of its own share (decoding), and the outputs are the global
    batch's rows, split over devices; `fetch` brings them to the host.
    """
    if self.kind == 'pmap':
      mapped = jax.pmap(fn, axis_name=AXIS)

      def call(*args):
        out = mapped(*_pmap_args(args, batch_argnums))
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
      return call
    return self._shard_map(fn, batch_argnums, P(AXIS), ())

  def fetch(self, tree: Any) -> Any:
    """Rows of the global batch (outputs of `map`, or process-local
    batches) -> NumPy arrays of all of them, on every process."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  def _shard_map(self, fn, batch_argnums, out_specs, donate):
    @functools.cache
    def compiled(num_args):
      in_specs = tuple(P(AXIS) if i in batch_argnums else P()
                       for i in range(num_args))
      # check_vma=False gives the step pmap's semantics: a gradient taken on
      # one device is that device's own, and the step averages it with
      # lax.pmean. (With the check on, JAX would already sum the gradients
      # of the replicated parameters over devices, and the pmean would not
      # undo that.)
      return jax.jit(
          jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                        out_specs=out_specs, check_vma=False),
          donate_argnums=donate)

    call = lambda *args: compiled(len(args))(*args)
    call.lower = lambda *args: compiled(len(args)).lower(*args)
    return call


def _pmap_args(args, placed_argnums):
  # What is the same everywhere (not the state, a batch or a constant) gets
  # its device axis here.
  n = jax.local_device_count()
  return [a if i == 0 or i in placed_argnums
          else jax.tree.map(lambda x: _stack(x, n), a)
          for i, a in enumerate(args)]


def _first(x):
  # The first device's copy of a pmap output, read in place (x[0] would send
  # the index to the device at every step).
  return x.addressable_data(0).reshape(x.shape[1:])


def _local(x):
  # A replicated global array -> this process's copy, for pmap.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return x


def _stack(x, n):
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    # Broadcast where the key is, on the device: no round trip through the
    # host at every step.
    data = jax.random.key_data(x)
    return jax.random.wrap_key_data(
        jnp.broadcast_to(data, (n,) + data.shape), impl=jax.random.key_impl(x))
  return np.stack([np.asarray(x)] * n)
