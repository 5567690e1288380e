"""The command line's shape (issue 38): one product per command, each showing only its own options; each
command in the module named after it; no command body longer than a screen (60 lines)."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest
from typer.testing import CliRunner

from ramp_cpp.cli.app import COMMANDS, app

runner = CliRunner()
MAX_BODY = 60
#: commands that share a module by design: the model commands of cli/models.py
SHARED = {"inspect": "models", "offgrid": "models"}


def _options(command: str) -> set[str]:
    r = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.output))


#: the whole-file search's options and the paper's search's options that the other must not show
SIZED_ONLY = {
    "--size",
    "--method",
    "--dry-run",
    "--sensitivity",
    "--tensor-cache",
    "--row-sample",
    "--refine-probes",
    "--evaluations",
    "--rollouts",
    "--force-allocation",
    "--workers",
    "--ray",
    "--types",
}
PAPER_ONLY = {
    "--budget",
    "--budget-mode",
    "--metric",
    "--bits",
    "--episodes",
    "--warmup",
    "--updates",
    "--eval-every",
    "--resume",
    "--include-embeddings",
}


def test_search_and_paper_search_show_only_their_own_options() -> None:
    search, paper = _options("search"), _options("paper-search")
    assert search >= SIZED_ONLY and not search & PAPER_ONLY, (search & PAPER_ONLY, SIZED_ONLY - search)
    assert paper >= PAPER_ONLY and not paper & SIZED_ONLY, (paper & SIZED_ONLY, PAPER_ONLY - paper)


def test_help_states_the_true_defaults() -> None:
    """apply's --recipe and --fold name their real defaults (issue 38: it said paper, and "search's
    default")."""
    out = runner.invoke(app, ["apply", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    flat = " ".join(out.split())
    assert "search's default" not in flat and "[default: paper]" not in flat
    assert "default: bench for a sized policy" in flat
    out = runner.invoke(app, ["search", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    assert "default: bench" in " ".join(out.split())


@pytest.mark.parametrize("name,fn", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_each_command_lives_in_the_module_named_after_it(name: str, fn: object) -> None:
    module = fn.__module__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]
    assert module == SHARED.get(name, name.replace("-", "_")), (name, fn.__module__)  # type: ignore[attr-defined]


def body_lines(source: str) -> int:
    """Lines of a function's body, docstring to last line (the signature's options not counted)."""
    (node,) = ast.parse(textwrap.dedent(source)).body
    assert isinstance(node, ast.FunctionDef)
    return node.end_lineno - node.body[0].lineno + 1  # type: ignore[operator]


@pytest.mark.parametrize("name,fn", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_no_command_body_is_longer_than_a_screen(name: str, fn: object) -> None:
    lines = body_lines(inspect.getsource(fn))  # type: ignore[arg-type]
    assert lines <= MAX_BODY, f"{name}: {lines} lines in its body"


def test_the_count_is_of_the_body_alone() -> None:
    sig = "def f(\n" + "    a: int = 1,\n" * 80 + ") -> None:\n"
    assert body_lines(sig + '    """doc\n    more"""\n' + "    x = 1\n" * 3) == 5
