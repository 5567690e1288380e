"""`search --method uniform|greedy` end to end on the synthetic model: same run outputs as SAC, a file at or
under the whole-file target, exactly the allocated types, ramp.* metadata, and greedy's measured error never
above uniform's at the same size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from test_cli_errors import one_error_line
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import DirectResult, run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig

runner = CliRunner()
METHODS = ("uniform", "greedy")


def cfg(text_file: Path) -> SizedConfig:
    return SizedConfig(
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
    return {m: run_direct(SizedRequest(tiny_model, d / m, m, size, cfg(text_file),
        presets=("Q4_K_M",))) for m in METHODS}


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
    again = run_direct(SizedRequest(tiny_model, r.run_dir, "greedy", size, cfg(text_file), presets=()))
    assert again.file_bytes == r.file_bytes
    with pytest.raises(RampError, match="other settings"):
        run_direct(SizedRequest(tiny_model, r.run_dir, "uniform", "1MiB", cfg(text_file), presets=()))


def test_bad_requests_fail_before_work(tiny_model: Path, tmp_path: Path) -> None:
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r")]
    r = runner.invoke(app, [*base, "--method", "greedy"])
    assert r.exit_code == 2 and "--size" in r.output
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
    from ramp_cpp.pipeline.folddecision import FoldEvidence, choose_fold

    ev = FoldEvidence.of(on, off)
    d = [a - b for a, b in zip(on, off, strict=True)]
    assert ev.delta == pytest.approx(sum(d) / len(d))
    assert choose_fold(ev) is want


def test_fold_auto_measures_both_and_keeps_the_better(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    r = run_direct(SizedRequest(tiny_model, tmp_path / "auto", "greedy", size, cfg(text_file), presets=(),
        fold="auto"))
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
    r = runner.invoke(app, [*base, "--size", "1MiB", "--fold", "maybe"])
    assert r.exit_code == 2 and "--fold" in r.output and "check" in r.output  # click names the legal values
    paper = ["paper-search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--budget", "4.5"]
    one_error_line(runner.invoke(app, [*paper, "--fold", "auto"]), "paper-search takes on or off")
    assert not (tmp_path / "r").exists()


# -- the stages alone ---------------------------------------------------------------------------------


def test_plan_refuses_bad_requests_before_any_work(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    from ramp_cpp.errors import OtherSettings
    from ramp_cpp.pipeline.plan import plan_run

    rd = tmp_path / "r"
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    c, cc = cfg(text_file), CandidateConfig()
    for kw, msg in [
        ({"method": "best"}, "unknown method"),
        ({"method": "policy"}, "needs a policy file"),
        ({"sensitivity": "guessed"}, "unknown sensitivity"),
        ({"fold": "maybe"}, "unknown --fold"),
        ({"size": "1KiB"}, "feasible range"),
        ({"size": "lots"}, "size"),
    ]:
        args: dict[str, Any] = {"method": "greedy", "size": size, **kw}
        with pytest.raises(RampError, match=msg):
            plan_run(SizedRequest(tiny_model, rd, args.pop("method"), args.pop("size"), c, cc, **args))
    for bad, msg in [({"chunks": 0}, "at least 1"), ({"text": "wikitext2-test"}, "held out")]:
        with pytest.raises(RampError, match=msg):
            SizedConfig(**bad)  # type: ignore[arg-type]
    assert not rd.exists()  # nothing written

    plan = plan_run(SizedRequest(tiny_model, rd, "greedy", size, c, cc, fold="auto"))
    assert plan.foldings == (False, True) and plan.target > 0 and plan.info.path == str(tiny_model)
    assert plan.settings["search"] == c.to_json() and plan.settings["fold"] == "auto"
    assert plan.cache_root == rd / "cache" and not rd.exists()
    rd.mkdir()
    other = {**plan.settings, "method": "uniform"}
    (rd / "run.json").write_text(json.dumps(other))
    with pytest.raises(OtherSettings, match="method"):
        plan_run(SizedRequest(tiny_model, rd, "greedy", size, c, cc, fold="auto"))


#: run.json's "search" entry as the sized run wrote it while it borrowed the paper's SearchConfig (before
#: issue 38): the paper's fields, and Scale Folding as a boolean that --fold off left true (--no-fold: false)
LEGACY = {
    "budget": 4.25, "margin": 0.25, "budget_mode": "size", "metric": "kld", "bits": [3, 4, 5, 6],
    "include_embeddings": False, "base_type": "Q8_0", "text": "t.txt", "n_ctx": 512, "first_chunk": 0,
    "chunks": 2, "features": "ramp", "eval_every": 10, "fold": True, "imatrix": True,
    "calib": {"text": "t.txt", "samples": 2, "ctx": 64, "seed": 0},
}


@pytest.mark.parametrize(("legacy", "fold", "same"), [
    ({"search": LEGACY}, "on", True),
    ({"search": LEGACY}, "off", True),  # --fold off wrote search.fold true
    ({"search": {**LEGACY, "fold": False}}, "off", True),  # --no-fold
    ({"search": {**LEGACY, "fold": False}}, "on", False),
    ({"search": LEGACY, "fold": "auto"}, "auto", True),
    ({"search": LEGACY, "fold": "check"}, "auto", False),
    ({"search": {**LEGACY, "budget_mode": "weighted", "metric": "ppl"}}, "on", True),  # a SearchConfig()
])
def test_a_run_json_of_before_is_the_same_request(legacy: dict[str, Any], fold: str, same: bool) -> None:
    """Today's run.json holds the sized fields alone and the fold at its top level; one written before the
    paper's fields left the sized run is the same request when its sized fields and folding agree."""
    from ramp_cpp.pipeline.sizedconfig import settings_differ

    c = SizedConfig(text="t.txt", chunks=2, calib=CalibConfig(text="t.txt", samples=2, ctx=64))
    assert list(c.to_json()) == ["text", "n_ctx", "first_chunk", "chunks", "imatrix", "calib", "fold_power"]
    old = {"ramp_version": "0.0.9", "method": "greedy", **legacy}
    new = {"ramp_version": "0.1.0", "method": "greedy", "fold": fold, "search": c.to_json()}
    assert settings_differ(old, new) == ([] if same else ["fold"])
    assert "search" in settings_differ(old, {**new, "search": {**c.to_json(), "chunks": 3}})


