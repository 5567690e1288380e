"""The searched folding exponent (ramp_cpp/fold/exponent.py, FoldConfig(power=None)): its error metric
against direct numpy computations, the search never worse than the paper's fixed 0.5, different choices where
only some groups carry outliers, the folded model's function unchanged, the choices recorded and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_fold import exact_kld, logits
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig, Calibration, save_calibration
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.fold.exponent import folded_error
from ramp_cpp.fold.folding import (
    SEARCH_GRID,
    FoldConfig,
    FoldedGroup,
    FoldResult,
    fold,
    fold_scales,
    folded_calibration_from_file,
    parse_fold_power,
)
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.ggufio import field_value, open_reader, read_inventory
from ramp_cpp.llama.native import quantize_rows

T = GGMLQuantizationType
SEARCH = FoldConfig(power=None)
SHARED = {"attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "ffn_gate": "ffn", "ffn_up": "ffn"}


# -- the metric on arrays ----------------------------------------------------------------------------


def _case(n_rows: int = 8, n_in: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, scales and E[x²]; the scales are powers of 2, so W·s is exact in float32 and the metric's two
    forms (unfolded and folded coordinates) agree to float64 summation, even on an F16 rounding's error."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    s = 2.0 ** rng.integers(-3, 4, n_in)
    m = np.exp(rng.normal(0, 1, n_in))
    return w, s, m


def _q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 by its definition (ggml-quants.c quantize_row_q8_0_ref, which takes no imatrix): per 32 weights
    d = max|x| / 127 stored as F16, q = round(x / d); the dequantized values q · d."""
    b = x.reshape(len(x), -1, 32).astype(np.float32)
    d = (np.abs(b).max(axis=2, keepdims=True) / 127).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(b * inv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


@pytest.mark.parametrize(
    ("qtype", "rounded"),
    [
        (T.Q8_0, _q8_0),
        (T.F16, lambda x: x.astype(np.float16).astype(np.float32)),
    ],
)
def test_folded_error_is_the_formula(qtype: T, rounded: object) -> None:
    """Σ_j m[j] · Σ_i (W − dequant(quant(W·diag(s))) · diag(1/s))², the quantizer written out in numpy."""
    w, s, m = _case()
    wf = w * s.astype(np.float32)
    want = float((m * ((w.astype(np.float64) - rounded(wf) / s) ** 2).sum(axis=0)).sum())  # type: ignore[operator]
    assert folded_error(w, s, m, qtype) == pytest.approx(want, rel=1e-6)


def test_folded_error_of_a_k_type_in_the_unfolded_coordinates() -> None:
    """Q4_K through llama.cpp with the folded imatrix m / s² (another imatrix changes its choices, so the
    metric must pass this one): the effective weight q / s against W, weighted by m."""
    w, s, m = _case(16)
    wf = (w * s.astype(np.float32)).astype(np.float32)
    raw = np.frombuffer(quantize_rows(int(T.Q4_K), wf, (m / s**2).astype(np.float32)), dtype=np.uint8)
    q = dequantize(raw.reshape(len(w), -1), T.Q4_K).reshape(w.shape).astype(np.float64)
    want = float(m @ ((w - q / s) ** 2).sum(axis=0))
    assert folded_error(w, s, m, T.Q4_K) == pytest.approx(want, rel=1e-6)
    raw_m = np.frombuffer(quantize_rows(int(T.Q4_K), wf, m.astype(np.float32)), dtype=np.uint8)
    q_m = dequantize(raw_m.reshape(len(w), -1), T.Q4_K).reshape(w.shape).astype(np.float64)
    assert float(m @ ((w - q_m / s) ** 2).sum(axis=0)) != pytest.approx(want, rel=1e-6)


def test_folded_error_uses_llamas_fallback_and_refuses_f16_overflow() -> None:
    w, s, m = _case(4, 96)  # 96 is no multiple of Q4_K's 256: llama.cpp writes its fallback (Q5_0)
    assert folded_error(w, s, m, T.Q4_K) == pytest.approx(folded_error(w, s, m, T.Q5_0), rel=1e-12)
    big = np.full(96, 1e5)
    assert folded_error(w, big, m, T.Q4_K, f16=True) == float("inf")
    assert np.isfinite(folded_error(w, big, m, T.Q4_K, f16=False))


@pytest.mark.parametrize(
    ("value", "power"), [("0.5", 0.5), ("0.25", 0.25), (" Search ", None), ("0", 0.0)]
)
def test_parse_fold_power(value: str, power: float | None) -> None:
    assert parse_fold_power(value).power == power


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"power": "x"}, "a number"),
        ({"power": None, "grid": ()}, "finite and >= 0"),
        ({"power": -0.5}, "finite and >= 0"),
        ({"power": None, "search_types": ("Q9_K",)}, "unknown ggml type"),
        ({"power": None, "search_types": ()}, "at least one"),
    ],
)
def test_bad_fold_settings_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RampError, match=match):
        if kwargs.get("power") == "x":
            parse_fold_power("x")
        else:
            FoldConfig(**kwargs)  # type: ignore[arg-type]


