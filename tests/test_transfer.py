"""Transferred sensitivity (measure/transfer.py): tables of other models' measured group ratios.

Reference checks: a source's own table gives its measured greedy allocation back (the knapsack reads only
relative errors); centring makes a table blind to each source's scale; hand-computed means over two sources;
fallbacks for keys and roles no source has; the shipped table loads; `search --sensitivity transferred`
allocates with no evaluation and says where its ratios came from."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import synthetic
from gguf import GGUFReader
from test_cli_errors import one_error_line
from test_groups import setup  # noqa: F401  (the measured tiny model, shared with test_groups)
from typer.testing import CliRunner

from ramp_cpp.allocate.allocators import ALLOCATORS
from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure import transfer
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors
from ramp_cpp.measure.groups import groups_of
from ramp_cpp.measure.transfer import SourceGroup, build_table
from ramp_cpp.model.arch import ROLES
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest, default_fold
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig

runner = CliRunner()


def _groups(ratios: dict[tuple[str, int | None], float]) -> list[SourceGroup]:
    return [SourceGroup(role, b, r) for (role, b), r in ratios.items()]


def test_each_source_is_centred_on_its_median_then_sources_are_averaged() -> None:
    a = {("attn_v", 0): 4.0, ("attn_v", 1): 1.0, ("ffn_down", 0): 16.0}  # median 4
    # median of the logs, of an even count: (ln 1 + ln 2) / 2
    b = {("attn_v", 0): 0.5, ("attn_v", 1): 2.0, ("ffn_down", 0): 1.0, ("token_embd", None): 8.0}
    t = build_table({"a": _groups(a), "b": _groups(b)}, 4)
    ln = math.log
    mb = ln(2) / 2
    want = {
        ("attn_v", 0): ((ln(4) - ln(4)) + (ln(0.5) - mb)) / 2,
        ("attn_v", 1): ((ln(1) - ln(4)) + (ln(2) - mb)) / 2,
        ("ffn_down", 0): ((ln(16) - ln(4)) + (ln(1) - mb)) / 2,
        ("token_embd", None): ln(8) - mb,
    }
    got = {(r.role, r.bucket): r.log_ratio for r in t.records}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12)
    assert {(r.role, r.bucket): r.n_sources for r in t.records}[("token_embd", None)] == 1
    assert t.sources == ("a", "b")


@pytest.mark.parametrize("scale", [1e-6, 1.0, 3e4])
def test_a_sources_scale_does_not_move_the_table(scale: float) -> None:
    a = {("attn_q", 0): 0.002, ("attn_q", 1): 0.03, ("ffn_up", 0): 0.7, ("output", None): 0.01}
    base = build_table({"a": _groups(a)}, 4)
    scaled = build_table({"a": _groups({k: v * scale for k, v in a.items()})}, 4)
    for r, s in zip(base.records, scaled.records, strict=True):
        assert (r.role, r.bucket) == (s.role, s.bucket)
        assert s.log_ratio == pytest.approx(r.log_ratio, abs=1e-9)


@pytest.mark.parametrize(
    ("role", "bucket", "want"),
    [
        ("attn_v", 1, math.log(2.0)),  # known key
        ("attn_v", 3, (math.log(2.0) + math.log(0.5)) / 2),  # unknown bucket: the role's mean
        ("ffn_gate", 0, 0.0),  # unknown role: the median, factor 1
    ],
)
def test_fallbacks(role: str, bucket: int, want: float) -> None:
    t = transfer.RatioTable(4, ("x",), (transfer.RatioRecord("attn_v", 0, math.log(0.5), 1),
                                         transfer.RatioRecord("attn_v", 1, math.log(2.0), 1)))
    assert t.log_ratio(role, bucket) == pytest.approx(want)


def test_factors_cover_every_searched_tensor_by_its_group(tmp_path: Path) -> None:
    info = read_inventory(synthetic.write(tmp_path / "m.gguf", synthetic.Spec(n_layer=8)))
    names = [t.name for t in searched_tensors(info)]
    groups = groups_of(info, names, 4)
    t = build_table({"s": [SourceGroup(g.role, g.bucket, 1.5 ** i) for i, g in enumerate(groups)]}, 4)
    f = t.factors(info, names)
    assert set(f) == set(names)
    mid = math.exp(statistics.median(math.log(1.5**j) for j in range(len(groups))))
    for i, g in enumerate(groups):  # one source: exp(ln r − median ln r) = r / median r, per group
        for n in g.tensors:
            assert f[n] == pytest.approx(1.5 ** i / mid)


def test_own_table_gives_the_measured_greedy_allocation(setup: dict[str, Any], tiny_model: Path) -> None:  # noqa: F811
    """The knapsack reads relative errors only: the model's own measured groups, centred and applied as a
    table, allocate what the measured sensitivity allocates, at every budget tried."""
    report = setup["report"].to_json()
    sens, measured = setup["sens"], setup["scaled"]
    table = build_table({"self": transfer.source_groups(report)}, report["config"]["n_buckets"])
    transferred = sens.scaled(table.factors(read_inventory(tiny_model), [t.name for t in sens.tensors]))
    lo, hi = sens.min_bytes(), sens.max_bytes()
    for frac in (0.2, 0.5, 0.8):
        target = int(lo + frac * (hi - lo))
        assert ALLOCATORS["greedy"](transferred, target) == ALLOCATORS["greedy"](measured, target)


def test_table_file_round_trip_and_damage(tmp_path: Path) -> None:
    t = build_table({"a": _groups({("attn_k", 0): 0.1, ("attn_k", 1): 0.3})}, 4)
    p = transfer.save(t, tmp_path / "t.json")
    assert transfer.load(p) == t
    with pytest.raises(RampError, match="no such file"):
        transfer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RampError, match="not JSON"):
        transfer.load(tmp_path / "bad.json")
    d = json.loads(p.read_text())
    d["records"][0][2] = "nan"
    (tmp_path / "nan.json").write_text(json.dumps(d))
    with pytest.raises(RampError, match="damaged"):
        transfer.load(tmp_path / "nan.json")
    with pytest.raises(RampError, match="not a measured group report"):
        transfer.source_groups({"config": {"n_buckets": 4}, "groups": [{"role": "attn_k"}]})


def test_the_shipped_table_loads_and_knows_the_linear_roles(tiny_model: Path) -> None:
    """The table's sources are dense llama-style models: it knows every linear role such a model has (the
    MoE, MLA and hybrid roles of ROLES fall back to the mean, transfer.py's docstring)."""
    t = transfer.load()
    assert len(t.sources) >= 2
    roles = {r.role for r in t.records}
    linear = {x.role for x in read_inventory(tiny_model).searched}
    assert len(linear) == 7 and linear <= {r.name for r in ROLES}  # q k v o gate up down
    assert linear <= roles, linear - roles
    for role in linear:  # every depth bucket of every linear role, from every source
        assert {r.bucket for r in t.records if r.role == role} == set(range(t.n_buckets))


