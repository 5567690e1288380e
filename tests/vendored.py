"""llama.cpp's own command-line tools for the tests that compare against them (llama-quantize,
llama-imatrix), built once from the vendored source of the llama-cpp-python sdist by bench.llama_tools,
into a folder of their own in the user's real cache (the session's cache is a temp dir, and a second
session would build again). Building takes minutes on 2 cores; a test that needs a tool is skipped, saying
why, when it cannot be built."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
# One folder for every tool a test needs: llama_tools replaces a folder built for other targets whole.
TARGETS = ("llama-imatrix", "llama-quantize")


def _real_home() -> str:
    import conftest

    return conftest._saved.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir


def _real_cache() -> Path:
    """The user's ramp-cpp cache as it was before conftest pointed RAMP_CACHE_DIR and HOME at a temp dir."""
    import conftest

    d = conftest._saved.get("RAMP_CACHE_DIR")
    return Path(d) if d else Path(_real_home()) / ".cache" / "ramp-cpp"


def tool(name: str) -> Path:
    """The built `name` (one of TARGETS), built with the others on first use."""
    assert name in TARGETS, name
    root = _real_cache() / "test-tools"
    exe = root / f"llama.cpp-tools-{VERSION}" / "bin" / name
    if os.access(exe, os.X_OK):
        return exe
    env = {**os.environ, "RAMP_CACHE_DIR": str(root), "HOME": _real_home()}  # pip's cache holds the sdist
    targets = ",".join(TARGETS)
    cmd = [sys.executable, "-m", "bench.llama_tools", "--targets", targets, "--jobs", "2", "--nice", "10"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not os.access(exe, os.X_OK):
        why = (r.stderr or r.stdout)[-300:]
        pytest.skip(f"{name} could not be built ({' '.join(cmd[1:])}): {why}")
    return exe
