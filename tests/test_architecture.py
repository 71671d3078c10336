"""The library's shape, checked on its source: stages import only downward, no module imports another's
underscore names, every module is small enough to read in one sitting, and each package says what it exports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform" / "hone"

# Lower layers first. A module may import from its own unit (a package's modules share one) and from lower layers.
# Every top-level module and package of hone is one unit (a package's modules share it); no unit is split or exempted.
LAYERS = [
    ["errors", "version"],
    ["assets"],
    ["storage"],
    ["config"],
    ["privacy"],
    ["runtime"],
    ["data"],
    ["registry"],
    ["artifacts"],
    ["quantized"],
    ["modeling"],
    ["grammar"],
    ["generation"],
    ["training"],
    ["tune", "evaluation", "quantize"],
    ["serving"],
    ["pipeline", "comparison"],
    ["submit"],
    ["cli"],
    ["__init__"],
]
LONGEST_FUNCTION = 100  # lines, decorators and docstring included


def _unit(module: str) -> str:
    """The layer unit of a dotted module under hone: its top-level module or package."""
    unit = module.split(".")[0]
    if unit not in {u for layer in LAYERS for u in layer}:
        raise AssertionError(f"hone.{module} is in no layer of tests/test_architecture.py: place it")
    return unit


LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported hone module, names) for every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "hone" or node.module.startswith("hone.")):
            base = node.module.removeprefix("hone").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                as_path = ROOT / sub.replace(".", "/")
                target = sub if as_path.with_suffix(".py").exists() or as_path.is_dir() else base
                found.append((target or "__init__", [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("hone."), []) for a in node.names if a.name.startswith("hone.")]
    return found


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_imports_go_downward_and_use_public_names(module):
    own = _unit(module)
    for target, names in _imports(MODULES[module]):
        unit = _unit(target)
        if unit != own and not target.startswith(module + "."):  # a package's __init__ re-exports its own modules
            assert LEVEL[unit] < LEVEL[own], f"hone.{module} imports hone.{target}, a layer above or beside it"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"hone.{module} imports underscore names {private} from hone.{target}"


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_modules_are_small_and_declare_their_exports(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= 500, f"hone.{module} has {lines} lines: split it by concern"
    mod = importlib.import_module(f"hone.{module}" if module != "__init__" else "hone")
    if module not in ("cli",):
        exported = getattr(mod, "__all__", None)
        assert exported, f"hone.{module} has no __all__"
        missing = [name for name in exported if not hasattr(mod, name)]
        assert not missing, f"hone.{module}.__all__ names what it does not define: {missing}"


def _graph() -> dict[str, set[str]]:
    """Module → the hone modules it imports (lazy imports included; a package's ``__init__`` re-exports are left out:
    they import downward into their own package)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        graph[module] = {t for t, _ in _imports(path) if t in MODULES and t != module and MODULES[t].name != "__init__.py"}
    return graph


def test_no_module_imports_itself_back():
    """No cycle between modules, inside a package included (two modules that need each other are one concern, or a
    third module holds what both need)."""
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " → ".join(f"hone.{m}" for m in cycle))
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def _functions(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out.append((node.name, node.end_lineno - first + 1))
    return out


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_functions_read_on_a_screen_or_two(module):
    long = [(name, n) for name, n in _functions(MODULES[module]) if n > LONGEST_FUNCTION]
    assert not long, f"hone.{module}: {long} over {LONGEST_FUNCTION} lines: split by step"


def test_the_version_is_the_package_s():
    import tomllib

    from hone.version import __version__

    pyproject = tomllib.loads((ROOT.parents[1] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
