"""Measured sensitivity (groups.py) on the synthetic model: a group's scale is KLD measured on files that
llama.cpp's own quantizer writes, divided by the proxy's prediction; groups partition the searched tensors;
the calibration resumes after a kill, leaves no probe file behind, and drives greedy through run_direct."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import synthetic
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from test_cli_errors import one_error_line
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig, save_calibration
from ramp_cpp.cli.app import app
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors
from ramp_cpp.measure.groups import GroupConfig, GroupReport, calibrate_sensitivity, groups_of
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig

runner = CliRunner()
ECFG = EvalConfig(n_ctx=128, n_chunks=2)
OPTS = RuntimeOptions(n_ctx=128)


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    m = synthetic.measured(tiny_model, tmp_path_factory.mktemp("groups"))
    seen: list[tuple[int, int]] = []
    scaled, report = calibrate_sensitivity(
        m["sens"], m["cache"], tiny_model, m["text"], ECFG, OPTS, GroupConfig(),
        progress=lambda a, b: seen.append((a, b)),
    )
    yield {**m, "scaled": scaled, "report": report, "progress": seen}


def test_group_scale_is_measured_kld_over_predicted_proxy(setup: dict[str, Any], tiny_model: Path) -> None:
    """Recompute the largest group's ratio from files quantize_map writes (not the tensor cache) and KLD from
    evaluate.kld against the base, and compare with the report and the calibrated errors."""
    sens: Sensitivity = setup["sens"]
    report: GroupReport = setup["report"]
    g = max((x for x in report.groups if x.measured is not None), key=lambda x: x.measured or 0.0)
    assert not g.floored
    by = {t.name: t for t in sens.tensors}
    reference = {n: t.options[-1].ggml_type for n, t in by.items()}  # the highest option: least error
    probe = {**reference, **{n: by[n].options[0].ggml_type for n in g.tensors}}  # the cheapest candidate
    klds = {}
    for label, types in (("ref", reference), ("probe", probe)):
        p = setup["dir"] / f"{label}.gguf"
        quantize_map(tiny_model, p, types, base=T.Q8_0, opts=QuantizeOptions(imatrix=setup["im"], force=True))
        klds[label] = kld(p, tiny_model, setup["text"], ECFG, OPTS).kld_mean
        p.unlink()
    predicted = sum(by[n].options[0].error - by[n].options[-1].error for n in g.tensors)
    want = (klds["probe"] - klds["ref"]) / predicted
    assert want > 0
    assert report.reference_kld == pytest.approx(klds["ref"], rel=1e-6)
    assert g.predicted == pytest.approx(predicted, rel=1e-12)
    assert g.ratio == pytest.approx(want, rel=1e-5)
    scaled = {t.name: t for t in setup["scaled"].tensors}
    for n in g.tensors:
        assert [o.ggml_type for o in scaled[n].options] == [o.ggml_type for o in by[n].options]
        for o, s in zip(by[n].options, scaled[n].options, strict=True):
            assert s.error == pytest.approx(o.error * want, rel=1e-5)
            assert s.nbytes == o.nbytes


def test_report_ratios_floor_and_pairs(setup: dict[str, Any]) -> None:
    report: GroupReport = setup["report"]
    assert all(g.ratio > 0 for g in report.groups)
    raws = sorted(g.raw_ratio for g in report.groups if g.raw_ratio is not None and g.raw_ratio > 0)
    median = (raws[(len(raws) - 1) // 2] + raws[len(raws) // 2]) / 2
    for g in report.groups:
        assert g.ratio == pytest.approx(max(g.raw_ratio or median, 0.01 * median), rel=1e-12), g.name
    assert 1 <= len(report.pairs) <= 3
    measured = {g.name: g.measured for g in report.groups}
    role = {g.name: g.role for g in report.groups}
    used = [n for p in report.pairs for n in p.groups]
    assert len(used) == len(set(used))  # disjoint
    for p in report.pairs:
        a, b = p.groups
        assert role[a] != role[b]
        assert p.sum_of_singles == pytest.approx((measured[a] or 0) + (measured[b] or 0))
        assert p.increment == pytest.approx(p.kld - report.reference_kld)
    n_probed = sum(g.measured is not None for g in report.groups)
    assert report.evaluations == report.evaluated_now == 1 + n_probed + len(report.pairs)
    assert [a for a, _ in setup["progress"]] == list(range(1, report.evaluations + 1))  # every one shown
    assert setup["progress"][-1][1] == report.evaluations
    assert report.seconds > 0
    json.dumps(report.to_json())


SPECS = {
    "untied": synthetic.Spec(),
    "tied": synthetic.Spec(tied=True),
    "gemma3": synthetic.Spec(arch="gemma3", arch_tensors=True, tied=True, n_layer=5),
    "qwen2": synthetic.Spec(arch="qwen2", arch_tensors=True, n_layer=3),
    "fused-qkv-9": synthetic.Spec(fused_qkv=True, n_layer=9),
}


@pytest.mark.parametrize("n_buckets", [1, 4])
@pytest.mark.parametrize("spec", list(SPECS))
def test_every_searched_tensor_in_exactly_one_group(spec: str, n_buckets: int, tmp_path: Path) -> None:
    s = SPECS[spec]
    info = read_inventory(synthetic.write(tmp_path / "m.gguf", s))
    names = [t.name for t in searched_tensors(info)]
    groups = groups_of(info, names, n_buckets)
    members = [n for g in groups for n in g.tensors]
    assert sorted(members) == sorted(names) and len(members) == len(set(members))
    assert groups[0].tensors == ("token_embd.weight",)
    assert (groups[-1].tensors == ("output.weight",)) == (not s.tied)
    by = {t.name: t for t in info.tensors}
    per_role: dict[str, list[tuple[int, int]]] = {}
    for g in groups:
        assert {by[n].role for n in g.tensors} == {g.role}
        if g.blocks is None:
            assert len(g.tensors) == 1
            continue
        blocks = sorted(by[n].block or 0 for n in g.tensors)
        assert (blocks[0], blocks[-1]) == g.blocks and blocks == list(range(blocks[0], blocks[-1] + 1))
        per_role.setdefault(g.role, []).append(g.blocks)
    for spans in per_role.values():  # near-equal consecutive slices of the blocks, in order
        spans.sort()
        assert len(spans) == min(n_buckets, s.n_layer)
        assert spans[0][0] == 0 and spans[-1][1] == s.n_layer - 1
        assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:], strict=False))
        sizes = [hi - lo + 1 for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1


class Killed(Exception):
    pass


def _kill_at(n: int) -> Any:
    def cb(done: int, total: int) -> None:
        if done >= n:
            raise Killed

    return cb


def _run(setup: dict[str, Any], cfg: GroupConfig, **kw: Any) -> tuple[Sensitivity, GroupReport]:
    return calibrate_sensitivity(
        setup["sens"], setup["cache"], setup["cache"].info.path, setup["text"], ECFG, OPTS, cfg, **kw
    )


def test_resumes_after_a_kill(setup: dict[str, Any]) -> None:
    cfg = GroupConfig(probe_bpw=5.0, pairs=1)  # a key of its own: nothing measured yet
    before = set(setup["cache"].directory.glob("groups-*.json"))
    with pytest.raises(Killed):
        _run(setup, cfg, progress=_kill_at(3))
    (state,) = set(setup["cache"].directory.glob("groups-*.json")) - before
    assert len(json.loads(state.read_text())["evals"]) == 3  # written after every evaluation
    seen: list[int] = []
    scaled, rep = _run(setup, cfg, progress=lambda a, b: seen.append(a))
    assert rep.evaluated_now == rep.evaluations - 3 and seen[0] == 4
    again_scaled, again = _run(setup, cfg, progress=_kill_at(0))  # complete: no evaluation, no callback
    assert again.evaluated_now == 0 and again.groups == rep.groups and again_scaled == scaled
    state.unlink()
    fresh_scaled, fresh = _run(setup, cfg)
    assert fresh.evaluated_now == fresh.evaluations == rep.evaluations
    assert [g.ratio for g in fresh.groups] == pytest.approx([g.ratio for g in rep.groups], rel=1e-9)


def test_probe_files_never_outlive_the_call(setup: dict[str, Any], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    during: list[list[Path]] = []

    def watch(done: int, total: int) -> None:
        during.append(list(scratch.iterdir()))
        if done == 2:
            raise Killed

    cfg = GroupConfig(n_buckets=1, pairs=0)
    with pytest.raises(Killed):
        _run(setup, cfg, progress=watch, scratch=scratch)
    assert during == [[], []]  # each probe's folder is gone when its result arrives (evaljob.run_eval_job)
    assert list(scratch.iterdir()) == []  # and after the exception
    _, rep = _run(setup, cfg, scratch=scratch)
    assert rep.evaluated_now > 0 and list(scratch.iterdir()) == []


def test_greedy_on_measured_sensitivity_through_run_direct(
    setup: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    tf = setup["text_file"]
    cfg = SizedConfig(
        text=str(tf), n_ctx=128, chunks=2,
        calib=CalibConfig(text=str(tf), samples=2, ctx=64),
    )
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    r = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", size, cfg, presets=(),
        sensitivity="measured"))
    assert r.file_bytes <= r.target_bytes
    report = json.loads(r.report.read_text())["summary"]
    alloc = json.loads(r.allocation.read_text())
    for d in (report, alloc):
        assert d["sensitivity"] == "measured"
        groups = d["kld_groups"]
        assert groups["evaluations"] > 1 and groups["seconds"] > 0
        grouped = {n for g in groups["groups"] for n in g["tensors"]}
        assert grouped == {row["name"] for row in alloc["tensors"]}
        assert d["predicted_kld"] > 0
    assert all(row["scaled_error"] > 0 for row in alloc["tensors"])
    meta = {f.name: f.contents() for f in GGUFReader(r.gguf).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.sensitivity"] == "measured"


def test_cli_sensitivity_and_kld_groups(setup: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--size", "1MiB"]
    one_error_line(runner.invoke(app, [*base, "--method", "greedy", "--sensitivity", "kld"]), "sensitivity")
    paper = ["paper-search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--budget", "4.5"]
    r = runner.invoke(app, [*paper, "--sensitivity", "proxy"])
    assert r.exit_code == 2 and "No such option" in r.output  # SAC on bits measures its own reward
    assert not (tmp_path / "r").exists()
    from ramp_cpp.errors import RampError
    from ramp_cpp.store.texts import load_text

    try:
        load_text("wikitext2-valid")
    except RampError:
        pytest.skip("wikitext2-valid is not available offline")
    calib = save_calibration(setup["cal"], tmp_path / "c.safetensors")
    args = ["measure", str(tiny_model), "--calib", str(calib)]
    cache = ["--cache-dir", str(setup["dir"] / "cache")]
    r = runner.invoke(app, [*args, *cache, "--kld-groups", "--chunks", "1", "--ctx", "64", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{") :])
    groups = d["kld_groups"]
    assert groups["evaluations"] == groups["evaluated_now"] > 1
    names = [t.name for t in setup["sens"].tensors]
    assert len(groups["groups"]) == len(groups_of(read_inventory(tiny_model), names))
