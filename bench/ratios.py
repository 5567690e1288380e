"""Group ratio tables (`ramp_cpp.measure.transfer`) from the benchmark models' measured greedy runs.

Each model's measured groups are those of its cell `offgrid-s0|fold|greedy-measured|Q4_K_M|16` in
`bench/results/<model>.json` (the probes do not depend on the size: one calibration per model serves every
size). `leave_out(key)` is the table of every other model (the leave-one-out baseline `greedy-transferred` of
`bench/compare.py`); `--write` writes the table of all of them to the file the package ships.

    .venv/bin/python -m bench.ratios                 # print the table of all three
    .venv/bin/python -m bench.ratios --write         # ramp_cpp/data/group-ratios.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ramp_cpp.measure import transfer

HERE = Path(__file__).resolve().parent
MODELS = ("smollm2", "qwen0.5b", "gemma270m")
CELL = "offgrid-s0|fold|greedy-measured|Q4_K_M|16"


def measured_groups(key: str, results: Path = HERE / "results") -> tuple[transfer.SourceGroup, ...]:
    path = results / f"{key}.json"
    cells = json.loads(path.read_text())["cells"]
    if CELL not in cells or "kld_groups" not in cells[CELL]:
        raise SystemExit(f"{path}: no {CELL} with kld_groups (run bench/compare.py {key} "
                         "--bases offgrid --fold on --sizes Q4_K_M --methods greedy-measured)")
    return transfer.source_groups(cells[CELL]["kld_groups"], f"{path}:{CELL}")


def n_buckets(key: str, results: Path = HERE / "results") -> int:
    cells = json.loads((results / f"{key}.json").read_text())["cells"]
    return int(cells[CELL]["kld_groups"]["config"]["n_buckets"])


def table(keys: tuple[str, ...]) -> transfer.RatioTable:
    buckets = {n_buckets(k) for k in keys}
    if len(buckets) != 1:
        raise SystemExit(f"the sources were probed with different depth buckets: {sorted(buckets)}")
    return transfer.build_table({k: measured_groups(k) for k in keys}, buckets.pop())


def leave_out(key: str) -> transfer.RatioTable:
    """The table of every benchmark model but `key`."""
    return table(tuple(m for m in MODELS if m != key))


def correlations() -> list[tuple[str, str, float, int]]:
    """Pearson correlation of two models' centred log-ratios over the (role, bucket) keys both have: does a
    group's ratio carry over from one model to another?"""
    import numpy as np

    cent = {k: {(r.role, r.bucket): r.log_ratio for r in table((k,)).records} for k in MODELS}
    out = []
    for i, a in enumerate(MODELS):
        for b in MODELS[i + 1 :]:
            keys = sorted(set(cent[a]) & set(cent[b]), key=str)
            x, y = (np.array([cent[m][k] for k in keys]) for m in (a, b))
            out.append((a, b, float(np.corrcoef(x, y)[0, 1]), len(keys)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {transfer.SHIPPED}")
    a = ap.parse_args()
    for m1, m2, r, n in correlations():
        print(f"{m1} vs {m2}: correlation of centred log-ratios {r:+.2f} over {n} groups")
    t = table(MODELS)
    for r in t.records:
        where = "" if r.bucket is None else f"@q{r.bucket}"
        print(f"{r.role + where:18s} ×{math.exp(r.log_ratio):10.4g}  ({r.n_sources} models)")
    if a.write:
        print(transfer.save(t, transfer.SHIPPED, force=True))


if __name__ == "__main__":
    main()
