"""The model, train step, beam search and benchmark run where only JAX is.

A GPU image has jax, flax, optax, orbax, absl, numpy and Pillow; capjax's
data and metrics libraries (TensorFlow, TFDS, grain, clu, nltk, rouge-score)
must not be needed to benchmark or train-step there
(launch/gpu_benchmark.sh).
"""

import subprocess
import sys

from conftest import REPO

BLOCKED = ('nltk', 'tensorflow', 'tensorflow_datasets', 'grain', 'keras',
           'clu', 'rouge_score')

_SCRIPT = '''
import sys
for name in %r:
  sys.modules[name] = None  # Any import of them now fails.
import functools
import jax, jax.numpy as jnp, numpy as np
from capjax import benchmark, decode, models, optimizer, parallel  # noqa
from capjax import objectives, pretrained, state as state_lib  # noqa: F401
from capjax.objectives import cross_entropy, scst  # noqa: F401
from configs import test

config = test.get_config()
model = models.build_captioner(config.model, 11)
shapes = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3), jnp.uint8),
                        jnp.zeros((1, 2, 5), int))
print(sorted(shapes))

# One train step of configs/test.py's model on random inputs.
state = jax.jit(functools.partial(state_lib.create, config, model,
                                  None))(jax.random.key(0))
tx = optimizer.make(config, state.params)
par = parallel.Parallel(config)
step = par.step(functools.partial(cross_entropy.train_step, model=model, tx=tx,
                                  config=config))
batch, _ = benchmark.synthetic_batch(config, config.batch_size, 11)
batch['image'] = np.random.default_rng(0).integers(
    0, 256, batch['image'].shape, np.uint8)
state, metrics = step(par.put_state(state), par.put_batch(batch),
                      jax.random.key(1))
print(int(par.get_state(state).step), bool(np.isfinite(metrics['loss'])))

# A beam search of two images.
variables = {'params': state.params, 'batch_stats': state.batch_stats}
captions = jax.jit(functools.partial(
    decode.beam_search, model, beam_size=2, max_len=6))(
        par.get_state(variables), jnp.asarray(batch['image'][:2]))
print(captions.tokens.shape)
''' % (BLOCKED,)


def test_model_train_step_and_decode_need_no_data_or_metric_libraries():
  out = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == "['batch_stats', 'params']"
  assert lines[1] == '1 True'  # One step, a finite loss.
  assert lines[2].startswith('(2, 1, ')  # [images, returned, positions]
