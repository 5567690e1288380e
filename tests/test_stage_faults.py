"""A sized search killed (kill -9) in the middle of each of its stages, or out of disk in the middle of its
tensor cache, and then the same command again: it finishes with the uninterrupted run's file, keeps no
half-written file, and holds on disk what the uninterrupted run holds.

Each run is a subprocess with its own caches (RAMP_CACHE_DIR, RAMP_SCRATCH_DIR), so that a stage the
reference run made is not found ready by the next one. The fault comes from a small launcher (written into
the test's temp dir) that wraps `costs.Meter.stage`: when the named stage starts it arms a timer that sends
SIGKILL to the process halfway through that stage's duration in the reference run, or fills the disk.

A timer that fires after its stage ended kills nothing: the stage's end and the kill share a lock, and the
launcher writes the stage's name to a mark file just before it kills, so a kill that did not land inside the
named stage (a faster run this time) is seen, and the test tries again sooner instead of passing on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range

pytestmark = pytest.mark.slow

LAUNCHER = '''
import contextlib, os, signal, sys, threading
from ramp_cpp import costs

stage, fault, arg = sys.argv[1], sys.argv[2], sys.argv[3]
inner = costs.Meter.stage
inside = threading.Lock()  # held by the timer from its look at `running` to the kill: the stage cannot end
running = False


def kill_if_inside():
    with inside:
        if running:
            with open(os.environ["RAMP_TEST_KILL_MARK"], "w") as f:
                f.write(stage)
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def faulty(self, name):
    global running
    if name != stage:
        with inner(self, name):
            yield
        return
    if fault == "kill":
        running = True
        t = threading.Timer(float(arg), kill_if_inside)
        t.daemon = True  # a timer still waiting when the run ends does not hold the process open
        t.start()
    else:  # fill the file system holding `arg` to the last byte
        with open(os.path.join(arg, "filler"), "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\\0" * (1 << 16))
    try:
        with inner(self, name):
            yield
    finally:
        with inside:
            running = False


costs.Meter.stage = faulty
from ramp_cpp.cli.app import main

sys.argv = ["ramp-cpp", *sys.argv[4:]]
main()
'''


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "RAMP_CACHE_DIR": str(root / "cache"), "RAMP_SCRATCH_DIR": str(root / "scratch"),
            "PYTHONUNBUFFERED": "1"}


def _held(run: Path) -> dict[str, int]:
    """What a run folder holds: each file's size, but for the reports (their timings differ)."""
    return {str(p.relative_to(run)): p.stat().st_size for p in run.rglob("*")
            if p.is_file() and p.suffix not in (".json", ".md", ".png", ".log")}


def _leftovers(*roots: Path) -> list[str]:
    return [str(p) for r in roots if r.exists() for p in r.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def job(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The command, and its uninterrupted run: the file, what its folder holds, each stage's wall time."""
    root = tmp_path_factory.mktemp("faults")
    (root / "recipe.toml").write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    args = [
        "search", "--model", str(tiny_model), "--method", "greedy", "--size", size,
        "--text", str(text_file), "--recipe", str(root / "recipe.toml"), "--chunks", "2", "--ctx", "128",
        "--threads", "1", "--fold", "check", "--no-presets",
    ]
    (root / "launch.py").write_text(LAUNCHER)
    run = root / "straight"
    r = subprocess.run([sys.executable, "-c", "from ramp_cpp.cli.app import main; main()", *args,
                        "--out", str(run)], env=_env(root / "straight-env"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (gguf,) = run.glob("*ramp-*.gguf")
    costs = json.loads((run / "report.json").read_text())["costs"]["stages"]
    return {"args": args, "root": root, "sha": _sha(gguf), "held": _held(run),
            "stages": {c["stage"]: c["wall_s"] for c in costs}}


STAGES = ("calibrate", "fold", "base log-probs", "presets", "tensor cache + proxy (folded)",
          "group probes (folded)", "fold decision", "allocate", "evaluate")


def test_the_reference_run_has_every_stage_killed_below(job: dict[str, Any]) -> None:
    assert set(STAGES) <= set(job["stages"]), sorted(job["stages"])


#: every stage halfway, and the longest ones (a llama.cpp pass or a probe file in flight) at other points too
CACHE = "tensor cache + proxy (folded)"
KILLS = [(s, 0.5) for s in STAGES] + [(CACHE, 0.2), (CACHE, 0.8), ("group probes (folded)", 0.8)]


@pytest.mark.parametrize("stage,at", KILLS)
def test_killed_mid_stage_then_the_same_command_finishes_the_same(
    job: dict[str, Any], stage: str, at: float, tmp_path: Path
) -> None:
    launch = [sys.executable, str(job["root"] / "launch.py")]
    delay = max(0.005, job["stages"][stage] * at)
    for attempt in range(4):  # a stage that ran faster than in the reference run: again, killed sooner
        root = tmp_path / f"try{attempt}"
        run, env = root / "run", {**_env(root), "RAMP_TEST_KILL_MARK": str(tmp_path / f"killed{attempt}")}
        args = [*job["args"], "--out", str(run)]
        killed = subprocess.run([*launch, stage, "kill", str(delay), *args], env=env, capture_output=True,
                                text=True)
        if Path(env["RAMP_TEST_KILL_MARK"]).is_file():
            break
        assert killed.returncode == 0, killed.stderr[-2000:]  # not killed: it must have finished
        delay /= 4
    else:
        pytest.fail(f"no kill landed inside {stage!r} (last delay {delay * 4:.4f} s)")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert Path(env["RAMP_TEST_KILL_MARK"]).read_text() == stage  # killed while the stage ran
    again = subprocess.run([sys.executable, "-c", "from ramp_cpp.cli.app import main; main()", *args],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    (gguf,) = run.glob("*ramp-*.gguf")
    assert _sha(gguf) == job["sha"]
    assert not _leftovers(run, root / "cache", root / "scratch")  # the killed run's temp files too
    assert _held(run) == job["held"]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("stage", ["tensor cache + proxy (folded)", "group probes (folded)", "allocate"])
def test_out_of_disk_mid_stage_is_one_line_and_the_rerun_finishes(
    job: dict[str, Any], tmp_path: Path, stage: str
) -> None:
    """The run folder and the probe files' scratch on one small file system, filled when `stage` starts."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not shutil.which("mount") or not _tmpfs(disk, "64m"):
        pytest.skip("needs a tmpfs of its own (root and mount)")
    try:
        run, env = disk / "run", {**_env(tmp_path), "RAMP_SCRATCH_DIR": str(disk / "scratch")}
        args = [*job["args"], "--out", str(run)]
        launch = [sys.executable, str(job["root"] / "launch.py")]
        full = subprocess.run([*launch, stage, "fill", str(disk), *args], env=env, capture_output=True,
                              text=True)
        assert full.returncode == 2
        errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "out of disk space" in errors[0], errors[0]
        assert not _leftovers(run, disk / "scratch")
        (disk / "filler").unlink()
        again = subprocess.run([sys.executable, "-c", "from ramp_cpp.cli.app import main; main()", *args],
                               env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-3000:]
        (gguf,) = run.glob("*ramp-*.gguf")
        assert _sha(gguf) == job["sha"]
        assert _held(run) == job["held"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
