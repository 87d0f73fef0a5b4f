"""capjax's commands collect garbage rarely, from before their imports."""

import gc
import subprocess
import sys

import pytest

from capjax import garbage
from conftest import REPO

# Runs a command's module as `python -m` does, with --help, and prints the
# young generation's threshold at the moment the command first imports JAX.
_PROBE = '''
import gc, runpy, sys
seen = []

class Finder:
  def find_spec(self, name, path=None, target=None):
    if name == 'jax' and not seen:
      seen.append(gc.get_threshold()[0])

sys.meta_path.insert(0, Finder())
sys.argv = [sys.argv[1], '--help']
try:
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
except SystemExit:
  pass
print(seen)
'''


def test_only_the_young_generation_is_collected_more_rarely():
  before = gc.get_threshold()
  try:
    gc.set_threshold(700, 7, 9)
    garbage.collect_rarely()
    assert gc.get_threshold() == (garbage.YOUNG, 7, 9)
  finally:
    gc.set_threshold(*before)


@pytest.mark.parametrize('command', ['capjax.main', 'capjax.tune',
                                     'capjax.caption', 'capjax.benchmark'])
def test_commands_set_it_before_importing_jax(command):
  out = subprocess.run([sys.executable, '-c', _PROBE, command], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout
  assert out.strip().splitlines()[-1] == f'[{garbage.YOUNG}]', out[-2000:]
