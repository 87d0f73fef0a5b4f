"""capjax's commands collect garbage rarely, from before their imports."""

import ast
import gc
import subprocess
import sys

from capjax import garbage
from conftest import REPO

COMMANDS = ('capjax.main', 'capjax.tune', 'capjax.caption', 'capjax.benchmark')

# Runs each command's module as `python -m` does, at Python's default
# thresholds, up to its first import of a library outside the standard one
# and capjax: the young generation's threshold then is printed, and the
# command stopped there. The modules it imported are forgotten before the
# next command, so that each imports its own.
_PROBE = '''
import gc, runpy, sys
seen = {}

class Stop(Exception):
  pass

class Finder:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] not in sys.stdlib_module_names | {'capjax'}:
      seen[command] = gc.get_threshold()[0]
      raise Stop

baseline = set(sys.modules)
sys.meta_path.insert(0, Finder())
for command in sys.argv[1:]:
  for name in set(sys.modules) - baseline:
    del sys.modules[name]
  gc.set_threshold(700, 10, 10)
  try:
    runpy.run_module(command, run_name='__main__')
  except Stop:
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


def test_commands_set_it_before_importing_any_library():
  out = subprocess.run([sys.executable, '-c', _PROBE, *COMMANDS], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout
  assert ast.literal_eval(out.strip().splitlines()[-1]) == {
      command: garbage.YOUNG for command in COMMANDS}, out[-2000:]
