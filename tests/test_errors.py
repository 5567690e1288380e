"""The environment's errors as one line: a full disk says so and what to do; a stale temp file of a killed
process is swept, a live one's is not."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ramp_cpp import errors
from ramp_cpp.store.atomic import sweep_temps

NOSPC = "No space left on device"


@pytest.mark.parametrize(
    "err,free,want",
    [
        (OSError(errno.ENOSPC, NOSPC, "x.bin"), 1 << 20, "out of disk space writing x.bin"),
        (OSError(errno.ENOSPC, NOSPC, "x.bin"), 1 << 40, "out of disk space (No space"),  # the disk has room
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 1 << 40, "out of disk space (Disk quota"),
        (OSError(errno.EACCES, "Permission denied", "/r/o.gguf"), 1 << 40, "/r/o.gguf: Permission denied"),
    ],
)
def test_os_errors_become_one_line(err, free, want, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: type("U", (), {"free": free})())
    e = errors.from_os_error(err)
    assert isinstance(e, errors.RampError) and str(e).startswith(want) and "\n" not in str(e)


def test_a_roomy_disk_is_not_called_full(tmp_path):
    assert errors.out_of_space(tmp_path / "f.gguf") is None  # the test's temp dir has more than 16 MiB free


def test_the_command_line_prints_an_os_error_as_one_line(monkeypatch, tmp_path):
    from ramp_cpp.cli import app as cli

    def boom() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache.bin"))

    printed: list[str] = []
    monkeypatch.setattr(cli.err, "print", lambda msg, **k: printed.append(msg))
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(cli.typer.Exit) as ex:
        cli.guarded(boom)()
    assert ex.value.exit_code == 2
    assert len(printed) == 1 and "out of disk space writing cache.bin" in printed[0]


def test_sweep_removes_a_dead_process_temp_file_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / "cache" / f".a.bin.tmp-{dead}"
    derived = tmp_path / "cache" / f".ref-Q4_0.gguf.tmp-{dead}.assembled"  # made from a temp file
    live = tmp_path / f".b.gguf.tmp-{os.getpid()}"
    stale.parent.mkdir()
    for p in (stale, derived, live):
        p.write_bytes(b"half")
    keep = tmp_path / "c.gguf"
    keep.write_bytes(b"done")
    assert sorted(sweep_temps(tmp_path)) == sorted([stale, derived])
    assert not stale.exists() and not derived.exists() and live.exists() and keep.exists()
