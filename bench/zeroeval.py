"""Screening zero-evaluation allocators offline, with each model's measured sensitivity as the judge.

For every benchmark model whose folded sensitivity is cached (`bench/compare.py` made it) and every size, each
candidate sensitivity below is allocated by greedy (uniform by itself), and the allocation is scored by the
*measured* sensitivity of that model (its proxy rescaled by its own 33 group probes, stored in
`bench/results/<model>.json`): predicted ΔKLD = Σ_t ratio_g(t) · (error_t(τ_t) − error_t(highest)), the sum
`groups.py` calibrates (additive within 2–3% on the pairs it checks). No model is evaluated here: the
candidates that look best are then run for real through `bench/compare.py` (held-out KLD), which decides.

Candidates (all zero evaluations on the target but `measured`):
    uniform        no errors read
    proxy          the proxy as it is (greedy's `--sensitivity proxy`)
    transferred    the proxy × the other two models' centred group ratios (bench/ratios.py)
    relative-w     each tensor's errors divided by its error at its highest option (≈ relative error, since
                   the highest type's relative error is about the same everywhere), times n_params^w

    .venv/bin/python bench/zeroeval.py [--models smollm2,qwen0.5b,gemma270m]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import HERE, Fold, prepare  # noqa: E402
from ratios import CELL, leave_out  # noqa: E402

from ramp_cpp.allocate.allocators import ALLOCATORS  # noqa: E402
from ramp_cpp.llama.ggufio import read_inventory  # noqa: E402
from ramp_cpp.measure.groups import groups_of  # noqa: E402
from ramp_cpp.measure.proxy import measure  # noqa: E402
from ramp_cpp.measure.sensitivity import Sensitivity  # noqa: E402

SIZES = ("Q4_K_M", "Q3_K_M")


def measured_factors(cells: dict[str, Any], info: Any, names: list[str]) -> dict[str, float]:
    rep = cells[CELL]["kld_groups"]
    by_name = {g["name"]: g["ratio"] for g in rep["groups"]}
    out = {}
    for g in groups_of(info, names, rep["config"]["n_buckets"]):
        out.update((n, float(by_name[g.name])) for n in g.tensors)
    return out


def relative(sens: Sensitivity, w: float) -> Sensitivity:
    return sens.scaled({t.name: t.n_params**w / t.options[-1].error for t in sens.tensors})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen0.5b,gemma270m")
    a = ap.parse_args()
    rows = []
    for key in a.models.split(","):
        cells = json.loads((HERE / "results" / f"{key}.json").read_text())["cells"]
        b = prepare(key, "offgrid", 0, str(HERE.parent / "calib" / "bench.toml"))
        src, cal = b.model(Fold.parse("on"))
        sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
        info = read_inventory(src)
        names = [t.name for t in sens.tensors]
        judge = sens.scaled(measured_factors(cells, info, names))
        top = {t.name: t.options[-1].ggml_type for t in sens.tensors}
        cands = {
            "proxy": sens,
            "transferred": sens.scaled(leave_out(key).factors(info, names)),
            **{f"relative-{w:g}": relative(sens, w) for w in (0.0, 0.5, 1.0)},
            "measured": judge,
        }
        for size in SIZES:
            target = cells[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"]
            row = {"model": key, "size": size}
            pick = {"uniform": ALLOCATORS["uniform"](sens, target)}
            pick |= {n: ALLOCATORS["greedy"](s, target) for n, s in cands.items()}
            for n, choice in pick.items():
                row[n] = judge.error(choice) - judge.error(top)
            rows.append(row)
            ref = row["measured"]
            print(f"{key:9s} {size}: " + "  ".join(f"{n} {v / ref:.2f}×" for n, v in row.items()
                                                     if n not in ("model", "size")), flush=True)
    (HERE / "results" / "zeroeval.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
