"""The benchmark's layout: `bench` is a package run with `python -m` (no script edits `sys.path`), the
harness in bench/ never imports a study, and bench/studies/README.md indexes every study and no study that
is gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
STUDIES = BENCH / "studies"
SCRIPTS = sorted(BENCH.rglob("*.py"))


def _studies() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_layout_has_its_parts():
    assert (BENCH / "__init__.py").is_file() and (STUDIES / "__init__.py").is_file()
    assert len(_studies()) >= 20 and len(SCRIPTS) > len(_studies())


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_no_script_edits_sys_path(path):
    assert "sys.path" not in path.read_text()


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_the_harness_imports_no_study(path):
    assert not any(m == "bench.studies" or m.startswith("bench.studies.") for m in _imported(path))


def test_the_index_lists_every_study_and_only_those():
    index = (STUDIES / "README.md").read_text()
    listed = set(re.findall(r"`bench\.studies\.(\w+)", index))
    assert listed == set(_studies())
