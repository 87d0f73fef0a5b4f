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


# ------------------------------------------------- the road to the model


def _outside_models() -> dict[str, ast.Module]:
  """The parsed modules of the package outside capjax.models."""
  return {module: ast.parse(open(path).read(), path)
          for module, path in _modules().items()
          if not module.startswith('capjax.models')}


def model_contract_breaches(trees: dict[str, ast.Module]) -> list[str]:
  """Where a module reaches the model other than by its predict functions
  (`models.Predict`) and the variables helper (`TrainState.variables`):
  a flax `method=`, a model built and not wrapped in `Predict`, a
  predict's bare `.model`, or the variables dict written out (but by the
  helper, in capjax.state)."""
  found = []
  for module, tree in trees.items():
    wrapped = set()
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and
          getattr(node.func, 'attr', getattr(node.func, 'id', '')) ==
          'Predict'):
        wrapped.update(id(arg) for arg in node.args)
    for node in ast.walk(tree):
      where = f'{module}:{getattr(node, "lineno", 0)}'
      if isinstance(node, ast.Call):
        name = getattr(node.func, 'attr', getattr(node.func, 'id', ''))
        if any(k.arg == 'method' for k in node.keywords):
          found.append(f'{where} applies a model method')
        if name == 'build_captioner' and id(node) not in wrapped:
          found.append(f'{where} holds a model, not its predict functions')
      elif (isinstance(node, ast.Attribute) and node.attr == 'model' and
            'predict' in ast.unparse(node.value)):
        found.append(f'{where} reaches past the predict functions')
      elif isinstance(node, ast.Dict) and module != 'capjax.state' and {
          k.value for k in node.keys if isinstance(k, ast.Constant)
      } == {'params', 'batch_stats'}:
        found.append(f'{where} builds the variables itself')
  return found


def test_contract_breaches_are_found():
  code = {
      'a': "v = {'params': p, 'batch_stats': b}",
      'b': 'm = models.build_captioner(c, 9)',
      'c': 'x = m.apply(v, f, method=m.encode)',
      'd': 'y = predict.model.encode',
      'e': ('p = models.Predict(models.build_captioner(c, 9))\n'
            'x = p.encode(state.variables(), batch)'),
  }
  found = model_contract_breaches({k: ast.parse(v) for k, v in code.items()})
  assert [f.split(':')[0] for f in found] == ['a', 'b', 'c', 'd']


def test_jobs_reach_the_model_by_its_predict_functions_alone():
  assert model_contract_breaches(_outside_models()) == []


_COLLECTIVES = {'psum', 'pmean', 'pmax', 'pmin', 'all_gather', 'axis_index',
                'ppermute', 'all_to_all', 'psum_scatter'}


def test_the_parallel_layer_owns_every_collective():
  """Objectives and evaluators compute over the batch they see; only
  capjax.parallel sums, averages or draws across devices."""
  found = [f'{module}:{node.lineno} {node.attr}'
           for module, path in _modules().items() if module != 'capjax.parallel'
           for node in ast.walk(ast.parse(open(path).read(), path))
           if isinstance(node, ast.Attribute) and node.attr in _COLLECTIVES]
  assert found == []