def test_fold_stage_scores_nothing_unless_auto(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    """A named folding is decided without a file or an evaluation (the measured artifact is not even read);
    with --fold auto the decision reports its evidence in the run's formats."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.folddecision import FoldDecision, FoldEvidence
    from ramp_cpp.pipeline.plan import plan_run
    from ramp_cpp.pipeline.stages import Runtime, decide_fold

    _, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{hi / 1024:.1f}KiB"
    plan = plan_run(SizedRequest(tiny_model, tmp_path / "r", "sac", size, cfg(text_file), CandidateConfig(),
        fold="off"))
    rt = Runtime(RuntimeOptions(), RuntimeOptions(), tmp_path / "no-scratch")
    d = decide_fold(plan, {False: object()}, {}, hi, rt)  # type: ignore[dict-item]
    assert d == FoldDecision(False) and d.to_json() == {"choice": "off"} and d.metadata() == {}
    assert not (tmp_path / "no-scratch").exists()

    auto = FoldDecision.auto("greedy", FoldEvidence.of([0.10, 0.20], [0.12, 0.22]))
    assert auto.folded and auto.to_json()["reward_kld"] == pytest.approx({"on": 0.15, "off": 0.17})
    assert list(auto.to_json()) == ["choice", "allocator", "reward_kld", "evidence"]
    assert auto.metadata()["ramp.fold_choice"] == (
        "auto: on (KLD on 0.15, off 0.17, paired difference -0.02 ± 0 over 2 chunks)"
    )


@pytest.mark.parametrize(
    "free_gib,fold,refused",
    [
        (0.0, "on", "this run needs"),  # no disk: refused, naming --fold off and fewer --types
        (0.0, "auto", "--fold on saves"),
        # the check measures the unfolded model too when it keeps it: its second cache is counted
        (0.0, "check", "tensor cache 0.0 x 2"),
        (1000.0, "on", None),
    ],
)
def test_plan_refuses_a_run_the_disk_cannot_hold(
    tiny_model: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_gib: float,
    fold: str, refused: str | None,
) -> None:
    """The disk check reads the inventory and the free space, nothing else: a refusal leaves no file."""
    import shutil as sh
    from collections import namedtuple

    from ramp_cpp.pipeline import resources
    from ramp_cpp.pipeline.plan import plan_run

    usage = namedtuple("usage", "total used free")
    real = sh.disk_usage

    def fake(p: object) -> object:  # the run's disk is short; the scratch space is as it is
        if Path(str(p)) == Path(resources.scratch_root()):
            return real(p)
        return usage(1, 1, int(free_gib * 2**30))

    monkeypatch.setattr(resources.shutil, "disk_usage", fake)
    cc = CandidateConfig()
    lo, hi = size_range(read_inventory(tiny_model), cc)
    rd = tmp_path / "run"
    if refused is None:
        plan_run(SizedRequest(tiny_model, rd, "greedy", str((lo + hi) // 2), cfg(text_file), cc, fold=fold))
    else:
        with pytest.raises(RampError, match=refused):
            plan_run(SizedRequest(tiny_model, rd, "greedy", str((lo + hi) // 2), cfg(text_file), cc,
                fold=fold))
    assert not rd.exists()


def test_parallel_jobs_need_a_quantizer_output_and_a_probe_file_each(
    tiny_model: Path, tmp_path: Path
) -> None:
    from ramp_cpp.pipeline.resources import disk_needs

    info, cc = read_inventory(tiny_model), CandidateConfig()
    one, three = (disk_needs(info, cc, "on", 1000, tmp_path / "r", tmp_path / "c", jobs) for jobs in (1, 3))
    assert one.quantizer > 0 and three.quantizer == 3 * one.quantizer
    assert (one.scratch, three.scratch) == (2000, 4000)
    assert three.disk - one.disk == 2 * one.quantizer


@pytest.mark.parametrize("output_vs_quantizer", [0.5, 2.0])
def test_the_disk_peak_holds_the_quantizer_output_or_the_gguf_never_both(
    output_vs_quantizer: float, tiny_model: Path, tmp_path: Path
) -> None:
    """The quantizer's output is removed once cut into the cache, before the GGUF is written."""
    from ramp_cpp.pipeline.resources import disk_needs

    info, cc = read_inventory(tiny_model), CandidateConfig()
    q = disk_needs(info, cc, "on", 1, tmp_path / "r", tmp_path / "c").quantizer
    n = disk_needs(info, cc, "on", int(q * output_vs_quantizer), tmp_path / "r", tmp_path / "c")
    assert n.disk == n.folded + n.cache_per_folding + max(q, n.output) > 0


def test_plan_refuses_quantized_input_and_a_size_above_the_largest_file(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset
    from ramp_cpp.pipeline.plan import plan_run

    q = tmp_path / "q.gguf"
    quantize_preset(tiny_model, q, "Q8_0", QuantizeOptions())
    with pytest.raises(RampError, match="already quantized"):
        plan_run(SizedRequest(q, tmp_path / "a", "greedy", "Q4_K_M", cfg(text_file), CandidateConfig()))
    with pytest.raises(RampError, match="above the largest file"):
        plan_run(SizedRequest(tiny_model, tmp_path / "b", "greedy", "50GiB", cfg(text_file),
            CandidateConfig()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_fold_check_that_keeps_the_unfolded_model_frees_the_folded_files_and_resumes_without_them(
    tiny_model: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the check kept the unfolded model (its folded copy and cache deleted), the same run
    resumes from the saved decision: it neither folds nor measures the folded model again."""
    from ramp_cpp.pipeline import folddecision, run

    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size, rd = f"{(lo + hi) / 2 / 1024:.1f}KiB", tmp_path / "run"
    monkeypatch.setattr(folddecision, "choose_fold", lambda ev, margin=0.0: False)
    real, folded_cache = run.measure_source, []

    def killed_before_the_unfolded_model(plan: Any, folded: bool, source: Any, rt: Any) -> Any:
        if not folded:
            raise KeyboardInterrupt
        m = real(plan, folded, source, rt)
        folded_cache.append(m.cache.directory)
        return m

    monkeypatch.setattr(run, "measure_source", killed_before_the_unfolded_model)
    with pytest.raises(KeyboardInterrupt):
        run_direct(SizedRequest(tiny_model, rd, "greedy", size, cfg(text_file), presets=(), fold="check"))
    assert (rd / folddecision.KEPT_UNFOLDED).is_file()
    assert not (rd / "folded.f16.gguf").exists() and folded_cache and not folded_cache[0].exists()

    def no_second_decision(ev: Any, margin: float = 0.0) -> bool:
        raise AssertionError("the saved decision is used")

    monkeypatch.setattr(folddecision, "choose_fold", no_second_decision)
    monkeypatch.setattr(run, "measure_source", real)
    r = run_direct(SizedRequest(tiny_model, rd, "greedy", size, cfg(text_file), presets=(), fold="check"))
    stages = [c.stage for c in r.costs]
    assert "fold" not in stages and not any("(folded)" in s for s in stages)
    assert "tensor cache + proxy (unfolded)" in stages and not (rd / "folded.f16.gguf").exists()
    fold = json.loads(r.report.read_text())["summary"]["fold"]
    assert (fold["choice"], fold["mode"], fold["allocator"]) == ("off", "check", "greedy")


@pytest.mark.parametrize("cache_in_run", [True, False])
def test_the_fold_checks_disk_peak_is_the_larger_measurement_not_their_sum(
    cache_in_run: bool, tiny_model: Path, tmp_path: Path
) -> None:
    """--fold check deletes the folded copy (and its cache, when it is in the run folder) before it measures
    the unfolded model: peak = max(F + C, 2C - C·in_run) + max(quantizer, GGUF), F the F16 file."""
    from ramp_cpp.pipeline.resources import disk_needs

    info, cc, rd = read_inventory(tiny_model), CandidateConfig(), tmp_path / "r"
    root = rd / "cache" if cache_in_run else tmp_path / "c"
    n, on = disk_needs(info, cc, "check", 1, rd, root), disk_needs(info, cc, "on", 1, rd, root)
    c, q = n.cache_per_folding, max(n.quantizer, n.output)
    assert n.folded == info.file_size and n.foldings_measured == 2
    assert n.disk == max(info.file_size + c, c + c * (not cache_in_run)) + q
    assert n.disk == on.disk if cache_in_run else n.disk >= on.disk
