"""`search --method sac --size` and `apply` of its policy, end to end on the synthetic model through
llama.cpp: in budget, a policy file that applies zero-shot, and resumable runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from test_cli_errors import one_error_line
from typer.testing import CliRunner

from ramp_cpp.allocate.sac.policyfile import is_sized, load_policy
from ramp_cpp.calibration.artifact import CalibConfig, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.cli.app import app
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("sized")
    cal = calibrate(tiny_model, text_file.read_text(), CalibConfig(text=str(text_file), samples=2, ctx=64))
    calib = save_calibration(cal, d / "calib.safetensors")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + 2 * hi) / 3 / 1024:.1f}KiB"
    common = ["--calib", str(calib), "--text", str(text_file), "--chunks", "2", "--ctx", "128"]
    args = ["search", "--model", str(tiny_model), "--out", str(d / "run"), "--method", "sac", "--size", size,
            "--evaluations", "4", "--no-presets", "--sensitivity", "proxy", "--rescore", "2", *common]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return {"dir": d, "size": size, "args": args, "output": r.output, "calib": calib, "common": common}


def test_search_writes_an_in_budget_gguf_and_a_sized_policy(run: dict[str, Any]) -> None:
    rd = run["dir"] / "run"
    report = json.loads((rd / "report.json").read_text())["summary"]
    assert report["method"] == "sac" and report["file_bytes"] <= report["target_bytes"]
    sac = report["sac"]
    assert 1 <= sac["evaluations"] <= 4 and sac["reward_kld"] <= sac["reward_kld_greedy"]
    second = sac["rescored"]
    assert second["chunks"] == [2, 8] and second["table"][0]["reference"] and len(second["table"]) <= 3
    pol = load_policy(rd / "policy.safetensors")
    assert is_sized(pol.meta) and pol.meta["variant"] == "ramp"
    gguf = next(rd.glob("*.ramp-*.gguf"))
    meta = {f.name: f.contents() for f in GGUFReader(gguf).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.method"] == "sac"
    assert "reference" in run["output"] and "final" in run["output"]
    # --fold check is the default of a sized search: greedy's allocation of the folded model, quantized from
    # both, on the first 8 chunks
    fold = report["fold"]
    assert fold["allocator"] == "greedy" and fold["mode"] == "check" and fold["evidence"]["chunks"] >= 1
    assert meta["ramp.fold_choice"].startswith(f"check: {fold['choice']}")


def test_rerun_resumes_without_new_evaluations(run: dict[str, Any]) -> None:
    r = runner.invoke(app, run["args"])
    assert r.exit_code == 0, r.output
    assert " sample " not in r.output and " reference " not in r.output  # nothing searched again


def test_apply_sized_policy_zero_shot(run: dict[str, Any], tiny_model: Path) -> None:
    pol = run["dir"] / "run" / "policy.safetensors"
    out = run["dir"] / "applied.gguf"
    args = ["apply", str(pol), str(tiny_model), "-o", str(out), "--size", run["size"],
            "--sensitivity", "proxy", "--calib", str(run["calib"]), "--text", run["common"][3]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((run["dir"] / "run" / "report.json").read_text())["summary"]
    assert out.stat().st_size <= report["target_bytes"]
    assert (run["dir"] / "applied.run" / "run.json").is_file()  # its run folder, beside the output, stays
    meta = {f.name: f.contents() for f in GGUFReader(out).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.method"] == "policy"
    # a zero-evaluation apply folds by the rule (default_fold): no fold decision was evaluated
    assert "ramp.fold_choice" not in meta and meta["ramp.scale_folding"] in (True, 1)
    one_error_line(runner.invoke(app, ["apply", str(pol), str(tiny_model), "--budget", "4.5"]), "--size")


def test_apply_takes_the_policys_sensitivity(run: dict[str, Any], tiny_model: Path) -> None:
    """A policy trained across models (allocate/sac/across.py) learned on proxy states: `apply` without
    --sensitivity rolls it out on the proxy, with no evaluation before the file is written."""
    from ramp_cpp.allocate.sac.policyfile import save_policy
    from ramp_cpp.store import stfile

    tensors, meta = stfile.read(run["dir"] / "run" / "policy.safetensors", "ramp.policy", "policy",
                                framework="pt")
    pol = save_policy(tensors, {**meta, "sensitivity": "proxy"}, run["dir"] / "across.policy.safetensors")
    out = run["dir"] / "across.gguf"
    r = runner.invoke(app, ["apply", str(pol), str(tiny_model), "-o", str(out), "--size", run["size"],
                            "--calib", str(run["calib"]), "--text", run["common"][3]])
    assert r.exit_code == 0, r.output
    meta = {f.name: f.contents() for f in GGUFReader(out).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.sensitivity"] == "proxy" and "ramp.fold_choice" not in meta


def test_bad_sac_options_fail_before_work(tiny_model: Path, tmp_path: Path) -> None:
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--method", "sac",
            "--size", "1MiB"]
    one_error_line(runner.invoke(app, [*base, "--reward", "ppl"]), "unknown reward")
    one_error_line(runner.invoke(app, [*base, "--evaluations", "1"]), "at least 2")
    assert not (tmp_path / "r").exists()


def test_cold_search_prints_its_first_episode(run: dict[str, Any], tiny_model: Path) -> None:
    """--no-warm-start: the reference is no candidate, so the first episode has no best yet (printed "-")."""
    args = ["search", "--model", str(tiny_model), "--out", str(run["dir"] / "cold"), "--method", "sac",
            "--size", run["size"], "--evaluations", "3", "--no-presets", "--sensitivity", "proxy",
            "--no-warm-start", *run["common"]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "best -" in r.output
