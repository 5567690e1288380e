"""The package's floors (ARCHITECTURE.md): every import inside ramp_cpp runs to the same folder or a lower
floor, no module imports itself back through a loop, and the edges keep their jobs (only cli/ imports typer
and rich, only llama/ imports llama_cpp). Read from the source with `ast`, so the check needs nothing
installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ramp_cpp"

# lowest first; a folder may import its own floor and the ones below it
FLOORS: list[set[str]] = [
    {"errors", "costs", "executor"},
    {"store", "model"},
    {"llama"},
    {"calibration", "write"},
    {"fold", "measure"},
    {"allocate"},
    {"pipeline"},
    {"cli"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
# third-party modules that belong to one edge only
EDGE_ONLY = {"typer": "cli", "rich": "cli", "llama_cpp": "llama", "ray": "executor"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            assert n.level == 0, f"{path}:{n.lineno}: relative import (the package uses absolute ones)"
            base = n.module or ""
            out.append((base, n.lineno))
            out.extend((f"{base}.{a.name}", n.lineno) for a in n.names)  # `from pkg import module`
        elif isinstance(n, ast.Import):
            out.extend((a.name, n.lineno) for a in n.names)
    return out


def _folder(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


MODULES = _modules()
GRAPH = {
    m: sorted({i for i, _ in _imports(p) if i in MODULES and i not in (m, "ramp_cpp")})
    for m, p in MODULES.items()
}


def test_every_folder_has_a_floor():
    folders = {_folder(m) for m in MODULES if _folder(m)}
    assert folders <= set(FLOOR), f"folders without a floor in this test: {folders - set(FLOOR)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _folder(m)))
def test_no_import_runs_up_a_floor(module):
    here = FLOOR[_folder(module)]
    up = [
        f"{imp} (line {line})"
        for imp, line in _imports(MODULES[module])
        if imp in MODULES and _folder(imp) and FLOOR[_folder(imp)] > here
    ]
    assert not up, f"{module} imports from a higher floor: {up}"


def test_folders_sharing_a_floor_do_not_import_each_other():
    """store/model, calibration/write, fold/measure: side by side, so neither may lean on the other (the
    ground floor's single modules, errors/costs/executor, may)."""
    across = [
        f"{m} -> {imp}"
        for m, p in MODULES.items()
        if _folder(m)
        for imp, _ in _imports(p)
        if imp in MODULES and _folder(imp) and _folder(imp) != _folder(m)
        and FLOOR[_folder(imp)] == FLOOR[_folder(m)] > 0
    ]
    assert not across, f"imports between folders of one floor: {across}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in GRAPH[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(d):], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("lib,owner", sorted(EDGE_ONLY.items()))
def test_edges_keep_their_jobs(lib, owner):
    wrong = [
        f"{m} (line {line})"
        for m, p in MODULES.items()
        for imp, line in _imports(p)
        if imp.split(".")[0] == lib and _folder(m) != owner
    ]
    assert not wrong, f"only ramp_cpp/{owner}/ may import {lib}: {wrong}"


def test_the_checks_see_a_planted_upward_import(tmp_path):
    """The walker reads what a module imports: a store module that imported the pipeline would be caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ramp_cpp.pipeline.run import run_direct\nimport typer\n")
    imports = [i for i, _ in _imports(bad)]
    assert "ramp_cpp.pipeline.run" in imports and "typer" in imports
    assert FLOOR[_folder("ramp_cpp.pipeline.run")] > FLOOR["store"]
