"""The library's shape, checked on its source: stages import only downward, no module imports another's
underscore names, every module is small enough to read in one sitting, and each package says what it exports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform" / "hone"

# Lower layers first. A module may import from its own unit (a package's modules share one) and from lower layers.
LAYERS = [
    ["assets"],
    ["storage"],
    ["config"],
    ["runtime"],
    ["registry"],
    ["artifacts"],
    ["data", "quantize.methods"],
    ["modeling"],
    ["training"],
    ["tune", "evaluation", "quantize.gate", "quantize"],
    ["serving"],
    ["pipeline"],
    ["submit"],
    ["cli"],
    ["__init__"],
]


def _unit(module: str) -> str:
    """The layer unit of a dotted module under hone: quantize.methods and quantize.gate are apart, other packages are one."""
    for unit in sorted((u for layer in LAYERS for u in layer), key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    raise AssertionError(f"hone.{module} is in no layer of tests/test_architecture.py: place it")


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
        if target in ("", "__init__") and names == ["__version__"]:
            continue  # the version, read at run time by the registry's lineage tags
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
