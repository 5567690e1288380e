"""Write-to-temp-then-rename, so no command ever leaves a half-written output behind: a temp file is
`.NAME.tmp-PID` beside its destination, and one whose process was killed (SIGKILL runs no cleanup) is
removed by the next run over that folder (`sweep_temps`)."""

from __future__ import annotations

import contextlib
import os
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
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
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


def sweep_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the `.NAME.tmp-PID` files and folders under `root` whose process no longer runs (what a killed
    run left half-written); return them. A live process's temp files are left alone."""
    gone: list[Path] = []
    base = Path(root)
    if not base.is_dir():
        return gone
    for p in base.rglob(".*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and pid_gone(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone
