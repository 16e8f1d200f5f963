"""The package's architecture, checked from the source: each layer imports only layers below it (type-only imports
under `if TYPE_CHECKING:` included, and no module imports the `hf_ema` facade above them all), modules import no
cycle (type-only imports included), the library never imports the app, and no module reads another object's private
attributes (private upstream APIs live in `hf_ema/compat/`)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_ema"

# Lowest first. A module may import its own layer's and lower layers' modules, never a higher layer's.
LAYERS: list[tuple[str, ...]] = [
    ("hf_ema._version", "hf_ema.errors", "hf_ema.utils", "hf_ema.compat"),
    ("hf_ema.config", "hf_ema.decay", "hf_ema.selection", "hf_ema.ema_tensor", "hf_ema.bema"),
    ("hf_ema.engine", "hf_ema.sharding"),
    ("hf_ema.model_ema", "hf_ema.update_record"),
    ("hf_ema.ema_folder", "hf_ema.weighted_sum"),
    ("hf_ema.posthoc", "hf_ema.stability"),
    ("hf_ema.tools",),
    ("hf_ema.trainer",),
    ("hf_ema.demo",),
    ("hf_ema.cli", "hf_ema.cli_types", "hf_ema.commands", "hf_ema.__main__"),
]
TOP = "hf_ema"  # `hf_ema/__init__.py`: the public facade, above everything (lazy)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    if module == TOP:
        return len(LAYERS)
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, type_only: bool = True) -> list[tuple[str, int]]:
    """(imported module, line) for every import: those executed at run time, and with `type_only` also those under
    `if TYPE_CHECKING:` (a type-only import is still an arrow of the design)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_only:
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                out.append((target, child.lineno))
                # `from . import x` / `from .pkg import mod`: the submodule is imported too
                for alias in child.names:
                    out.append((f"{target}.{alias.name}", child.lineno))
            visit(child)

    visit(tree)
    return out


def _internal_edges() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in _imports(module, path):
            if target in modules and target != module:
                edges[module].add(target)
    return edges


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_lower_layer_imports_a_higher_one():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        if module == TOP:
            continue
        for target, line in _imports(module, path):
            if target not in modules:
                continue
            # `from .. import x` imports the facade, which sits above every layer (`_layer(TOP)`).
            if _layer(target) > _layer(module):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {module} (layer {_layer(module)}) imports {target} "
                    f"(layer {_layer(target)})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = _internal_edges()
    # A package's `__init__` re-exports its submodules: edges into a package mean "into one of its submodules",
    # so the `__init__` -> submodule edges are not part of a cycle through the package.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_the_app():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for module, path in _modules().items()
        for target, line in _imports(module, path)
        if target == "serve" or target.startswith(("serve.", "hf_ema.app", "gradio"))
    ]
    assert not offenders, offenders


_SELF_NAMES = {"self", "cls", "super"}


def _private_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in _SELF_NAMES:
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{name}")
    return found


def test_private_attributes_only_in_compat():
    """Outside `hf_ema/compat/`, no module reads a private attribute of anything but `self`."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith("hf_ema.compat"):
            continue
        offenders.extend(_private_reads(path))
    assert not offenders, "private attribute reads outside hf_ema/compat/:\n" + "\n".join(offenders)


def test_every_subpackage_is_packaged():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {_module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert config["tool"]["setuptools"]["package-dir"] == {"hf_ema.app": "serve"}
    assert all(name == "hf_ema" or name.startswith("hf_ema.") for name in listed), listed
