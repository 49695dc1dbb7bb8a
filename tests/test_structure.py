"""The package layout's rules, read from the source: no import cycle, data flows
one way (pipelines -> layers -> models -> training -> serving), flags only in
the command-line modules."""

import ast
import os

from conftest import REPO

PACKAGES = ("mtl_zoo", "pipelines")
# Modules that are command-line programs: the only ones that may read flags.
CLI_MODULES = {"mtl_zoo.train", "mtl_zoo.export", "mtl_zoo.predict", "mtl_zoo.fusion_search",
               "mtl_zoo.tune", "pipelines.convert", "pipelines.beam_convert"}


def _modules() -> dict:
  """Module name -> path, for every module of the project's packages."""
  found = {}
  for package in PACKAGES:
    for root, _, names in os.walk(os.path.join(REPO, package)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return found


def _imports(path: str, modules: dict) -> set:
  """The project modules `path` imports (at any depth of the file, since a
  function-level import is still a dependency)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {n for n in names if n in modules}


def _graph() -> dict:
  modules = _modules()
  graph = {m: _imports(p, modules) for m, p in modules.items()}
  # A package's own __init__ importing its submodules is how a package is
  # assembled, not a dependency of the submodule on the package.
  return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def _cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(module, stack):
    state[module] = "open"
    stack.append(module)
    for dep in sorted(graph.get(module, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, stack)
        if found:
          return found
    stack.pop()
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      found = visit(module, [])
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  assert _cycle(_graph()) is None


def test_data_flows_one_way():
  graph = _graph()
  for module, deps in graph.items():
    if module.startswith("pipelines"):
      assert not [d for d in deps if d.startswith("mtl_zoo")], module
    if module.startswith("mtl_zoo.layers"):
      assert not [d for d in deps if d.startswith("mtl_zoo.") and not
                  d.startswith(("mtl_zoo.layers", "mtl_zoo._keras"))], module
    if module.startswith("mtl_zoo.models"):
      assert not [d for d in deps if d.startswith("mtl_zoo.") and not d.startswith(
          ("mtl_zoo.layers", "mtl_zoo.models", "mtl_zoo._keras"))], (module, deps)
    # The search drives the runner; only its CLI uses it, and it uses no CLI.
    if not module.startswith(("mtl_zoo.tuning", "mtl_zoo.tune")):
      assert not [d for d in deps if d.startswith("mtl_zoo.tuning")], module
    if module.startswith("mtl_zoo.tuning"):
      assert not deps & CLI_MODULES, (module, deps & CLI_MODULES)


def test_only_command_line_modules_read_flags():
  readers = set()
  for module, path in _modules().items():
    tree = ast.parse(open(path, encoding="utf-8").read())
    if any(isinstance(node, ast.Name) and node.id == "FLAGS" for node in ast.walk(tree)):
      readers.add(module)
  assert readers <= CLI_MODULES, readers - CLI_MODULES
  assert "mtl_zoo.train" in readers
