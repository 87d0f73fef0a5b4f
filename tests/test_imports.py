"""The model, train step, beam search and benchmark run where only JAX is.

A bare GPU image has jax, flax, optax, orbax-checkpoint, absl-py, numpy and
Pillow, and launch/gpu_benchmark.sh adds ml-collections; every other
dependency of capjax (TFDS, grain, TensorFlow, clu, nltk, simplejpeg, ...)
must not be needed to benchmark, train-step or decode there. The blocked set
is derived, not listed: pyproject.toml's dependencies and what they pull in,
less the GPU image's packages and what those pull in, so that a dependency
added to pyproject.toml is blocked here from the day it is added.
"""

import importlib.metadata
import os
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

# What a bare GPU machine has: the GPU image's packages and ml-collections,
# which launch/gpu_benchmark.sh installs from a wheel.
GPU_IMAGE = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'pillow',
             'absl-py', 'ml-collections')


def _closure(requirements: list[str]) -> set[str]:
  """The distributions `requirements` name and, from the installed
  metadata, everything they depend on (their requested extras included).

  A distribution that is not installed here (a marker for another platform)
  is kept by name, with nothing below it.
  """
  seen: dict[str, set[str]] = {}  # distribution -> extras expanded
  todo = [Requirement(r) for r in requirements]
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    extras = set(req.extras)
    if name in seen and extras <= seen[name]:
      continue
    seen[name] = seen.get(name, set()) | extras
    try:
      needs = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for need in map(Requirement, needs):
      # Markers are evaluated for this interpreter: '' is the plain
      # install, the others the extras asked for.
      if need.marker is None or any(
          need.marker.evaluate({'extra': extra})
          for extra in {''} | seen[name]):
        todo.append(need)
  return set(seen)


def dependencies() -> list[str]:
  """pyproject.toml's `[project] dependencies`."""
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']['dependencies']


def blocked_modules(requirements: list[str]) -> tuple[set[str], set[str]]:
  """(distributions, top-level import names) of `requirements` and their
  dependencies that a bare GPU machine lacks.

  Import names shared with a distribution it has (a namespace package like
  `google`) are left importable.
  """
  present = _closure(list(GPU_IMAGE))
  missing = _closure(requirements) - present
  blocked = set()
  for module, dists in importlib.metadata.packages_distributions().items():
    dists = {canonicalize_name(d) for d in dists}
    if dists & missing and not dists & present:
      blocked.add(module)
  return missing, blocked


_SCRIPT = """
import sys
# Any import of these now fails. Those the interpreter imported at start
# (setuptools' _distutils_hack, from a .pth file) are on every machine.
for name in %r:
  if name not in sys.modules:
    sys.modules[name] = None
import functools
import jax, jax.numpy as jnp, numpy as np
from capjax import benchmark, decode, models, optimizer, parallel  # noqa
from capjax import objectives, pretrained, state as state_lib  # noqa: F401
from capjax.objectives import cross_entropy, scst  # noqa: F401
from configs import test

config = test.get_config()
predict = models.Predict(models.build_captioner(config.model, 11))
shapes = jax.eval_shape(predict.init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3), jnp.uint8),
                        jnp.zeros((1, 2, 5), int))
print(sorted(shapes))

# One train step of configs/test.py's model on random inputs.
state = jax.jit(functools.partial(state_lib.create, config, predict,
                                  None))(jax.random.key(0))
par = parallel.Parallel(config)
step = par.step(functools.partial(cross_entropy.train_step, predict=predict,
                                  config=config))
batch, _ = benchmark.synthetic_batch(config, config.batch_size, 11)
batch['image'] = np.random.default_rng(0).integers(
    0, 256, batch['image'].shape, np.uint8)
state, metrics = step(par.put_state(state), par.put_batch(batch),
                      jax.random.key(1), optimizer.schedule_values(config))
print(int(par.get_state(state).step), bool(np.isfinite(metrics['loss'])))

# A beam search of two images.
variables = {'params': state.params, 'batch_stats': state.batch_stats}
captions = jax.jit(functools.partial(
    decode.beam_search, predict, beam_size=2, max_len=6))(
        par.get_state(variables), jnp.asarray(batch['image'][:2]))
print(captions.tokens.shape)

# The other decoders; the features benchmark's batches.
for name in ('updown', 'transformer'):
  config.model.decoder.name = name
  other = models.Predict(models.build_captioner(config.model, 11, max_len=5))
  print(name, sorted(jax.eval_shape(
      other.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8),
      jnp.zeros((1, 2, 5), int))['params']))
print(sorted(benchmark.as_features(config, predict, batch)))
"""


def test_blocked_set_is_pyproject_less_the_gpu_image():
  dists, modules = blocked_modules(dependencies())
  # What a bare GPU machine lacked when the benchmark first failed there.
  assert {'simplejpeg', 'nltk', 'tensorflow', 'tensorflow_datasets', 'grain',
          'keras', 'clu', 'optuna', 'huggingface_hub',
          'safetensors'} <= modules
  # Its own packages and what they pull in stay importable: scipy and
  # msgpack come with jax and flax, yaml with ml-collections.
  assert not {'jax', 'jaxlib', 'flax', 'optax', 'orbax', 'numpy', 'PIL',
              'absl', 'ml_collections', 'scipy', 'msgpack', 'yaml'} & modules
  assert 'tensorflow-cpu' in dists and 'scipy' not in dists
  # A dependency added to pyproject.toml is blocked without a word here.
  _, more = blocked_modules(dependencies() + ['pytest>=8'])
  assert 'pytest' in more - modules


def test_model_train_step_and_decode_need_no_data_or_metric_libraries():
  _, modules = blocked_modules(dependencies())
  out = subprocess.run(
      [sys.executable, '-c', _SCRIPT % (sorted(modules),)], cwd=REPO,
      text=True, capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == "['batch_stats', 'params']"
  assert lines[1] == '1 True'  # One step, a finite loss.
  assert lines[2].startswith('(2, 1, ')  # [images, returned, positions]
  assert lines[3:5] == ["updown ['decoder', 'encoder']",
                        "transformer ['decoder', 'encoder']"]
  assert lines[5] == "['captions', 'features', 'image/id', 'mask']"
