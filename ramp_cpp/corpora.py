"""Named text corpora. `wikitext2-test` is the held-out evaluation text; `wikitext2-valid` is the only
text calibration and the search reward may use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RampError


@dataclass(frozen=True)
class Corpus:
    name: str
    relpath: str  # under a data directory
    hf_dataset: tuple[str, str, str]  # (path, config, split) for the `datasets` library
    held_out: bool  # never to be used for calibration or search


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "wikitext2-test", "wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test"), True
        ),
        Corpus("wikitext2-valid", "wikitext-2/valid.txt", ("wikitext", "wikitext-2-v1", "validation"), False),
    )
}


def data_dirs() -> list[Path]:
    """Where named corpora are looked up: $RAMP_DATA_DIR, then ../shared/data beside the checkout or cwd."""
    dirs = []
    if os.environ.get("RAMP_DATA_DIR"):
        dirs.append(Path(os.environ["RAMP_DATA_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [
        repo.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _from_datasets(c: Corpus) -> str | None:
    try:
        import datasets
    except ImportError:
        return None
    try:
        ds = datasets.load_dataset(*c.hf_dataset[:2], split=c.hf_dataset[2])
    except Exception:
        return None
    return "".join(ds["text"])


def _read(path: Path) -> str:
    # newline="" keeps CRLF: llama-perplexity reads raw bytes, and so must we to get its tokens.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def load_text(spec: str) -> tuple[str, str]:
    """(text, where it came from) for a file path or a corpus name."""
    p = Path(spec)
    if p.is_file():
        return _read(p), str(p)
    c = CORPORA.get(spec)
    if c is None:
        if p.suffix or os.sep in spec:
            raise RampError(f"{spec}: no such file")
        raise RampError(f"unknown text {spec!r}: give a file path or one of {', '.join(CORPORA)}")
    for d in data_dirs():
        f = d / c.relpath
        if f.is_file():
            return _read(f), str(f)
    text = _from_datasets(c)
    if text is not None:
        return text, f"datasets:{'/'.join(c.hf_dataset)}"
    looked = ", ".join(str(d / c.relpath) for d in data_dirs())
    raise RampError(
        f"text {spec!r} not found (looked in {looked}; the `datasets` library is not installed or offline)"
    )
