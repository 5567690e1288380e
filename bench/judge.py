"""The offline judge several studies share (`bench.studies.zeroeval`, `across`, `relproxy`): a benchmark
model's folded off-grid base as `bench.compare` measured it, with its proxy sensitivity rescaled by the
model's own measured group probes (cell `ratios.CELL` of bench/results/<model>.json). An allocation scored by
that `judge` is a predicted ΔKLD, no model evaluated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compare import HERE, Fold, prepare
from bench.ratios import CELL
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.groups import groups_of
from ramp_cpp.measure.proxy import measure
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.measure.transfer import TIED_EMBD

#: the sizes each held-out model is judged at
SIZES = ("Q4_K_M", "Q3_K_M")


def measured_factors(cells: dict[str, Any], info: Any, names: list[str]) -> dict[str, float]:
    rep = cells[CELL]["kld_groups"]
    by_name = {g["name"]: g["ratio"] for g in rep["groups"]}
    out: dict[str, float] = {}
    for g in groups_of(info, names, rep["config"]["n_buckets"]):
        out.update((n, float(by_name[g.name])) for n in g.tensors)
    return out


@dataclass(frozen=True)
class Judged:
    """A benchmark model's folded off-grid base as bench/compare.py measured it: its cells, the bench's
    calibration, the proxy `sens` and the `judge` (the proxy rescaled by the model's own measured groups)."""

    cells: dict[str, Any]
    base: Any  # compare.Base
    src: Path
    cal: Any  # Calibration
    sens: Sensitivity
    info: Any  # ModelInfo
    names: list[str]
    judge: Sensitivity


def judged(key: str) -> Judged:
    cells = json.loads((HERE / "results" / f"{key}.json").read_text())["cells"]
    b = prepare(key, "offgrid", 0, str(HERE.parent / "calib" / "bench.toml"))
    src, cal = b.model(Fold.parse("on"))
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    info = read_inventory(src)
    names = [t.name for t in sens.tensors]
    return Judged(cells, b, src, cal, sens, info, names, sens.scaled(measured_factors(cells, info, names)))


def group_keys(info: Any, names: list[str]) -> dict[str, tuple[str, int | None]]:
    out: dict[str, tuple[str, int | None]] = {}
    for g in groups_of(info, names, 4):
        role = TIED_EMBD if g.role == "token_embd" and info.tied_output else g.role
        out.update((n, (role, g.bucket)) for n in g.tensors)
    return out
