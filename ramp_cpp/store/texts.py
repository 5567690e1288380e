r"""Named text corpora. `wikitext2-test` is the held-out evaluation text; `wikitext2-valid` is the only
text calibration and the search reward may use.

A name is the released file `relpath`, looked up in each of `data_dirs()`. Where none holds it, the
`datasets` library fetches the split from the Hugging Face hub, the file is rebuilt from its rows byte for
byte, checked against the released file's sha256 and written into the ramp-cpp cache's `data/` (one of the
data dirs), so later runs read it offline and the evaluated bytes never depend on where the text came from.

The hub's wikitext rows are the original lines read in text mode, so "\r\n" arrives as "\n": a line with
any non-space character is a row ending in "\n", a blank line is the row "". The released file is rebuilt as

    file = concat over rows r, skipping line(r) is None, of  line(r) + newline
    line(r) = r without its trailing "\n" when r != "",  else blank

with `newline` and `blank` (None: the released file has no blank lines) taken from the corpus record.

A built text (`BUILT`) is made here from texts every installation has: `mixed-code-prose` interleaves whole
`wikitext2-valid` articles with whole Python source files of the running interpreter's standard library
(`STDLIB_CODE`, a fixed list), for calibrating code models on code as well as prose. Its bytes depend on the
Python version's sources, so each build is kept as `<cache>/data/built/<name>-<sha256[:12]>.txt` (the
source `load_text` names) and a calibration on it records the text's sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import cache_dir

# The checkout this package runs from; ../shared sits beside it on the developers' machines and CI.
CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Corpus:
    name: str
    relpath: str  # under a data directory
    hf_dataset: tuple[str, str, str]  # (path, config, split) for `datasets.load_dataset`
    held_out: bool  # never to be used for calibration or search
    sha256: str  # of the released file: a text rebuilt from the hub must have exactly these bytes
    newline: str  # line end of the released file
    blank: str | None  # a blank line of the released file (the hub's row ""); None: it has none


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        # What llama.cpp's scripts/get-wikitext-2.sh unpacks: CRLF ends, blank lines removed (2,891 lines).
        Corpus(
            "wikitext2-test",
            "wikitext-2-raw/wiki.test.raw",
            ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
            held_out=True,
            sha256="4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
            newline="\r\n",
            blank=None,
        ),
        # The word-level split as Merity et al. released it: LF ends, blank lines " " kept (3,760 lines).
        Corpus(
            "wikitext2-valid",
            "wikitext-2/valid.txt",
            ("Salesforce/wikitext", "wikitext-2-v1", "validation"),
            held_out=False,
            sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            newline="\n",
            blank=" ",
        ),
    )
}


def fetched_dir() -> Path:
    """Where texts rebuilt from the hub are kept: follows RAMP_CACHE_DIR like every other cache."""
    return cache_dir() / "data"


def data_dirs() -> list[Path]:
    """Where named corpora are looked up, in order: $RAMP_DATA_DIR, ../shared/data beside the checkout or
    the working directory, then the texts already fetched from the hub."""
    dirs = []
    if os.environ.get("RAMP_DATA_DIR"):
        dirs.append(Path(os.environ["RAMP_DATA_DIR"]))
    dirs += [
        CHECKOUT.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
        fetched_dir(),
    ]
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def rebuild(rows: Iterable[str], c: Corpus) -> bytes:
    """The released file's bytes from the hub's rows (rule in the module docstring)."""
    lines = (r.removesuffix("\n") if r else c.blank for r in rows)
    return "".join(line + c.newline for line in lines if line is not None).encode("utf-8")


def _hub_rows(c: Corpus) -> Iterable[str]:
    """The split's rows, or RampError naming why they cannot be had (the caller adds what to do)."""
    try:
        import datasets  # only here: an import of several seconds, needed once per machine
    except ImportError as e:
        raise RampError("the `datasets` library is not installed") from e
    path, config, split = c.hf_dataset
    # offline, the hub client logs every retry: the one error line below says it all
    for name in ("datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(path, config, split=split)
        return list(ds["text"])
    except Exception as e:  # offline, hub errors, cache errors: all mean "no text from the hub"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RampError(f"loading {path} {config}/{split} failed ({why})") from e


def _fetch(c: Corpus) -> Path:
    """Rebuild `c` from the hub, check it, and keep it in the cache; the path of the kept file."""
    try:
        rows = _hub_rows(c)
    except RampError as e:
        raise RampError(
            f"text {c.name!r}: no {c.relpath} in {', '.join(map(str, data_dirs()))}, and {e}; "
            f"pass --text PATH, set RAMP_DATA_DIR to a folder holding {c.relpath}, "
            "or run once online so it is fetched and cached"
        ) from e
    data = rebuild(rows, c)
    got = hashlib.sha256(data).hexdigest()
    if got != c.sha256:
        path, config, split = c.hf_dataset
        raise RampError(
            f"text {c.name!r}: the hub's {path} {config}/{split} differs from the released {c.relpath} "
            f"(sha256 {got[:12]}..., expected {c.sha256[:12]}...); pass --text with the released file"
        )
    return _keep(fetched_dir() / c.relpath, data)


def _keep(dst: Path, data: bytes) -> Path:
    """Write `data` to `dst` in the cache, whole or not at all."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst, force=True) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise RampError(f"cannot write {dst}: {e.strerror}; set RAMP_CACHE_DIR to a writable folder") from e
    return dst


def _read(path: Path) -> str:
    # newline="" keeps CRLF: llama-perplexity reads raw bytes, and so must we to get its tokens.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


#: The code half of `mixed-code-prose`: pure-Python standard-library modules present in CPython 3.10 to 3.14
#: and never frozen (a frozen module's source may be absent), in this order. A fixed list rather than a scan
#: of the library, so a new module in a later Python does not reshuffle the text.
STDLIB_CODE = (
    "argparse", "ast", "base64", "bisect", "calendar", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "gettext", "glob", "heapq",
    "ipaddress", "json.decoder", "json.encoder", "pprint", "queue", "random", "sched", "shlex", "statistics",
    "string", "tempfile", "textwrap", "tokenize",
)
# a top-level wikitext heading " = Title = ": where one article ends and the next begins
_ARTICLE = re.compile(r"(?m)^(?= = [^=].* = $)")


def stdlib_sources(modules: Iterable[str] = STDLIB_CODE) -> list[tuple[str, str]]:
    """(module, source) of each module, read from the running interpreter's standard library."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for m in modules:
        rel = Path(*m.split("."))
        f = next((f for f in (lib / rel.with_suffix(".py"), lib / rel / "__init__.py") if f.is_file()), None)
        if f is None:
            raise RampError(f"text 'mixed-code-prose': no source of the standard library's {m} in {lib}")
        out.append((m, _read(f)))
    return out


def mix(prose: str, code: Iterable[str]) -> str:
    """Whole articles of `prose` and whole `code` files, one at a time from the half that has given fewer
    characters so far (prose on a tie), until either half runs out: about as much code as prose, and a
    calibration window mostly of one kind."""
    halves = [[a for a in _ARTICLE.split(prose) if a.strip()], [c for c in code if c.strip()]]
    given, out = [0, 0], []
    while all(halves):
        i = int(given[1] < given[0])
        block = halves[i].pop(0)
        out.append(block if block.endswith("\n") else block + "\n")
        given[i] += len(block)
    return "".join(out)


def _mixed_code_prose() -> str:
    prose, _ = load_text("wikitext2-valid")
    return mix(prose, (src for _, src in stdlib_sources()))


#: name -> builder of a text made here from what every installation has (module docstring)
BUILT = {"mixed-code-prose": _mixed_code_prose}


def built_text(name: str) -> tuple[str, str]:
    """(text, the kept copy's path) of a built text; built afresh each time (milliseconds) and kept under
    its sha256, so the path says which bytes a run used."""
    text = BUILT[name]()
    data = text.encode("utf-8")
    dst = fetched_dir() / "built" / f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.txt"
    if not dst.is_file():
        _keep(dst, data)
    return text, str(dst)


def load_text(spec: str) -> tuple[str, str]:
    """(text, where it came from) for a file path, a corpus name or a built text's name."""
    p = Path(spec)
    if p.is_file():
        return _read(p), str(p)
    if spec in BUILT:
        return built_text(spec)
    c = CORPORA.get(spec)
    if c is None:
        if p.suffix or os.sep in spec:
            raise RampError(f"{spec}: no such file")
        raise RampError(f"unknown text {spec!r}: give a file path or one of {', '.join([*CORPORA, *BUILT])}")
    for d in data_dirs():
        f = d / c.relpath
        if f.is_file():
            return _read(f), str(f)
    f = _fetch(c)
    return _read(f), str(f)