def test_default_is_the_papers_and_the_grid_holds_it() -> None:
    assert FoldConfig().power == 0.5 and not FoldConfig().searched
    assert 0.5 in SEARCH_GRID and 0.0 in SEARCH_GRID
    with pytest.raises(RampError, match="fixed exponent"):
        fold_scales(np.ones(4), SEARCH)


# -- on a model ----------------------------------------------------------------------------------------

#: per (block, group): exponent k of E[x²] ∝ max|x|^(2k) and the spread of max|x|; (0, 0) flat: every power
#: gives s ≡ 1 + eps, the same error, the first of the grid (0) kept
PLANTED = {(0, "attn"): (1.0, 0.0), (0, "ffn"): (1.0, 1.5), (1, "attn"): (3.0, 1.5), (1, "ffn"): (0.5, 1.5)}


def planted_cal(path: Path, planted: dict[tuple[int, str], tuple[float, float]]) -> Calibration:
    info = read_inventory(path)
    rng = np.random.default_rng(0)
    stats: dict[str, InputStats] = {}
    shared: dict[tuple[int | None, str], InputStats] = {}
    for t in info.tensors:
        key = (t.block, SHARED.get(t.role, t.name))
        if key not in shared:
            k, sigma = planted.get(key, (1.0, 0.0))  # type: ignore[arg-type]
            m = np.exp(rng.normal(0.0, sigma, t.n_per_row)).astype(np.float32)
            shared[key] = InputStats(m, m.astype(np.float64) ** (2 * k) * 50, 100)
        stats[t.name] = shared[key]
    return Calibration(path.name, "0" * 64, info.arch, CalibConfig(text="synthetic"), 100, stats)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("foldsearch") / "m.f16.gguf", synthetic.Spec())


@pytest.fixture(scope="module")
def searched(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Calibration, FoldResult]:
    cal = planted_cal(model, PLANTED)
    return cal, fold(model, cal, tmp_path_factory.mktemp("fs") / "f.gguf", cfg=SEARCH)


def test_searched_model_computes_the_same_function(
    model: Path, searched: tuple[Calibration, FoldResult], tiny_text: str
) -> None:
    _, r = searched
    powers = [g.power for g in r.groups]
    assert len(set(powers)) >= 3, powers  # the groups took different exponents
    assert exact_kld(logits(model, tiny_text, n_chunks=3), logits(r.path, tiny_text, n_chunks=3)) <= 1e-5


def test_search_never_worse_than_the_papers_exponent(
    model: Path, searched: tuple[Calibration, FoldResult]
) -> None:
    """Each group's error at its chosen power ≤ at 0.5, recomputed here from the group's own tensors; the flat
    group keeps 0 (a tie), the planted ones do not all share one power."""
    from ramp_cpp.write.cachefiles import source_rows

    cal, r = searched
    for g in r.groups:
        st = cal.stats[g.stats_from]
        m = st.sum_sq / st.count

        def err(p: float, g: FoldedGroup = g, st: InputStats = st, m: np.ndarray = m) -> float:
            s = fold_scales(st.max_abs, FoldConfig(power=p))
            return sum(
                folded_error(source_rows(str(model), t, 0, 10**9), s, m, T.Q4_K, f16=True)
                for t in g.linears
            )

        chosen, half = err(g.power), err(0.5)
        assert chosen <= half, (g.norm, g.power, chosen, half)
        assert dict(g.errors)[g.power] == pytest.approx(chosen, rel=1e-9)
    by = {g.norm: g.power for g in r.groups}
    assert by["blk.0.attn_norm.weight"] == 0.0
    assert by["blk.1.attn_norm.weight"] > by["blk.0.ffn_norm.weight"] > 0.0
    errs = dict(r.groups[1].errors)
    assert errs[by["blk.0.ffn_norm.weight"]] < min(errs[0.0], errs[0.5])  # a strict win where it moved


