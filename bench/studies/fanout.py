"""The benchmark's cells fanned out over Ray workers give the serial run's rows (issue 22, item 5).

    .venv/bin/python -m bench.studies.fanout smollm2 [--workers 2] [--sizes Q4_K_M,Q3_K_M]
        [--methods uniform,greedy] [--chunks 4]

Runs `bench/compare.py MODEL --bases offgrid --fold on ...` three times, each into its own results folder
under bench/out/fanout/: `warm` (serially, so that the shared files, folded copy, sensitivity and base
log-probs exist before anything is timed), `serial`, and `workersN` (`--workers N`). Every run computes every
cell anew (empty results folder). Prints and writes (bench/results/fanout.json) each mode's wall time and, per
cell, whether every field but the timings is equal to the serial run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from bench.paths import BENCH

HERE = BENCH
TIMINGS = ("t_measure", "t_allocate", "t_search", "t_eval_mean", "t_update_mean")


def run(model: str, mode: str, a: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    out = HERE / "out" / "fanout" / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "bench.compare", model, "--bases", "offgrid", "--fold", "on",
           "--sizes", a.sizes, "--methods", a.methods, "--chunks", str(a.chunks), "--results", str(out)]
    if mode.startswith("workers"):
        cmd += ["--workers", str(a.workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=HERE.parent)  # where `bench` imports
    wall = time.perf_counter() - t0
    return wall, json.loads((out / f"{model}.json").read_text())["cells"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--methods", default="uniform,greedy")
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    run(a.model, "warm", a)
    modes = {m: run(a.model, m, a) for m in ("serial", f"workers{a.workers}")}
    (t_serial, serial), (t_par, par) = modes["serial"], modes[f"workers{a.workers}"]
    cells = []
    for key in sorted(serial):
        s, p = serial[key], par.get(key, {})
        differ = sorted(f for f in set(s) | set(p) if f not in TIMINGS and s.get(f) != p.get(f))
        cells.append({"cell": key, "kld_mean": s["kld_mean"], "file_bytes": s["file_bytes"],
                      "differ": differ})
    result = {
        "command": " ".join([".venv/bin/python", "-m", "bench.studies.fanout", *sys.argv[1:]]),
        "model": a.model,
        "wall_s": {"serial": t_serial, f"workers{a.workers}": t_par},
        "ratio": t_par / t_serial,
        "same_cells": sorted(serial) == sorted(par),
        "cells": cells,
    }
    path = HERE / "results" / "fanout.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"| mode | wall | vs serial |\n|---|---|---|\n| serial | {t_serial:.0f} s | 1.00× |\n"
          f"| workers{a.workers} | {t_par:.0f} s | {t_par / t_serial:.2f}× |\n")
    print("| cell | held-out KLD | bytes | fields that differ from serial |\n|---|---|---|---|")
    for c in cells:
        differ = ", ".join(c["differ"]) or "none"
        name = c["cell"].replace("|", " · ")
        print(f"| {name} | {c['kld_mean']:.6f} | {c['file_bytes']} | {differ} |")


if __name__ == "__main__":
    main()
