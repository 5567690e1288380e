"""Scratch folders: named by PID, and those of dead processes swept by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ramp_cpp.store.cache import scratch_dir, scratch_root, sweep_scratch


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_only_dead_processes_folders(tmp_path: Path) -> None:
    dead = tmp_path / f"ramp-episode-{_dead_pid()}-abcd"
    alive = tmp_path / f"ramp-episode-{os.getpid()}-efgh"
    other = tmp_path / "ramp-episode-notapid"  # an older layout: left alone
    for d in (dead, alive, other):
        d.mkdir()
        (d / "episode.gguf").write_bytes(b"x")
    assert sweep_scratch(tmp_path) == [dead]
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_scratch_dir_follows_the_environment_and_sweeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAMP_SCRATCH_DIR", str(tmp_path / "s"))
    assert scratch_root() == tmp_path / "s"
    stale = tmp_path / "s" / f"ramp-groups-{_dead_pid()}-zz"
    stale.mkdir(parents=True)
    d = scratch_dir("episode")
    assert d.parent == tmp_path / "s" and d.name.startswith(f"ramp-episode-{os.getpid()}-")
    assert not stale.exists()
