"""The package's layers (docs/architecture.md), read from the source: every import points down, no cycles, no
private name crosses a module boundary, configs import only the light config package."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kdjax"

# What each part of kdjax may import (besides itself). Entry points (the command-line modules and the
# kdjax.train facade) may import anything; nothing may import them, except that the commands may use the
# facade.
ENTRY_POINTS = {"kdjax.train", "kdjax.evaluate", "kdjax.cost", "kdjax.stylegan2_import", "kdjax.edm_import",
                "kdjax.sweep", "kdjax.export"}
ALLOWED = {
    "config": {"pretrained"},
    "pretrained": {"models"},  # tiny.py writes random bundles of registered models
    "core": {"config"},
    "losses": set(),
    "models": {"core"},
    "evaluation": {"core", "models", "losses"},
    "importers": {"core", "models"},
    "deploy": {"core", "models"},
    "steps": {"core", "config", "models", "losses"},
    "tasks": {"core", "config", "models", "losses", "evaluation", "steps"},
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(name: str) -> str:
    """The layer a kdjax module belongs to: its sub-package, or the top-level module's name."""
    return name.split(".")[1] if name.count(".") >= 1 else ""


def kdjax_imports(path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(imported kdjax module, names imported from it, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "kdjax"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdjax":
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if resolves_to_module(f"{node.module}.{n}")]
            plain = [n for n in names if not resolves_to_module(f"{node.module}.{n}")]
            out += [(m, [], node.lineno) for m in submodules] + ([(node.module, plain, node.lineno)] if plain else [])
    return out


def resolves_to_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    own = part_of(name)
    for target, _, line in kdjax_imports(MODULES[name]):
        if target == "kdjax" or part_of(target) == own:
            continue
        if name in ENTRY_POINTS:
            assert target not in ENTRY_POINTS - {"kdjax.train"}, f"{name}:{line} imports the command {target}"
            continue
        assert target not in ENTRY_POINTS, f"{name}:{line} imports the entry point {target}"
        assert part_of(target) in ALLOWED[own], (
            f"{name}:{line} ({own}) imports {target} ({part_of(target)}); {own} may import {sorted(ALLOWED[own])}")


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in kdjax_imports(path) if t in MODULES and t != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                                         *(ROOT / "benchmarks").glob("*.py")]), ids=str)
def test_no_private_names_across_modules(path):
    for target, names, line in kdjax_imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.relative_to(ROOT)}:{line} imports private {private} from {target}"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_only_the_light_config_package(config):
    for target, _, line in kdjax_imports(config):
        assert target == "kdjax.config" or target.startswith("kdjax.config."), f"{config.name}:{line} imports {target}"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.get_config(); "
            "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'jax', 'flax', 'optax', 'clu', 'tensorflow'}); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"reading {config.name} imported {out.stdout.strip()}"


def test_the_files_scheduled_first_exist():
    """The root conftest's LONGEST_FIRST names test files by path: a renamed file would silently lose its place."""
    tree = ast.parse((ROOT / "conftest.py").read_text())
    (names,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["LONGEST_FIRST"]]
    assert names
    missing = [name for name in names if not (ROOT / name).is_file()]
    assert not missing, f"LONGEST_FIRST in conftest.py names files that do not exist: {missing}"
