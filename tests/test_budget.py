"""Budgets (allocate/budget.py): action -> rung mapping, budget measures against written bytes, feasibility,
repair; and a budget out of range refused by `search` and `apply` before any expensive work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_paper_search import small
from typer.testing import CliRunner

from ramp_cpp.allocate.budget import Budget, costs, parse_size, repair, rung_of, size_budget
from ramp_cpp.allocate.sac.agent import SACConfig
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import quantize_map


@pytest.mark.parametrize(
    ("action", "k", "rung"),
    [
        (-1.0, 4, 0),
        (1.0, 4, 3),
        (0.0, 4, 2),
        (-0.01, 4, 1),
        (-0.66, 4, 1),
        (-0.67, 4, 0),
        (0.66, 4, 2),
        (0.67, 4, 3),
        (-5.0, 4, 0),
        (5.0, 4, 3),
        (0.0, 3, 1),
        (-0.49, 3, 1),
        (0.51, 3, 2),
        (-0.01, 2, 0),
        (0.0, 2, 1),
        (0.3, 1, 0),
    ],
)
def test_rung_of(action: float, k: int, rung: int) -> None:
    assert rung_of(action, k) == rung


@pytest.mark.parametrize(
    ("spec", "nbytes"),
    [
        ("95MiB", 95 * 2**20),
        ("3.6GB", 3_600_000_000),
        ("120M", 120_000_000),
        ("2GiB", 2 * 2**30),
        ("512", 512),
    ],
)
def test_parse_size(spec: str, nbytes: int) -> None:
    assert parse_size(spec) == nbytes


def test_parse_size_rejects() -> None:
    with pytest.raises(RampError, match="--size"):
        parse_size("big")


def test_predicted_bytes_equal_written(tiny_model: Path, tmp_path: Path) -> None:
    """Costs predict every rung's bytes and the file size of llama.cpp's output."""
    m = read_inventory(tiny_model)
    vis = list(m.searched)
    c = costs(m, vis, (3, 4, 5, 6))
    rng = np.random.default_rng(0)
    rungs = [int(x) for x in rng.integers(0, 4, len(vis))]
    r = quantize_map(tiny_model, tmp_path / "q.gguf", c.types_of(rungs))
    written = {t.name: t for t in r.tensors}
    for i, t in enumerate(vis):
        assert written[t.name].ggml_type == c.types[i][rungs[i]]
    meas = c.measures(rungs)
    data = sum(written[t.name].nbytes for t in vis)
    assert meas.bpw == pytest.approx(data * 8 / sum(t.n_params for t in vis), rel=0.01)  # padding only
    assert abs(meas.file_bytes - r.file_size) <= 64  # header: file_type/quantization_version keys differ
    assert meas.bpw_nominal == pytest.approx(np.mean([(3, 4, 5, 6)[x] for x in rungs]))


def test_feasible_range_and_budget_check(tiny_model: Path) -> None:
    m = read_inventory(tiny_model)
    c = costs(m, list(m.searched), (3, 4, 5, 6))
    lo, hi = c.feasible("nominal")
    assert (lo, hi) == (3.0, 6.0)
    c.check_budget(Budget(4.25, mode="nominal"))
    with pytest.raises(RampError, match=r"feasible range 3\.000-6\.000"):
        c.check_budget(Budget(2.5, mode="nominal"))
    wlo, whi = c.feasible("weighted")
    assert 3.4 < wlo < whi < 8.6


def test_size_budget(tiny_model: Path) -> None:
    m = read_inventory(tiny_model)
    assert size_budget(m, "1MiB") == pytest.approx(2**20 * 8 / m.n_params_total)


@pytest.mark.parametrize("mode", ["nominal", "weighted"])
def test_repair_fits_and_spends(tiny_model: Path, mode: str) -> None:
    m = read_inventory(tiny_model)
    c = costs(m, list(m.searched), (3, 4, 5, 6))
    n = len(c.names)
    b = Budget(4.5 if mode == "nominal" else 5.5, mode=mode)
    over = repair([3] * n, [1.0] * n, c, b)
    assert c.measures(over).value(mode) <= b.ceiling
    under = repair([0] * n, [-1.0] * n, c, b)
    v = c.measures(under).value(mode)
    assert v <= b.target
    # no single further promotion would still fit under the target
    for i in range(n):
        if under[i] < 3:
            x = list(under)
            x[i] += 1
            assert c.measures(x).value(mode) > b.target


def test_repair_demotes_least_certain_first(tiny_model: Path) -> None:
    m = read_inventory(tiny_model)
    c = costs(m, list(m.searched), (3, 4))
    n = len(c.names)
    # all at 4 bits: tensor 0 barely (u just above 0.5), the rest confidently
    actions = [0.01] + [0.9] * (n - 1)
    out = repair([1] * n, actions, c, Budget(4.0 - 1.0 / n + 1e-9, margin=0.0, mode="nominal"))
    assert out[0] == 0 and sum(out) == n - 1


# -- a budget out of range is refused before any work ------------------------------------------------


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import ramp_cpp.calibration.collect
    import ramp_cpp.fold.folding
    import ramp_cpp.measure.tensorcache

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("expensive work started before the budget check")

    monkeypatch.setattr(ramp_cpp.calibration.collect, "calibrate", boom)
    monkeypatch.setattr(ramp_cpp.fold.folding, "fold", boom)
    monkeypatch.setattr(ramp_cpp.measure.tensorcache, "build_cache", boom)


runner = CliRunner()


def test_apply_budget_policy_refuses_workers(
    tiny_model: Path, policy: Path, tmp_path: Path, no_work: None
) -> None:
    r = runner.invoke(
        app, ["apply", str(policy), str(tiny_model), "-o", str(tmp_path / "o.gguf"), "--budget", "4.5",
              "--workers", "2"],
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--workers/--ray" in lines[0], r.output
    assert not (tmp_path / "o.gguf").exists()


def test_apply_checks_the_budget_first(tiny_model: Path, policy: Path, tmp_path: Path, no_work: None) -> None:
    from ramp_cpp.pipeline.paper.apply import ApplyConfig, apply_policy

    with pytest.raises(RampError, match="feasible range"):
        apply_policy(policy, tiny_model, tmp_path / "o.gguf", ApplyConfig(budget=2.5, budget_mode="nominal"))
    r = runner.invoke(
        app, ["apply", str(policy), str(tiny_model), "-o", str(tmp_path / "o.gguf"), "--size", "100KiB"]
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "feasible range" in lines[0], r.output
    assert not (tmp_path / "o.gguf").exists()


def test_search_checks_the_budget_first(
    tiny_model: Path, text_file: Path, tmp_path: Path, no_work: None
) -> None:
    from ramp_cpp.pipeline.paper.run import search

    with pytest.raises(RampError, match="feasible range"):
        search(tiny_model, tmp_path / "r", replace(small(text_file), budget=7.0), SACConfig(episodes=1))
    assert not (tmp_path / "r").exists()