def test_choices_recorded_and_read_back(
    model: Path, searched: tuple[Calibration, FoldResult], tmp_path: Path
) -> None:
    cal, r = searched
    reader = open_reader(r.path)
    assert field_value(reader, "ramp.fold.power") == SEARCH.describe()
    listed = [float(p) for p in field_value(reader, "ramp.fold.powers").split(",")]
    assert listed == [g.power for g in r.groups]
    s = r.summary()
    assert s["powers"] == listed and set(s["search_errors"]) == {g.norm for g in r.groups}
    back = folded_calibration_from_file(cal, r.path, SEARCH)
    for name, st in r.calibration.stats.items():
        np.testing.assert_array_equal(back.stats[name].sum_sq, st.sum_sq)
    with pytest.raises(RampError, match="another calibration or settings"):
        folded_calibration_from_file(cal, r.path, FoldConfig())
    fixed = fold(model, cal, tmp_path / "fixed.gguf")
    assert field_value(open_reader(fixed.path), "ramp.fold.power") == "0.5"
    with pytest.raises(RampError, match="not folded with a searched exponent"):
        folded_calibration_from_file(cal, fixed.path, SEARCH)


def test_cli_fold_power(model: Path, tmp_path: Path) -> None:
    calib = save_calibration(planted_cal(model, PLANTED), tmp_path / "c.safetensors")
    args = ["fold", str(model), "--calib", str(calib), "-o", str(tmp_path / "f.gguf")]
    r = CliRunner().invoke(app, [*args, "--fold-power", "search", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    d = json.loads(r.stdout)
    assert d["power"] == SEARCH.describe() and len(d["powers"]) == 4 and len(set(d["powers"])) >= 3
    bad = [*args[:-1], str(tmp_path / "g.gguf"), "--fold-power", "sqrt"]
    r = CliRunner().invoke(app, bad)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--fold-power" in lines[0], r.stderr
    assert not (tmp_path / "g.gguf").exists()


# -- the sized run ---------------------------------------------------------------------------------------


def test_sized_run_source_folds_with_the_searched_exponent(model: Path, tmp_path: Path) -> None:
    """calibrated_source (what a sized run's stages call) folds with the run's SizedConfig.fold_config, reads
    the choices back when it resumes, refuses the folded copy under another exponent; the report's fold entry
    lists them."""
    from ramp_cpp.fold.source import calibrated_source
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.runreport import fold_exponents
    from ramp_cpp.pipeline.sizedconfig import SizedConfig, SourceChoice

    cfg = SizedConfig(fold_power=None)
    calib = save_calibration(planted_cal(model, PLANTED), tmp_path / "c.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    choice = SourceChoice(cfg.calib, True)
    src = calibrated_source(model, run, choice, RuntimeOptions(), calib, fold_cfg=cfg.fold_config)
    rep = fold_exponents(src.info.metadata)
    assert rep["power"] == SEARCH.describe() and len(set(rep["powers"])) >= 3
    assert sum(rep["power_counts"].values()) == 4
    again = calibrated_source(model, run, choice, RuntimeOptions(), calib, fold_cfg=cfg.fold_config)
    for name, st in src.cal.stats.items():
        np.testing.assert_array_equal(again.cal.stats[name].sum_sq, st.sum_sq)
    with pytest.raises(RampError, match="another calibration or settings"):
        calibrated_source(model, run, choice, RuntimeOptions(), calib, fold_cfg=SizedConfig().fold_config)
    assert fold_exponents({}) == {}


@pytest.mark.parametrize(
    ("have", "want", "differ"),
    [
        ({}, {"fold_power": 0.5}, False),  # a run.json from before the key: every run folded with 0.5
        ({}, {"fold_power": None}, True),
        ({"fold_power": None}, {"fold_power": None}, False),
        ({"fold_power": 0.25}, {"fold_power": 0.5}, True),
    ],
)
def test_run_dir_settings_compare_the_fold_power(
    have: dict[str, object], want: dict[str, object], differ: bool
) -> None:
    from dataclasses import asdict

    from ramp_cpp.pipeline.sizedconfig import SizedConfig, settings_differ

    base = {k: v for k, v in asdict(SizedConfig()).items() if k != "fold_power"}
    diffs = settings_differ({"search": base | have, "fold": "on"}, {"search": base | want, "fold": "on"})
    assert diffs == (["search"] if differ else [])
    with pytest.raises(RampError, match="finite and >= 0"):
        SizedConfig(fold_power=float("nan"))


# -- the bench's fold-search cells --------------------------------------------------------------------------


def test_bench_fold_search_variant(model: Path, tmp_path: Path) -> None:
    """bench/compare.py's `--fold search`: its own tag and row, a folded copy made with the searched exponent
    and read back (not re-searched) by a second process's Base."""
    from bench import compare

    f = compare.Fold.parse("search")
    assert f and f.tag == "fold-search" and f.row == {"fold": True, "fold_power": "search"}
    assert compare.Fold.parse("on").tag == "fold" and compare.Fold.parse("p0.25").tag == "fold-p0.25"
    with pytest.raises(SystemExit, match="search"):
        compare.Fold.parse("searched")
    cal = planted_cal(model, PLANTED)
    path, fcal = compare.Base("m", "offgrid", 0, model, cal, tmp_path).model(f)
    assert path.name == "folded-search.f16.gguf"
    assert field_value(open_reader(path), "ramp.fold.power") == SEARCH.describe()
    mtime = path.stat().st_mtime_ns
    path2, fcal2 = compare.Base("m", "offgrid", 0, model, cal, tmp_path).model(f)
    assert path2 == path and path.stat().st_mtime_ns == mtime
    for name, st in fcal.stats.items():
        np.testing.assert_array_equal(fcal2.stats[name].sum_sq, st.sum_sq)
    b = compare.Base("m", "offgrid", 0, model, cal, tmp_path)
    cell = compare.Cell.of(b, "r", "greedy", "Q4_K_M", 1, f, 4)
    assert compare.Fold(cell.fold).tag == "fold-search"


def test_sized_run_reports_the_searched_exponents(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    """run_direct with SizedConfig(fold_power=None): the stages fold with the search, report.json's
    summary.fold lists each group's exponent as the folded file records it, and the run folder refuses the
    paper's exponent."""
    from ramp_cpp.errors import OtherSettings
    from ramp_cpp.measure.candidates import CandidateConfig
    from ramp_cpp.pipeline.folddecision import Fold
    from ramp_cpp.pipeline.plan import size_range
    from ramp_cpp.pipeline.request import SizedRequest
    from ramp_cpp.pipeline.run import run_direct
    from ramp_cpp.pipeline.sizedconfig import SizedConfig

    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())

    def req(power: float | None) -> SizedRequest:
        c = SizedConfig(text=str(text_file), n_ctx=128, chunks=2, fold_power=power,
                        calib=CalibConfig(text=str(text_file), samples=2, ctx=64))
        return SizedRequest(tiny_model, tmp_path / "run", "greedy", f"{(lo + hi) / 2 / 1024:.1f}KiB", c,
                            presets=(), fold=Fold.ON)

    run_direct(req(None))
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    fold_rep = rep["summary"]["fold"]
    folded = open_reader(tmp_path / "run" / "folded.f16.gguf")
    assert fold_rep["power"] == SEARCH.describe() == field_value(folded, "ramp.fold.power")
    listed = [float(p) for p in field_value(folded, "ramp.fold.powers").split(",")]
    assert fold_rep["powers"] == listed and len(listed) == 2 * read_inventory(tiny_model).n_blocks
    assert rep["meta"]["search"]["fold_power"] is None
    with pytest.raises(OtherSettings, match="search"):
        run_direct(req(0.5))
