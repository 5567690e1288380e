"""The README as a first page, and the documentation's links: every relative link in README.md, CHANGELOG.md
and docs/ names a file (and, with `#anchor`, a heading) that exists; the README's headline table and
docs/results.md's tables are what bench/readme.py writes from bench/results/."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted([README, ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(text: str, code_spans: bool = False) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, code spans removed unless `code_spans`."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line if code_spans else CODE_SPAN.sub("", line)))
    return out


def anchors(page: Path) -> set[str]:
    lines = prose(page.read_text(), code_spans=True)
    return {slug(line.lstrip("#")) for _, line in lines if line.startswith("#")}


def links(page: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose(page.read_text()) for m in LINK.finditer(line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for n, target in links(page):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{n}: {target} (no such heading)")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize(("heading", "want"), [
    ("## The paper's search (`paper-search --budget`)", "the-papers-search-paper-search---budget"),
    ("## The defaults of `search --size`", "the-defaults-of-search---size"),
    ("### Transferred sensitivity (no evaluation)", "transferred-sensitivity-no-evaluation"),
    ("## SAC rounds (`--rollouts K`)", "sac-rounds---rollouts-k"),
])
def test_slug_is_githubs(heading, want):
    assert slug(heading.lstrip("#")) == want


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# Top `x`\n\n[ok](p.md#top-x) [gone](missing.md) `[code](x.md)`\n```\n[fenced](y.md)\n# no\n```\n"
    )
    assert [t for _, t in links(page)] == ["p.md#top-x", "missing.md"]
    assert anchors(page) == {"top-x"}


def test_readme_is_a_first_page():
    text = README.read_text()
    assert len(text.encode()) <= 6 * 1024
    long = [n for n, line in prose(text) if len(line) > 300 and not line.startswith("|")]
    assert not long, f"README lines over 300 characters: {long}"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "the README holds nothing dated (CHANGELOG.md does)"
    first = "\n".join(text.splitlines()[:40])
    for must in ("make demo", "make test", "<!-- headline:begin -->", "```console"):
        assert must in first, f"{must!r} not in the README's first 40 lines"


def bench_readme() -> ModuleType:
    """bench/readme.py, as a package module where bench/ is one, else from its file."""
    if (ROOT / "bench" / "__init__.py").is_file():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        return importlib.import_module("bench.readme")
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "bench" / "readme.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def between(path: Path, begin: str, end: str) -> str:
    text = path.read_text()
    return text[text.index(begin) + len(begin):text.index(end)].strip("\n")


def test_generated_tables_are_current():
    """Edited bench/results/*.json, bench/summary.md or bench/readme.py: run bench/readme.py --no-reports."""
    mod = bench_readme()
    assert between(README, mod.HEADLINE_BEGIN, mod.HEADLINE_END) == mod.headline()
    assert between(mod.RESULTS, mod.BEGIN, mod.END) == mod.relink(mod.block(), "../")
