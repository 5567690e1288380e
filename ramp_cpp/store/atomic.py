"""Write-to-temp-then-rename, so no command ever leaves a half-written output behind: a temp file is
`.NAME.tmp-PID` beside its destination, and one whose process was killed (SIGKILL runs no cleanup) is
removed by the next run over that folder (`sweep_temps`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
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
    tmp = p.with_name(temp_name(p.name))
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def pid_gone(pid: int) -> bool:
    """No process `pid` runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def temp_name(name: str) -> str:
    """The name of a temp file for `name` of this process: `.NAME.tmp-PID`, what `sweep_temps` finds."""
    return f".{name}.tmp-{os.getpid()}"


def sweep_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the `.NAME.tmp-PID…` files and folders under `root` whose process no longer runs (what a killed
    run left half-written, and what was derived from it, e.g. `.x.tmp-PID.assembled`); return them. A live
    process's temp files are left alone."""
    gone: list[Path] = []
    base = Path(root)
    if not base.is_dir():
        return gone
    for p in base.rglob(".*.tmp-*"):
        pid = re.search(r"\.tmp-(\d+)", p.name)
        if pid is not None and pid_gone(int(pid.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone
