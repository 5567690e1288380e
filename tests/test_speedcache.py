"""This machine's speeds kept between dry runs (pipeline/speedcache.py): a warm plan probes nothing and plans
what the cold one planned; another machine key probes again; another shape is scaled from the measured one;
and llama.cpp's log stays off the terminal without RAMP_VERBOSE."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import synthetic
from gguf import GGMLQuantizationType
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.cli.app import app
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline import speedcache, speedprobe
from ramp_cpp.pipeline.estimate import estimate
from ramp_cpp.pipeline.plan import RunPlan, plan_run, size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.sizedconfig import SizedConfig

TYPES = tuple(GGMLQuantizationType[t] for t in ("Q4_0", "Q5_0", "Q8_0"))
PROBES = ("measure_decode", "measure_text", "measure_header", "measure_rates", "measure_io", "_type_errors",
          "decode_ratios")
N_CTX = 64
runner = CliRunner()


def _plan(model: Path, text: Path, run: Path) -> RunPlan:
    cfg = SizedConfig(text=str(text), n_ctx=N_CTX, chunks=2, calib=CalibConfig(str(text), 2, N_CTX))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(model), cc)
    gcfg = GroupConfig(n_buckets=2, pairs=0, chunks=1)
    return plan_run(SizedRequest(model, run, "greedy", str((lo + hi) // 2), cfg, cc, None,
                                 sensitivity="measured", gcfg=gcfg, cache_root=run / "cache", fold="check"))


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError("probed")

    for n in names:
        monkeypatch.setattr(speedprobe, n, fail)


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for n in PROBES:
        real = getattr(speedprobe, n)

        def wrapped(*a: Any, _n: str = n, _real: Any = real, **k: Any) -> Any:
            calls[_n] = calls.get(_n, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(speedprobe, n, wrapped)
    return calls


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAMP_CACHE_DIR", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


def test_a_warm_plan_probes_nothing_and_plans_what_the_cold_one_did(
    tiny_model: Path, text_file: Path, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, presets = _plan(tiny_model, text_file, tmp_path / "run"), ("Q4_K_M",)
    opts = RuntimeOptions(n_threads=1)
    cold = speedcache.known_speeds(plan, opts, presets)
    assert list((own_cache / "speeds").glob("*.json")) and cold.decode  # kept, mixes decoded
    _forbid(monkeypatch, *PROBES)
    warm = speedcache.known_speeds(plan, opts, presets)
    differ = {k for k, v in asdict(cold).items() if asdict(warm)[k] != v}
    assert differ <= {"seconds", "rss_base"}, differ
    for c, w in zip(estimate(plan, presets, opts, cold), estimate(plan, presets, opts, warm), strict=True):
        counts = lambda s: (s.stage, s.E, s.quant_passes, s.written, s.held)  # noqa: E731
        assert counts(c) == counts(w) and w.wall_s == pytest.approx(c.wall_s, rel=1e-9)


def _dry_run_args(model: Path, text: Path, tmp_path: Path, calib_ctx: int = N_CTX) -> list[str]:
    lo, hi = size_range(read_inventory(model), CandidateConfig(types=TYPES))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text}"\nsamples = 2\nctx = {calib_ctx}\nseed = 0\n')
    return ["search", "--model", str(model), "--out", str(tmp_path / "run"), "--method", "greedy", "--size",
            str((lo + hi) // 2), "--types", "Q4_0,Q5_0,Q8_0", "--text", str(text), "--chunks", "2", "--ctx",
            str(N_CTX), "--recipe", str(recipe), "--threads", "1", "--dry-run"]


def test_a_warm_dry_run_answers_without_probing(
    tiny_model: Path, text_file: Path, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _dry_run_args(tiny_model, text_file, tmp_path)
    cold = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert cold.exit_code == 0, cold.output
    _forbid(monkeypatch, *PROBES)
    warm = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert warm.exit_code == 0, warm.output
    def table(out: str) -> list[str]:
        """The plan's lines without the RAM column (the process's own RSS is read afresh) and the probe's
        seconds."""
        lines = [x for x in out.splitlines() if "E: passes" not in x]
        return [re.sub(r"\d+(\.\d)? [MG]iB", "", x, count=1) for x in lines]

    assert table(warm.output) == table(cold.output)  # the same plan, to the printed digit


@pytest.mark.parametrize("change", ["threads", "cpu", "gpu layers"])
def test_another_machine_key_probes_again(
    change: str, tiny_model: Path, text_file: Path, tmp_path: Path, own_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan, opts = _plan(tiny_model, text_file, tmp_path / "run"), RuntimeOptions(n_threads=1)
    speedcache.known_speeds(plan, opts)
    if change == "threads":
        opts = replace(opts, n_threads=2)
    elif change == "cpu":
        monkeypatch.setattr(speedcache, "_cpu", lambda: ("another CPU", "0"))
    else:  # a plan that offloads layers is keyed apart, even where this build has no GPU to take them
        monkeypatch.setattr(speedcache, "machine_key", lambda o, _k=speedcache.machine_key: {
            **_k(o), "gpu_layers": 99})
    calls = _counting(monkeypatch)
    speedcache.known_speeds(plan, opts)
    assert calls.get("measure_decode") == 1 and calls.get("measure_io") == 1
    assert len(list((own_cache / "speeds").glob("*.json"))) == 2


def _block_flops(s: synthetic.Spec) -> int:
    """2 FLOPs per block weight: q and o (n_embd²), k and v (n_embd × kv), gate, up, down (n_embd × n_ff)."""
    kv = s.n_head_kv * s.n_embd // s.n_head
    return 2 * s.n_layer * (2 * s.n_embd**2 + 2 * s.n_embd * kv + 3 * s.n_embd * s.n_ff)


def test_a_shape_not_measured_is_scaled_from_the_measured_one_by_flops(
    text_file: Path, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small, big = synthetic.Spec(n_layer=2), synthetic.Spec(n_layer=4)
    paths = {s: synthetic.write(tmp_path / f"m{s.n_layer}.gguf", s) for s in (small, big)}
    opts = RuntimeOptions(n_threads=1)
    a = speedcache.known_speeds(_plan(paths[small], text_file, tmp_path / "a"), opts)
    _forbid(monkeypatch, "measure_decode")
    plan_b = _plan(paths[big], text_file, tmp_path / "b")
    b = speedcache.known_speeds(plan_b, opts)
    head = len(synthetic.vocab()[0]) * small.n_embd  # the untied output's weights, scored on half the rows

    def flops(s: synthetic.Spec) -> int:
        return _block_flops(s) + head + 4 * s.n_layer * s.n_embd * N_CTX

    assert b.token_s == pytest.approx(a.token_s * flops(big) / flops(small), rel=1e-9)
    size = {s: p.stat().st_size for s, p in paths.items()}
    assert b.load_s == pytest.approx(a.load_s * size[big] / size[small], rel=1e-9)
    assert (b.score_s, b.n_avail) == (pytest.approx(a.score_s), a.n_avail)  # same vocabulary and text


@pytest.mark.parametrize(("shares", "want"), [
    ({"Q4_K": 1.0}, 0.5),  # the same types: the same shape's entry first
    ({"Q4_K": 0.85, "Q6_K": 0.15}, 0.5),  # 15% of the weights elsewhere: borrowed
    ({"Q4_K": 0.7, "Q5_0": 0.3}, None),  # 30%: not near enough, probed
    ({"Q8_0": 1.0}, None),  # the only Q8_0 mix llama.cpp refused (None): never borrowed
])
def test_a_mix_borrows_the_ratio_of_a_measured_mix_within_the_slack(
    shares: dict[str, float], want: float | None
) -> None:
    mixes = {"x": {"shape": "other", "shares": {"Q4_K": 1.0}, "ratio": 0.9},
             "y": {"shape": "this", "shares": {"Q4_K": 1.0}, "ratio": 0.5},
             "z": {"shape": "this", "shares": {"Q8_0": 1.0}, "ratio": None}}
    assert speedcache.borrowed(mixes, "this", shares) == want


def test_llama_log_reaches_the_terminal_only_with_ramp_verbose(text_file: Path, tmp_path: Path) -> None:
    # trained on 32 tokens, run on 64: llama.cpp warns at every context made, a WARN line that
    # llama-cpp-python's own log filter let through (its level table is older than ggml's)
    model = synthetic.write(tmp_path / "short.gguf", synthetic.Spec(n_ctx=32))
    args = _dry_run_args(model, text_file, tmp_path, calib_ctx=16)
    code = "from ramp_cpp.cli.app import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "RAMP_VERBOSE"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    # each its own user cache: both probe (a warm plan loads no model, so llama.cpp would have nothing to say)
    quiet = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           env={**env, "RAMP_CACHE_DIR": str(tmp_path / "quiet")})
    loud = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**env, "RAMP_CACHE_DIR": str(tmp_path / "loud"), "RAMP_VERBOSE": "1"})
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    llama = ("load:", "llama_model_loader:", "print_info:", "load_tensors:", "llama_context:")
    assert any(m in loud.stderr for m in llama)  # the markers are llama.cpp's: the check can fail
    assert not [line for line in quiet.stderr.splitlines() if line.startswith(llama)], quiet.stderr