def test_search_with_transferred_sensitivity(setup: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    tf = setup["text_file"]
    cfg = SizedConfig(text=str(tf), n_ctx=128, chunks=2, calib=CalibConfig(text=str(tf), samples=2, ctx=64))
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    r = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", size, cfg, presets=(),
        sensitivity="transferred", fold="on"))
    assert r.file_bytes <= r.target_bytes
    report = json.loads(r.report.read_text())
    assert report["summary"]["sensitivity"] == "transferred"
    assert report["summary"]["ratio_sources"] == list(transfer.load().sources)
    assert "kld_groups" not in report["summary"]
    assert not list((tmp_path / "run").rglob("groups-*.json"))  # no group probe ran
    costs = {c["stage"]: c for c in report["costs"]["stages"]}
    assert not any(s.startswith("group probes") for s in costs)
    meta = {f.name: f.contents() for f in GGUFReader(r.gguf).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.sensitivity"] == "transferred"


def test_cli_refuses_a_damaged_table_before_work(tiny_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "t.json"
    bad.write_text("[]")
    monkeypatch.setattr(transfer, "SHIPPED", bad)
    out = tmp_path / "r"
    r = runner.invoke(app, ["search", "--model", str(tiny_model), "--out", str(out), "--size", "Q4_K_M",
                            "--method", "greedy", "--sensitivity", "transferred"])
    one_error_line(r, "not a ramp-cpp group ratio table")
    assert not out.exists()


@pytest.mark.parametrize("tied", [False, True])
def test_a_tied_embedding_is_its_own_role(tied: bool, tmp_path: Path) -> None:
    """A token_embd that is the head too takes the ratio of tied sources only, and an input-only one that of
    untied sources only."""
    rows = [
        {"role": "attn_q", "blocks": [0, 0], "ratio": 1.0},
        {"role": "ffn_up", "blocks": [0, 0], "ratio": 1.0},  # the median stays 1 with or without output
        {"role": "token_embd", "blocks": None, "ratio": 100.0 if tied else 0.01},
    ]
    if not tied:
        rows.append({"role": "output", "blocks": None, "ratio": 1.0})
    src = transfer.source_groups({"config": {"n_buckets": 1}, "groups": rows})
    assert {g.role for g in src} >= {transfer.TIED_EMBD if tied else "token_embd"}
    t = build_table({"s": src}, 1)
    for target_tied in (False, True):
        spec = synthetic.Spec(tied=target_tied)
        info = read_inventory(synthetic.write(tmp_path / f"{target_tied}.gguf", spec))
        names = [x.name for x in searched_tensors(info)]
        f = t.factors(info, names)["token_embd.weight"]
        if target_tied == tied:
            assert f == pytest.approx(100.0 if tied else 0.01)
        else:
            assert f == 1.0  # no source of its kind: the median


def test_dry_run_transferred_plans_no_probe_and_folds(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """The command line's transferred sensitivity: no group probes and, unless --fold says otherwise, no
    fold decision either (folding on), so the plan holds no evaluation before the final one."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    args = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "run"), "--method", "greedy",
            "--size", str((lo + hi) // 2), "--text", str(text_file), "--chunks", "2", "--ctx", "64",
            "--recipe", str(recipe), "--threads", "1", "--dry-run"]
    r = runner.invoke(app, [*args, "--sensitivity", "transferred"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "tensor cache + proxy (folded)" in r.output
    assert "group probes" not in r.output and "unfolded" not in r.output
    m = runner.invoke(app, [*args, "--sensitivity", "measured"], env={"COLUMNS": "200"})
    assert m.exit_code == 0 and "group probes" in m.output  # the control: the default plans them
    assert "unfolded" in m.output  # and the fold check, whose unfolded stages are marked
    for extra in (["--sensitivity", "proxy"], ["--method", "uniform"]):  # the other zero-evaluation runs
        z = runner.invoke(app, [*args, *extra], env={"COLUMNS": "200"})
        assert z.exit_code == 0, z.output
        assert "group probes" not in z.output and "unfolded" not in z.output, extra


@pytest.mark.parametrize(("sensitivity", "method", "want"), [
    ("transferred", "greedy", "on"),
    ("proxy", "greedy", "on"),
    (None, "uniform", "on"),
    ("proxy", "policy", "on"),  # apply: the policy's rollout evaluates nothing
    ("measured", "greedy", "check"),
    ("measured", "policy", "check"),
    ("proxy", "sac", "check"),  # the search's own evaluations: a fold decision is a small share of them
    ("transferred", "sac", "check"),
])
def test_fold_is_on_by_default_only_where_nothing_else_evaluates(sensitivity, method, want) -> None:
    assert default_fold(sensitivity, "check", method) == want
