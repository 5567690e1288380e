"""`apply` of a sized policy runs like `search --size` (issue 38): a named run folder that the same command
resumes after kill -9, a `--dry-run` whose evaluation units stay at or below the search's, and the never-worse
rule: a file that scores worse on the reward text than llama.cpp's preset of the same size is replaced by the
preset's own file (report.json says so and by how much), unless --force-allocation keeps it.

The policy is the shipped `policies/across-3-proxy` (trained across models on proxy states), applied zero-shot
to the synthetic model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range

POLICY = Path(__file__).resolve().parents[1] / "policies" / "across-3-proxy.policy.safetensors"
CLI = [sys.executable, "-c", "from ramp_cpp.cli.app import main; main()"]
runner = CliRunner()

#: kill -9 the process `delay` seconds after the sized run's stage `stage` starts (costs.Meter.stage)
KILLER = """
import contextlib, os, signal, sys, threading
from ramp_cpp import costs

stage, delay = sys.argv[1], float(sys.argv[2])
inner = costs.Meter.stage


@contextlib.contextmanager
def killing(self, name):
    if name == stage:
        open(os.environ["KILL_MARK"], "w").write(name)  # the kill landed in this stage
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    with inner(self, name):
        yield


costs.Meter.stage = killing
from ramp_cpp.cli.app import main

sys.argv = ["ramp-cpp", *sys.argv[3:]]
main()
"""


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RAMP_CACHE_DIR": str(root / "cache"),
        "RAMP_SCRATCH_DIR": str(root / "scratch"),
        "PYTHONUNBUFFERED": "1",
    }


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def common(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("apply")
    recipe = root / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    text = ["--text", str(text_file), "--recipe", str(recipe), "--threads", "1"]
    return {"root": root, "size": size, "text": text}


def _apply(tiny_model: Path, out: Path, size: str, text: list[str], *more: str) -> list[str]:
    return ["apply", str(POLICY), str(tiny_model), "-o", str(out), "--size", size, *text, *more]


@pytest.mark.slow
def test_apply_killed_mid_stage_resumes_with_the_same_command(
    tiny_model: Path, common: dict[str, Any], tmp_path: Path
) -> None:
    """kill -9 inside the tensor cache stage, then the same command: the file an uninterrupted apply writes,
    from the run folder beside the output (OUT.run) that the killed run left."""
    args = _apply(tiny_model, tmp_path / "straight.gguf", common["size"], common["text"])
    r = subprocess.run([*CLI, *args], env=_env(tmp_path / "env-straight"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "straight.run" / "run.json").is_file()  # the run folder stays beside the output
    costs = json.loads((tmp_path / "straight.run" / "report.json").read_text())["costs"]["stages"]
    walls = {c["stage"]: c["wall_s"] for c in costs}
    stage = "tensor cache + proxy (folded)"
    assert stage in walls, sorted(walls)

    out, env = tmp_path / "killed.gguf", _env(tmp_path / "env-killed")
    env["KILL_MARK"] = str(tmp_path / "mark")
    (tmp_path / "kill.py").write_text(KILLER)
    args = _apply(tiny_model, out, common["size"], common["text"])
    killed = subprocess.run(
        [sys.executable, str(tmp_path / "kill.py"), stage, str(walls[stage] / 2), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "mark").read_text() == stage and not out.exists()
    assert "apply:" not in killed.stdout  # killed before it finished
    again = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "calibrate:" not in again.stderr  # the killed run's calibration was reused, not made again
    assert _sha(out) == _sha(tmp_path / "straight.gguf")
    assert not list((tmp_path / "killed.run").rglob("*.tmp-*"))


def _total_e(output: str) -> float:
    """The E column of a --dry-run table's total row."""
    (row,) = [ln for ln in output.splitlines() if ln.strip().startswith("total ")]
    return float(row.split()[-2])


def test_apply_dry_run_costs_no_more_evaluations_than_the_search(
    tiny_model: Path, common: dict[str, Any], tmp_path: Path
) -> None:
    """Both plans print the same table; apply's rollout evaluates nothing, so its E is at most the
    search's."""
    size, text = common["size"], common["text"]
    out = tmp_path / "o.gguf"
    a = runner.invoke(app, [*_apply(tiny_model, out, size, text), "--dry-run"])
    assert a.exit_code == 0, a.output
    s = runner.invoke(
        app,
        [
            "search",
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "s"),
            "--size",
            size,
            *text,
            "--dry-run",
        ],
    )
    assert s.exit_code == 0, s.output
    assert "expected costs" in a.output and "expected costs" in s.output
    assert 0 < _total_e(a.output) <= _total_e(s.output)
    assert not out.exists() and not (tmp_path / "o.run").exists() and not (tmp_path / "s").exists()


def _types(p: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(p).tensors}


def test_a_file_worse_than_the_preset_of_its_size_is_replaced_by_the_preset(
    tiny_model: Path, common: dict[str, Any], tmp_path: Path
) -> None:
    """Greedy restricted to Q2_K and Q8_0 at Q4_K_M's size scores worse on the reward text than Q4_K_M with
    the same imatrix: the run writes Q4_K_M's own file and says so; --force-allocation writes its own."""
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset

    base = [
        "search",
        "--model",
        str(tiny_model),
        "--method",
        "greedy",
        "--size",
        "Q4_K_M",
        "--types",
        "Q2_K,Q8_0",
        "--sensitivity",
        "proxy",
        "--fold",
        "off",
        *common["text"],
    ]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "guarded")])
    assert r.exit_code == 0, r.output
    assert "scored worse than Q4_K_M" in r.output and "--force-allocation" in r.output
    rd = tmp_path / "guarded"
    written = json.loads((rd / "report.json").read_text())["summary"]["written"]
    assert written["file"] == "preset" and written["preset"] == "Q4_K_M"
    assert written["allocation_kld"] > written["preset_kld"] == written["reward_kld"]
    assert written["allocation_minus_preset"] == pytest.approx(
        written["allocation_kld"] - written["preset_kld"]
    )
    (gguf,) = rd.glob("*.ramp-*.gguf")
    calib = rd / "calib.safetensors"
    from ramp_cpp.calibration.artifact import load_calibration

    ref = tmp_path / "q4km.gguf"
    quantize_preset(tiny_model, ref, "Q4_K_M", QuantizeOptions(imatrix=load_calibration(calib).imatrix()))
    assert _types(gguf) == _types(ref) and gguf.stat().st_size == ref.stat().st_size

    r = runner.invoke(app, [*base, "--out", str(tmp_path / "forced"), "--force-allocation"])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "forced" / "report.json").read_text())["summary"]["written"]
    assert written["file"] == "allocation" and written["forced"] and "written anyway" in r.output
    (gguf,) = (tmp_path / "forced").glob("*.ramp-*.gguf")
    assert set(_types(gguf).values()) <= {"Q2_K", "Q8_0", "F32"}


def test_a_size_in_bytes_has_no_preset_to_lose_to(
    tiny_model: Path, common: dict[str, Any], tmp_path: Path
) -> None:
    r = runner.invoke(
        app,
        [
            "search",
            "--model",
            str(tiny_model),
            "--method",
            "uniform",
            "--size",
            common["size"],
            "--out",
            str(tmp_path / "r"),
            *common["text"],
        ],
    )
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "r" / "report.json").read_text())["summary"]["written"]
    assert written["file"] == "allocation" and "preset" not in written
