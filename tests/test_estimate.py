"""The plan before spending (pipeline/estimate.py, `search --size ... --dry-run`): the stages it lists, their
evaluation units and quantizer passes are the ones a real run then meters (counts, exact; times are only
expected), and a dry run writes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.cli.app import app
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.estimate import StagePlan, estimate, total
from ramp_cpp.pipeline.mixes import decode_mixes
from ramp_cpp.pipeline.plan import plan_run, size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig
from ramp_cpp.pipeline.speedprobe import DECODE_BLOCKS_OVER_REST, decode_ratios, speed_probe

runner = CliRunner()
TYPES = tuple(GGMLQuantizationType[t] for t in ("Q4_0", "Q5_0", "Q8_0"))


@dataclass(frozen=True)
class Case:
    method: str
    sensitivity: str
    fold: str
    presets: tuple[str, ...] = ()
    gcfg: GroupConfig = GroupConfig(n_buckets=2, pairs=0, chunks=1)
    own_calib: bool = True  # calibrate in the run (else --calib a saved one)


CASES = {
    # the search default's shape: calibrate, fold, probes on fewer chunks, the fold check, a scored preset
    "greedy-measured-check": Case("greedy", "measured", "check", ("Q4_K_M",)),
    # both foldings measured; the decision scores 2 x FOLD_CHUNKS (as many as the text holds)
    "uniform-auto": Case("uniform", "proxy", "auto"),
    # a given calibration, no folding: neither calibrate nor fold is a stage
    "greedy-proxy-off": Case("greedy", "proxy", "off", own_calib=False),
    # probes on every reward chunk (no chunk set of their own), folded
    "greedy-measured-on": Case("greedy", "measured", "on", gcfg=GroupConfig(n_buckets=1, pairs=0)),
    # three refined probes after the groups (refine.py): the budget counted in the probes' E
    "greedy-measured-refine": Case("greedy", "measured", "on",
                                   gcfg=GroupConfig(n_buckets=1, pairs=0, refine_evaluations=3)),
}


@pytest.fixture(scope="module")
def calib_file(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cal = calibrate(tiny_model, text_file.read_text(), CalibConfig(str(text_file), 2, 64))
    return save_calibration(cal, tmp_path_factory.mktemp("cal") / "calib.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_the_plan_counts_what_the_run_meters(
    name: str, tiny_model: Path, text_file: Path, calib_file: Path, tmp_path: Path
) -> None:
    c = CASES[name]
    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(tiny_model), cc)
    size, calib = str((lo + hi) // 2), None if c.own_calib else calib_file
    args: dict[str, Any] = dict(calib=calib, sensitivity=c.sensitivity, gcfg=c.gcfg, fold=c.fold,
                                cache_root=tmp_path / "cache")
    plan = plan_run(SizedRequest(tiny_model, tmp_path / "run", c.method, size, cfg, cc, calib,
        sensitivity=c.sensitivity, gcfg=c.gcfg, cache_root=tmp_path / "cache", fold=c.fold))
    opts = RuntimeOptions(n_threads=1)
    stages = estimate(plan, c.presets, opts, speed_probe(plan, opts, c.presets))
    assert not (tmp_path / "run").exists()  # planning and probing write nothing
    r = run_direct(SizedRequest(tiny_model, tmp_path / "run", c.method, size, cfg, cc, presets=c.presets,
        **args), opts)
    # the unfolded model's measurement is planned either way and made only when the fold check keeps it
    unfolded = any(m.stage.endswith("(unfolded)") for m in r.costs) and c.fold == "check"
    assert all(s.stage.endswith("(unfolded)") for s in stages if s.if_unfolded)
    stages = [s for s in stages if unfolded or not s.if_unfolded]
    assert [s.stage for s in stages] == [m.stage for m in r.costs]
    for s, m in zip(stages, r.costs, strict=True):
        assert (s.stage, s.quant_passes) == (m.stage, m.quant_passes)
        assert (s.stage, s.E) == (m.stage, pytest.approx(m.E, abs=1e-9))
        assert s.wall_s >= 0 and s.peak_rss > 0 and s.written >= 0
    assert pytest.approx(sum(m.E for m in r.costs)) == total(stages, unfolded).E
    assert total(stages).held >= r.file_bytes  # the GGUF at least; folded copy and cache too


def _snapshot(*roots: Path) -> dict[str, int]:
    """Every file's mtime under `roots` but the kept speeds (speedcache.py): a dry run adds them."""
    return {str(p): p.stat().st_mtime_ns for r in roots if r.exists() for p in r.rglob("*")
            if "speeds" not in p.relative_to(r).parts}


