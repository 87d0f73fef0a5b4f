"""The package's import graph: no cycles, and the loop above the parts."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, 'capjax')


def _modules() -> dict[str, str]:
  """Module name -> file, for every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        out['.'.join(parts)] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports, at the top or inside
  functions alike (a cycle through a lazy import is still a cycle)."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from capjax import train` names a module; `from capjax.data.vocab
        # import PAD` a module's attribute.
        names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
        names = [n for n in names if n in modules][:1]
      else:
        continue
      targets.update(n for n in names if n in modules and n != module)
    graph[module] = targets
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` (a list of modules, first repeated at the
  end), or None."""
  state = {}  # module -> 1 on the current path, 2 done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert find_cycle(graph) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert 'capjax.train' in graph and graph['capjax.train'], graph
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """`graph` with each subpackage (capjax.data, capjax.metrics, ...) made
  one node; modules at the top (capjax.train) stay nodes of their own."""
  def node(module):
    return '.'.join(module.split('.')[:2])
  packages = {}
  for module, targets in graph.items():
    packages.setdefault(node(module), set()).update(
        node(t) for t in targets if node(t) != node(module))
  return packages


def test_package_graph_finds_an_upward_import():
  # capjax.data.a importing capjax.metrics.b, which imports capjax.data.c,
  # is no cycle of modules but one of packages: one of them is above the
  # other, and the lower one reaches up.
  graph = {'capjax.data.a': {'capjax.metrics.b'},
           'capjax.metrics.b': {'capjax.data.c'}, 'capjax.data.c': set()}
  assert find_cycle(graph) is None
  assert find_cycle(package_graph(graph)) == [
      'capjax.data', 'capjax.metrics', 'capjax.data']


def test_packages_import_one_way():
  """No two subpackages import each other, even through different modules:
  the layers of the package, not only its modules, form no cycle."""
  cycle = find_cycle(package_graph(import_graph()))
  assert cycle is None, ' -> '.join(cycle)


def test_layers_import_downwards():
  """main -> train -> objectives, evaluators -> state, losses, decode, data:
  nothing below imports anything above it."""
  graph = import_graph()

  def reaches(source, target):
    seen, todo = set(), [source]
    while todo:
      node = todo.pop()
      if node == target:
        return True
      if node not in seen:
        seen.add(node)
        todo += graph[node]
    return False

  above = {'capjax.main', 'capjax.train', 'capjax.evaluate', 'capjax.start',
           'capjax.cache_features', 'capjax.tune'} | {
               m for m in graph if m.startswith('capjax.tuning')}
  below = ['capjax.objectives', 'capjax.evaluators', 'capjax.state',
           'capjax.losses', 'capjax.decode', 'capjax.models', 'capjax.data',
           'capjax.checkpoint', 'capjax.inference']
  for low in below:
    for high in above:
      assert not reaches(low, high), f'{low} imports {high}'
  assert reaches('capjax.main', 'capjax.train')
  assert reaches('capjax.tune', 'capjax.train')
  assert reaches('capjax.train', 'capjax.objectives')
  assert reaches('capjax.train', 'capjax.evaluators')
