"""The model runs where TensorFlow, TFDS and grain are not installed."""

import subprocess
import sys

from conftest import REPO

_SCRIPT = '''
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'grain', 'keras'):
  sys.modules[name] = None  # Any import of them now fails.
import jax, jax.numpy as jnp
from capjax import config, models, pretrained  # noqa: F401
c = config.defaults()
c.model.encoder.arch = 'resnet_tiny'
model = models.build_captioner(c.model, vocab_size=11)
shapes = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 2, 5), int))
print(sorted(shapes))
'''


def test_model_needs_no_tensorflow_tfds_or_grain():
  out = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "['batch_stats', 'params']"