def test_dry_run_prints_every_stage_and_writes_nothing(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    cache, scratch = Path(os.environ["RAMP_CACHE_DIR"]), Path(os.environ["RAMP_SCRATCH_DIR"])
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig(types=TYPES))
    before = _snapshot(tmp_path, cache, scratch)
    out = tmp_path / "run"
    args = ["search", "--model", str(tiny_model), "--out", str(out), "--method", "greedy", "--size",
            str((lo + hi) // 2), "--types", "Q4_0,Q5_0,Q8_0", "--text", str(text_file), "--chunks", "2",
            "--ctx", "64", "--recipe", str(recipe), "--threads", "1"]
    r = runner.invoke(app, [*args, "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert not out.exists() and _snapshot(tmp_path, cache, scratch) == before
    assert list((cache / "speeds").glob("*.json"))  # but what it measured of this machine, kept
    for stage in ("calibrate", "fold", "base log-probs", "presets", "tensor cache + proxy (folded)",
                  "group probes (folded)", "fold decision", "allocate", "evaluate", "total"):
        assert stage in r.output, stage
    assert "if the check keeps the unfolded model" in r.output  # --fold check: the second measurement
    for stage in ("tensor cache + proxy (unfolded)†", "group probes (unfolded)†", "total†"):
        assert stage in r.output, stage
    r = runner.invoke(app, ["paper-search", "--model", str(tiny_model), "--budget", "4.5", "--dry-run"])
    assert r.exit_code == 2 and "No such option" in r.output  # the paper's search has no plan


def test_the_second_total_keeps_the_unfolded_cache_to_the_end() -> None:
    """total(unfolded=True): the † stages' time and E counted, and the disk their cache adds held by every
    stage after them (the 7B shape's run: 23.0 GiB planned at allocate, 29.7 GiB held with the 2nd cache)."""

    def st(name: str, held: int, wall: float = 1.0, cond: bool = False) -> StagePlan:
        return StagePlan(name, wall, 1, 0, held, 1.0, 0, "", cond)

    stages = [st("fold decision", 20), st("cache (unfolded)", 27, 5.0, True),
              st("probes (unfolded)", 27, 7.0, True), st("allocate", 23), st("evaluate", 23)]
    folded, unfolded = total(stages), total(stages, unfolded=True)
    assert (folded.wall_s, folded.E, folded.held) == (3.0, 3.0, 23)
    assert (unfolded.wall_s, unfolded.E, unfolded.held) == (15.0, 5.0, 30)


def _greedy_plan(tiny_model: Path, text_file: Path, tmp_path: Path) -> Any:
    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(tiny_model), cc)
    return plan_run(SizedRequest(tiny_model, tmp_path / "run", "greedy", str((lo + hi) // 2), cfg, cc, None,
        sensitivity="proxy", gcfg=GroupConfig(), cache_root=tmp_path / "cache", fold="off"))


def test_decode_ratios_come_from_a_copy_of_the_first_blocks(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    plan = _greedy_plan(tiny_model, text_file, tmp_path)
    mixes = decode_mixes(plan, ("Q4_K_M",))
    assert {"below", "above", "hi", "preset 0"} <= set(mixes)
    opts = RuntimeOptions(n_threads=1, n_ctx=64)
    with LlamaModel(tiny_model, opts) as m:
        chunk = np.asarray(m.tokenize(text_file.read_text())[:64])
    # a type that needs an importance matrix: that file is left out (the table's ratio then)
    iq = {n: GGMLQuantizationType.IQ2_XS for n in mixes["hi"]}
    got = decode_ratios(plan, opts, chunk, {**mixes, "iq": iq}, tmp_path)
    assert set(got) == set(mixes) and all(0.05 < r < 50 for r in got.values())
    info, copy = plan.info, read_inventory(tmp_path / "src.gguf")
    per_block = sum(t.n_params for t in info.tensors if t.block == 0)
    rest = DECODE_BLOCKS_OVER_REST * sum(t.n_params for t in info.tensors if t.block is None)
    # the blocks kept outweigh the rest so many times (or are all of them), and one fewer would not
    k = copy.n_blocks
    assert k == info.n_blocks or k * per_block >= rest > (k - 1) * per_block
    assert {t.name for t in copy.tensors} == {t.name for t in info.tensors if t.block is None
                                              or t.block < copy.n_blocks}
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["src.gguf"]  # each mix's copy removed


def test_the_plan_decodes_at_the_measured_ratios(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    """The evaluate stage is load + tokenize + chunks·(N·token_s·rel + score): every measured file at ratio 10
    instead of 1 adds 9·chunks·N·token_s, whatever the table says."""
    plan = _greedy_plan(tiny_model, text_file, tmp_path)
    opts = RuntimeOptions(n_threads=1)
    probe = speed_probe(plan, opts)
    names = list(decode_mixes(plan))
    plans = {r: estimate(plan, (), opts, replace(probe, decode=dict.fromkeys(names, r))) for r in (1.0, 10.0)}
    evaluate = {r: next(s.wall_s for s in st if s.stage == "evaluate") for r, st in plans.items()}
    want = 9 * plan.cfg.chunks * plan.cfg.n_ctx * probe.token_s
    assert evaluate[10.0] - evaluate[1.0] == pytest.approx(want, rel=1e-6)


def test_greedys_guess_reads_only_the_types_on_each_tensors_frontier(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """The probe's errors of each row length's candidates, on the same rows, fall with the bits (the
    quantizer's own order); a type whose error is well above the lower convex hull of (bytes, error) is not in
    the files the plan decodes for greedy; one on it or near it is, as every candidate is without errors."""
    plan = _greedy_plan(tiny_model, text_file, tmp_path)
    lengths = {t.n_per_row for t in plan.info.searched}
    probe = speed_probe(plan, RuntimeOptions(n_threads=1))
    for n in lengths:
        errs = [probe.type_error[f"{w}@{n}"] for w in ("Q4_0", "Q5_0", "Q8_0")]
        assert errs[0] > errs[1] > errs[2] > 0
    # Q5_0 saves a tenth of Q4_0's error for 1 bit; Q8_0 the rest for 3 more: Q5_0 lies above the chord
    bent = {f"{w}@{n}": e for n in lengths for w, e in (("Q4_0", 1.0), ("Q5_0", 0.9), ("Q8_0", 0.0))}
    guessed = {label: set(m.values()) for label, m in decode_mixes(plan, (), bent).items()}
    assert GGMLQuantizationType.Q5_0 not in guessed["below"] | guessed["above"]
    plain = {label: set(m.values()) for label, m in decode_mixes(plan).items()}
    assert GGMLQuantizationType.Q5_0 in plain["below"] | plain["above"]  # the target lies next to it
    # on the hull, or within TYPE_ERROR_SLACK above its chord (0.75 at Q5_0's bytes): as without errors
    for q5 in (0.3, 0.78):
        near = {k: q5 if k.startswith("Q5_0") else e for k, e in bent.items()}
        assert {label: set(m.values()) for label, m in decode_mixes(plan, (), near).items()} == plain


def test_a_run_resumed_after_the_check_freed_the_folded_files_is_planned_without_them(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """After `release_folded` (fold-check.json in the run folder), the plan has no fold, no folded
    measurement, no † stages and a fold decision that costs nothing: what the resumed run then does."""
    from ramp_cpp.pipeline.folddecision import KEPT_UNFOLDED, FoldDecision, FoldEvidence, save_kept

    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(tiny_model), cc)
    rd = tmp_path / "run"
    plan = plan_run(SizedRequest(tiny_model, rd, "greedy", str((lo + hi) // 2), cfg, cc, None,
        sensitivity="measured", gcfg=GroupConfig(n_buckets=2, pairs=0, chunks=1),
        cache_root=tmp_path / "cache", fold="check"))
    opts = RuntimeOptions(n_threads=1)
    probe = speed_probe(plan, opts)
    before = [s.stage for s in estimate(plan, (), opts, probe)]
    assert "fold" in before and "tensor cache + proxy (folded)" in before
    rd.mkdir()
    save_kept(rd / KEPT_UNFOLDED, FoldDecision(False, "greedy", FoldEvidence.of([0.2], [0.1]), "check"))
    after = estimate(plan, (), opts, probe)
    assert [s.stage for s in after if s.stage != "calibrate"] == [
        "base log-probs", "presets", "tensor cache + proxy (unfolded)", "group probes (unfolded)",
        "fold decision", "allocate", "evaluate"]
    assert not any(s.if_unfolded for s in after)
    assert next(s for s in after if s.stage == "fold decision").wall_s == 0.0


def test_a_resumed_run_is_planned_for_what_is_left(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    """After a finished run, the same command's plan counts the proxy's measurement (its tensor cache built
    with it) and the saved group probes as done; with one saved evaluation removed, only that one is left.
    With --fold check, the † stages (the unfolded model measured if the check keeps it) stay counted in full
    while the folded measurement is done, and a check that kept the unfolded model leaves that one done."""
    import json

    from ramp_cpp.pipeline.folddecision import KEPT_UNFOLDED

    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(tiny_model), cc)
    size, gcfg = str((lo + hi) // 2), GroupConfig(n_buckets=2, pairs=0, chunks=1)
    opts = RuntimeOptions(n_threads=1)

    def plan(fold: str) -> Any:
        return plan_run(SizedRequest(tiny_model, tmp_path / fold, "greedy", size, cfg, cc, None,
            sensitivity="measured", gcfg=gcfg, cache_root=tmp_path / f"cache-{fold}", fold=fold))

    probe = speed_probe(plan("on"), opts)

    def planned(fold: str) -> dict[str, StagePlan]:
        return {s.stage + "†" * s.if_unfolded: s for s in estimate(plan(fold), (), opts, probe)}

    def run(fold: str) -> None:
        run_direct(SizedRequest(tiny_model, tmp_path / fold, "greedy", size, cfg, cc, presets=(),
            sensitivity="measured", gcfg=gcfg, cache_root=tmp_path / f"cache-{fold}", fold=fold), opts)

    cold = planned("on")
    run("on")
    warm = planned("on")
    measure, probes = "tensor cache + proxy (folded)", "group probes (folded)"
    assert cold[measure].wall_s > 0 and cold[measure].quant_passes > 0 and cold[probes].E > 0
    assert (warm[measure].wall_s, warm[measure].quant_passes, warm[measure].note) == (0.0, 0, "built")
    assert (warm[probes].wall_s, warm[probes].E) == (0.0, 0.0)
    (state,) = (tmp_path / "cache-on").rglob("groups-*.json")
    d = json.loads(state.read_text())
    n = len(d["evals"])
    d["evals"].pop(next(iter(d["evals"])))
    state.write_text(json.dumps(d))
    part = planned("on")
    assert pytest.approx(cold[probes].E / n) == part[probes].E
    assert part[probes].wall_s == pytest.approx(cold[probes].wall_s / n)

    run("check")
    check = planned("check")
    if (tmp_path / "check" / KEPT_UNFOLDED).is_file():  # the check kept the unfolded model: measured, done
        assert check["tensor cache + proxy (unfolded)"].wall_s == 0.0
        assert not any(k.endswith("†") for k in check)
        assert check["group probes (unfolded)"].E == 0.0
    else:
        assert check[measure].wall_s == 0.0 and check[probes].E == 0.0
        assert check["tensor cache + proxy (unfolded)†"].wall_s == pytest.approx(cold[measure].wall_s)
        assert pytest.approx(cold[probes].E) == check["group probes (unfolded)†"].E


def test_header_s_is_charged_once_per_full_header_parse_the_stage_makes(
    tiny_model: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`header_s` (gguf-py's full parse, tokenizer arrays included) is what fold is charged per parse it makes
    of a header it copies whole; readers of tensors or a header's bytes only (inventory, the proxy's
    source_tensors, the tensor cache's template and cuts) step over the tokenizer (ggufio.HeaderReader) and
    are charged nothing. Each quantizer pass is charged one (llama.cpp's own parse, at gguf-py's rate)."""
    import contextlib
    from collections import Counter

    from gguf import GGUFReader

    from ramp_cpp import costs
    from ramp_cpp.llama.ggufio import HeaderReader

    c = CASES["greedy-measured-on"]
    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=TYPES)
    lo, hi = size_range(read_inventory(tiny_model), cc)
    req = SizedRequest(tiny_model, tmp_path / "run", c.method, str((lo + hi) // 2), cfg, cc,
                       sensitivity=c.sensitivity, gcfg=c.gcfg, cache_root=tmp_path / "cache", fold=c.fold)
    plan, opts = plan_run(req), RuntimeOptions(n_threads=1)
    probe = speed_probe(plan, opts)
    per_header = {a.stage: b.wall_s - a.wall_s for a, b in zip(
        estimate(plan, (), opts, replace(probe, header_s=0.0)),
        estimate(plan, (), opts, replace(probe, header_s=1.0)), strict=True)}
    full: Counter[str] = Counter()
    stage = ["-"]
    init, inner = GGUFReader.__init__, costs.Meter.stage

    def counting(self: Any, *a: Any, **k: Any) -> None:
        full[stage[0]] += not isinstance(self, HeaderReader)
        init(self, *a, **k)

    @contextlib.contextmanager
    def metered(self: Any, name: str, *a: Any, **k: Any) -> Any:
        stage[0] = name
        with inner(self, name, *a, **k):
            yield

    monkeypatch.setattr(GGUFReader, "__init__", counting)
    monkeypatch.setattr(costs.Meter, "stage", metered)
    r = run_direct(req, opts)
    passes = {m.stage: m.quant_passes for m in r.costs}
    for name in ("fold", "tensor cache + proxy (folded)"):
        assert per_header[name] == pytest.approx(full[name] + passes[name]), (name, full, passes)
    assert full["fold"] == 1  # its rewrite, which writes the tokenizer back; its inventory reads none
    assert full["tensor cache + proxy (folded)"] == 0
