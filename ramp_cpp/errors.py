"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""

import errno
import os
import shutil

#: below this many free bytes, a failed write is taken for a full disk
NEARLY_FULL = 16 << 20


class RampError(Exception):
    """A problem with the user's input or environment, described in one line."""


class OtherSettings(RampError):
    """A run directory holds a run made with other settings (the demo, which owns its directories, starts
    such a run over; a user's --out is never removed)."""


def out_of_space(path: str | os.PathLike[str]) -> "RampError | None":
    """The one-line error for a write to `path` that failed on a (nearly) full file system; None when the
    file system has room (the failure was something else)."""
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= NEARLY_FULL:
        return None
    return RampError(
        f"out of disk space writing {os.path.basename(path)} in {folder} ({free / 2**20:.1f} MiB free): free "
        "some or point --out (or RAMP_CACHE_DIR) elsewhere, then run the same command again: finished stages "
        "are kept"
    )


def from_os_error(e: OSError) -> RampError:
    """An OSError as one line: a full disk says so and what to do, anything else names the file."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename:
        full = out_of_space(e.filename)
        if full is not None:
            return full
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RampError(f"out of disk space ({e.strerror}): free some, then run the same command again")
    where = f"{e.filename}: " if e.filename else ""
    return RampError(f"{where}{e.strerror or e}")
