"""The plan before spending (pipeline/estimate.py, `search --size ... --dry-run`): the stages it lists, their
evaluation units and quantizer passes are the ones a real run then meters (counts, exact; times are only
expected), and a dry run writes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType
from test_cli_search import one_error_line
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.cli.app import app
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.estimate import StagePlan, estimate, speed_probe, total
from ramp_cpp.pipeline.plan import plan_run, size_range
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig

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
    plan = plan_run(tiny_model, tmp_path / "run", c.method, size, cfg, cc, calib, c.sensitivity, c.gcfg,
                    None, None, tmp_path / "cache", c.fold)
    opts = RuntimeOptions(n_threads=1)
    stages = estimate(plan, c.presets, opts, speed_probe(plan, opts, c.presets))
    assert not (tmp_path / "run").exists()  # planning and probing write nothing
    r = run_direct(tiny_model, tmp_path / "run", c.method, size, cfg, cc, opts, presets=c.presets, **args)
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
    return {str(p): p.stat().st_mtime_ns for r in roots if r.exists() for p in r.rglob("*")}


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
    for stage in ("calibrate", "fold", "base log-probs", "presets", "tensor cache + proxy (folded)",
                  "group probes (folded)", "fold decision", "allocate", "evaluate", "total"):
        assert stage in r.output, stage
    assert "if the check keeps the unfolded model" in r.output  # --fold check: the second measurement
    for stage in ("tensor cache + proxy (unfolded)†", "group probes (unfolded)†", "total†"):
        assert stage in r.output, stage
    one_error_line(runner.invoke(app, ["search", "--model", str(tiny_model), "--budget", "4.5",
                                       "--dry-run"]), "--dry-run")


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
