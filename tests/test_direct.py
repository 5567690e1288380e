"""`search --method uniform|greedy` end to end on the synthetic model: same run outputs as SAC, a file at or
under the whole-file target, exactly the allocated types, ramp.* metadata, and greedy's measured error never
above uniform's at the same size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader
from test_cli_search import one_error_line
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.cli.app import app
from ramp_cpp.pipeline.run import DirectResult, run_direct, size_range
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.pipeline.paper import SearchConfig

runner = CliRunner()
METHODS = ("uniform", "greedy")


def cfg(text_file: Path) -> SearchConfig:
    return SearchConfig(
        budget_mode="size",
        metric="kld",
        text=str(text_file),
        n_ctx=128,
        chunks=2,
        calib=CalibConfig(text=str(text_file), samples=2, ctx=64),
    )


@pytest.fixture(scope="module")
def runs(
    tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, DirectResult]:
    d = tmp_path_factory.mktemp("direct")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    return {m: run_direct(tiny_model, d / m, m, size, cfg(text_file), presets=("Q4_K_M",)) for m in METHODS}


@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_outputs(method: str, runs: dict[str, DirectResult]) -> None:
    r = runs[method]
    assert r.file_bytes <= r.target_bytes and r.file_bytes >= r.target_bytes * 0.9
    alloc = json.loads(r.allocation.read_text())
    reader = GGUFReader(r.gguf)
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {row["name"]: row["type"] for row in alloc["tensors"]}.items() <= written.items()
    assert "token_embd.weight" in {row["name"] for row in alloc["tensors"]}  # embeddings searched by default
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.method"] == method and meta["ramp.target_bytes"] == r.target_bytes
    assert meta["ramp.tensor_types"] == [row["type"] for row in alloc["tensors"]]
    for f in ("report.json", "pareto.png", "run.json", "calib.safetensors"):
        assert (r.run_dir / f).is_file(), f
    assert r.kld >= 0 and r.ppl > 0


def test_greedy_predicts_less_error_than_uniform(runs: dict[str, DirectResult]) -> None:
    err = {m: json.loads(r.allocation.read_text())["predicted_error"] for m, r in runs.items()}
    assert err["greedy"] <= err["uniform"]


def test_rerun_reuses_the_run_and_refuses_other_settings(
    tiny_model: Path, text_file: Path, runs: dict[str, DirectResult]
) -> None:
    r = runs["greedy"]
    size = json.loads((r.run_dir / "run.json").read_text())["size"]
    again = run_direct(tiny_model, r.run_dir, "greedy", size, cfg(text_file), presets=())
    assert again.file_bytes == r.file_bytes
    with pytest.raises(RampError, match="other settings"):
        run_direct(tiny_model, r.run_dir, "uniform", "1MiB", cfg(text_file), presets=())


def test_bad_requests_fail_before_work(tiny_model: Path, tmp_path: Path) -> None:
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r")]
    one_error_line(runner.invoke(app, [*base, "--method", "greedy"]), "--size")
    one_error_line(runner.invoke(app, [*base, "--method", "greedy", "--size", "1KiB"]), "feasible range")
    one_error_line(runner.invoke(app, [*base, "--method", "best", "--size", "1MiB"]), "unknown method")
    one_error_line(
        runner.invoke(app, [*base, "--method", "greedy", "--size", "1MiB", "--types", "Q9_X"]), "Q9_X"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("on", "off", "want"),
    [
        ([0.10, 0.20, 0.30], [0.11, 0.21, 0.31], True),  # folding better on every chunk
        ([0.12, 0.22, 0.32], [0.10, 0.20, 0.30], False),  # unfolded better on every chunk, far beyond noise
        ([0.20, 0.20, 0.30], [0.20, 0.20, 0.30], True),  # a tie keeps the paper's default
        ([0.11, 0.19, 0.31], [0.10, 0.20, 0.30], True),  # unfolded better on average, within one stderr
    ],
)
def test_choose_fold_folds_unless_unfolded_is_clearly_better(
    on: list[float], off: list[float], want: bool
) -> None:
    from ramp_cpp.pipeline.run import FoldEvidence, choose_fold

    ev = FoldEvidence.of(on, off)
    d = [a - b for a, b in zip(on, off, strict=True)]
    assert ev.delta == pytest.approx(sum(d) / len(d))
    assert choose_fold(ev) is want


def test_fold_auto_measures_both_and_keeps_the_better(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    r = run_direct(tiny_model, tmp_path / "auto", "greedy", size, cfg(text_file), presets=(), fold="auto")
    fold = json.loads(r.report.read_text())["summary"]["fold"]
    klds, ev = fold["reward_kld"], fold["evidence"]
    assert set(klds) == {"on", "off"} and fold["allocator"] == "greedy"
    assert fold["choice"] == ("on" if ev["delta"] <= ev["stderr"] else "off")
    assert ev["delta"] == pytest.approx(klds["on"] - klds["off"]) and ev["chunks"] >= 1
    reader = GGUFReader(r.gguf)
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.fold_choice"].startswith(f"auto: {fold['choice']}")
    assert meta["ramp.scale_folding"] is (fold["choice"] == "on")


def test_fold_options_fail_before_work(tiny_model: Path, tmp_path: Path) -> None:
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r")]
    one_error_line(runner.invoke(app, [*base, "--size", "1MiB", "--fold", "maybe"]), "unknown --fold")
    one_error_line(runner.invoke(app, [*base, "--size", "1MiB", "--fold", "on", "--no-fold"]), "contradicts")
    one_error_line(runner.invoke(app, [*base, "--budget", "4.5", "--fold", "auto"]), "--size search")
    assert not (tmp_path / "r").exists()
