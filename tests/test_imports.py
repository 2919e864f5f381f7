"""The package's import graph has no circle, the config imports no plugin, and the registries find every built-in.

The graph is read from the source (ast), as Python runs it at import time: module-level imports, including those
under a module-level `if` or `try`, but not under `if TYPE_CHECKING:` (which never runs); a module's import of
its parent package is left out (`--noparent`), since every submodule has that arrow.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysel.registry import POLICIES, SCORERS, Registry, UnknownName

PACKAGE = Path(__file__).resolve().parents[1] / "raysel"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    files = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module is imported (if/try bodies flattened, TYPE_CHECKING left out)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
        else:
            out.append(node)
    return out


def imported(module: str, path: Path, nodes: list[ast.stmt], modules: set[str]) -> set[str]:
    """The package's modules that these import statements import (`from a import b` is a.b when b is a module)."""
    targets = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t in modules and t != module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        nodes = _module_level(ast.parse(path.read_text()).body)
        parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        graph[module] = imported(module, path, nodes, set(files)) - parents
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reader_sees_module_level_imports_only(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n")
    (package / "a.py").write_text("import pkg.b\ntry:\n    from pkg.sub import c\nexcept ImportError:\n    pass\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\ndef f():\n    from pkg import a\n"
    )
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\nfrom . import d\n")
    (package / "sub" / "d.py").write_text("")
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub.c"},
        "pkg.b": set(),
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.sub.d"},  # the arrow to pkg.sub (its parent) is left out
        "pkg.sub.d": set(),
    }
    assert circles(graph) == [["pkg.a", "pkg.sub.c"]]


def test_raysel_has_no_import_circle():
    graph = import_graph()
    assert "raysel.config" in graph and "raysel.scorers.lm" in graph  # the reader found the package
    assert circles(graph) == []


def _plugin_modules() -> tuple[str, ...]:
    return SCORERS.builtins + POLICIES.builtins


def _imports_anywhere(path: Path) -> set[str]:
    """Every module named in an import of this file, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", ["raysel.config", "raysel.registry", "raysel.scorers", "raysel.select"])
def test_the_config_and_the_registries_import_no_plugin(module):
    path = module_files()[module]
    plugins = [m for m in _imports_anywhere(path) if any(m == p or m.startswith(p + ".") for p in _plugin_modules())]
    assert plugins == [], f"{module} imports the plugins {plugins}"


def test_loading_the_config_loads_no_plugin_until_a_name_is_looked_up():
    code = (
        "import sys, raysel.config\n"
        f"plugins = {list(_plugin_modules())!r}\n"
        "print(sorted(m for m in plugins if m in sys.modules))\n"
        "raysel.config.SelectConfig(budget=0.5, policy='topk')\n"
        "print(sorted(m for m in plugins if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    out = out.stdout.split("\n")
    assert out[0] == "[]"
    assert "raysel.select.simple" in out[1]  # the first lookup imported the built-ins


def decorated_names(decorator: str) -> dict[str, str]:
    """Name -> module for every `@decorator("name", ...)` in the package's source: what the registry must find."""
    names = {}
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for d in node.decorator_list:
                    if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == decorator:
                        names.update({arg.value: module for arg in d.args if isinstance(arg, ast.Constant)})
    return names


BUILTINS = [(SCORERS, name, module) for name, module in sorted(decorated_names("register_scorer").items())] + [
    (POLICIES, name, module) for name, module in sorted(decorated_names("register_policy").items())
]


def test_the_source_declares_the_builtins():
    assert {"entropy", "loss", "el2n_lm", "lm_influence"} <= {name for r, name, _ in BUILTINS if r is SCORERS}
    assert {"random", "stratified", "bandit", "mig"} <= {name for r, name, _ in BUILTINS if r is POLICIES}


@pytest.mark.parametrize(("registry", "name", "module"), BUILTINS, ids=[f"{r.kind}-{n}" for r, n, _ in BUILTINS])
def test_each_builtin_is_found_by_name(registry, name, module):
    """A plugin module whose line in raysel/registry.py is missing fails here: the lookup does not import it."""
    cls = registry[name]
    assert cls.__module__ == module
    assert any(module == m or module.startswith(m + ".") for m in registry.builtins)


def test_the_registries_hold_the_builtins_and_nothing_else():
    for registry in (SCORERS, POLICIES):
        assert sorted(registry) == sorted(name for r, name, _ in BUILTINS if r is registry)


def test_a_miss_names_the_known_names():
    with pytest.raises(UnknownName, match=r"unknown policy 'stratifed'; choose from \['bandit', .*'stratified'"):
        POLICIES["stratifed"]
    assert "stratifed" not in POLICIES
    assert POLICIES.get("stratifed") is None  # a KeyError too, so Mapping.get works


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules written by a test; they leave sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_builtins_load_on_the_first_lookup_and_register_themselves(plugin_dir):
    shapes = Registry("shape", builtins=("shapes_square",))
    (plugin_dir / "shapes_square.py").write_text(
        "from test_imports_registry import SHAPES\n@SHAPES.register('square', 'box')\nclass Square: ...\n"
    )
    (plugin_dir / "test_imports_registry.py").write_text("SHAPES = None\n")
    import test_imports_registry

    test_imports_registry.SHAPES = shapes
    assert "shapes_square" not in sys.modules
    assert shapes["box"] is shapes["square"]
    assert "shapes_square" in sys.modules
    assert sorted(shapes) == ["box", "square"]


def test_a_name_registered_twice_is_refused_with_both_classes(plugin_dir):
    shapes = Registry("shape", builtins=())

    @shapes.register("square")
    class Square: ...

    with pytest.raises(ValueError, match=r"shape 'square' is registered twice \(.*Square and .*Other\); register"):

        @shapes.register("square")
        class Other: ...

    assert shapes["square"] is Square


def test_a_users_plugin_cannot_take_a_builtins_name_before_the_builtins_load(plugin_dir):
    shapes = Registry("shape", builtins=("shapes_builtin",))
    (plugin_dir / "test_imports_registry.py").write_text("SHAPES = None\n")
    import test_imports_registry

    test_imports_registry.SHAPES = shapes
    (plugin_dir / "shapes_builtin.py").write_text(
        "from test_imports_registry import SHAPES\n@SHAPES.register('square')\nclass Square: ...\n"
    )
    with pytest.raises(ValueError, match="shape 'square' is registered twice"):

        @shapes.register("square")  # the built-in module loads first, then this one is refused
        class MySquare: ...


def test_a_users_policy_is_usable_by_name_in_a_config():
    from raysel import register_policy
    from raysel.config import SelectConfig
    from raysel.select import Policy

    @register_policy("test_imports_everything")
    class Everything(Policy):
        needs_score = False

    try:
        assert POLICIES[SelectConfig(budget=1.0, policy="test_imports_everything").policy] is Everything
    finally:
        del POLICIES["test_imports_everything"]
    assert "test_imports_everything" not in POLICIES
