"""Write-to-temp-then-rename, so no command ever leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ramp_cpp.errors import RampError


def check_output(dst: str | os.PathLike[str], force: bool) -> Path:
    p = Path(dst)
    if p.exists() and not force:
        raise RampError(f"{p} exists (use --force to overwrite)")
    if not p.parent.exists():
        raise RampError(f"{p.parent}: no such directory")
    return p


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds."""
    p = check_output(dst, force)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
