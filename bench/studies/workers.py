"""Serial vs Ray workers on a real model (issue 22): same probe values, same allocation, same file, and the
wall time of the stages the executor spreads (the group probes of both foldings and the --fold auto decision).

One cold serial run prepares everything (`cold`: calibration, folded copy, measurements, tensor caches of both
foldings, probes, file). Each later mode copies the cold run folder (the folded copy hard-linked), deletes the
saved probe evaluations (groups-*.json) and runs the same request again, so it re-does exactly the probes and
the fold decision, on warm caches, through its executor:

    serial      in this process, llama.cpp on all cores (what `search` does without --workers)
    workersN    `--workers N`: a local Ray cluster, N jobs at once, cores / N threads each; with --gpu-layers,
                the machine's one GPU shared by the N jobs (1/N each): workers1,workers2,workers4,workers8
    kill        as workers2, and a Ray worker process is killed (SIGKILL) while a probe runs on it

`--seed-from RUN` starts the cold run from another run's calibration and tensor caches (hard-linked).
Resumable: finished modes are kept in bench/results/workers.json and skipped.

    .venv/bin/python -m bench.studies.workers smollm2 --size Q4_K_M --modes cold,serial,workers2,kill
    .venv/bin/python -m bench.studies.workers - --table        # docs/workers.md's table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.models import base_path
from bench.paths import BENCH
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.executor import Executor, RayExecutor, Serial
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.pipeline.request import Hooks, SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SEARCH_GROUPS, SEARCH_RECIPE, SizedConfig

HERE = BENCH
RESULTS = HERE / "results" / "workers.json"
SPREAD = ("group probes (folded)", "group probes (unfolded)", "fold decision")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def ray_workers() -> list[int]:
    """pids of Ray worker processes that run one of our jobs (their title is ray::_counted)."""
    out = subprocess.run(["pgrep", "-f", "ray::_counted"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def killer(stop: threading.Event, killed: list[int], after: float) -> None:
    """Kill one busy Ray worker `after` seconds into the probes."""
    t0 = time.time()
    while not stop.is_set() and not killed:
        pids = ray_workers()
        if pids and time.time() - t0 > after:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            log(f"killed Ray worker {pids[0]}")
        time.sleep(0.5)


def seed_from(src: Path, out: Path) -> None:
    """Start the cold run from another run of the same model's calibration and tensor caches (hard links:
    no disk; the probes saved there are not carried over)."""
    if (out / "cache").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "cache", out / "cache", copy_function=os.link,
                    ignore=shutil.ignore_patterns("groups-*.json"))
    shutil.copy2(src / "calib.safetensors", out / "seed-calib.safetensors")


def run(key: str, size: str, mode: str, out: Path, gpu_layers: int = 0) -> dict[str, Any]:
    model = base_path(key)
    seed = out / "seed-calib.safetensors"
    cold = out / "cold"
    rd = out / mode
    cache = out / "cache"
    if mode != "cold":
        if not (cold / "report.json").is_file():
            raise SystemExit("run the cold mode first")
        shutil.rmtree(rd, ignore_errors=True)
        shutil.copytree(
            cold, rd, copy_function=os.link,
            ignore=shutil.ignore_patterns("*ramp-*.gguf", "report.json", "allocation.json", "pareto.png"),
        )
        for g in cache.rglob("groups-*.json"):
            g.unlink()
    n = int(mode.removeprefix("workers")) if mode.startswith("workers") else 2
    ex: Executor = Serial()
    if mode not in ("cold", "serial"):
        ex = RayExecutor(n, max(1, (os.cpu_count() or 1) // n), 1.0 / n if gpu_layers else 0.0)
    stop, killed = threading.Event(), list[int]()
    if mode == "kill":
        threading.Thread(target=killer, args=(stop, killed, 20.0), daemon=True).start()
    cfg = SizedConfig(calib=load_recipe(SEARCH_RECIPE))
    t0 = time.perf_counter()
    try:
        r = run_direct(SizedRequest(model, rd, "greedy", size, cfg, calib=seed if seed.is_file() else None,
            presets=(), sensitivity="measured", gcfg=SEARCH_GROUPS, cache_root=cache, fold="auto"),
            RuntimeOptions(n_gpu_layers=gpu_layers),
            hooks=Hooks(on_cost=lambda s: log(f"{key} {mode}: {s.stage} {s.wall_s:.0f} s, {s.E:.2f} E")),
            executor=ex)
    finally:
        stop.set()
        ex.close()
    report = json.loads(r.report.read_text())
    costs = {c["stage"]: c for c in report["costs"]["stages"]}
    groups = report["summary"]["kld_groups"]
    return {
        "model": model.name,
        "size": size,
        "executor": ex.describe(),
        "gguf_sha256": sha256(r.gguf),
        "reward_kld": r.kld,
        "fold": report["summary"]["fold"]["choice"],
        "fold_reward_kld": report["summary"]["fold"].get("reward_kld"),
        "probe_klds": [g["kld"] for g in groups["groups"]],
        "spread_wall_s": sum(costs[s]["wall_s"] for s in SPREAD if s in costs),
        "spread_E": sum(costs[s]["E"] for s in SPREAD if s in costs),
        "stages": {s: costs[s]["wall_s"] for s in SPREAD if s in costs},
        "wall_s": time.perf_counter() - t0,
        "killed_workers": killed,
        "cpus": os.cpu_count(),
    }


def table() -> str:
    """The markdown table of docs/workers.md from bench/results/workers.json."""
    d = json.loads(RESULTS.read_text())
    rows = [
        "| model, size | mode | executor | group probes (unfolded + folded) | fold decision | spread stages "
        "| vs serial | GGUF sha256 | probe KLDs = cold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in d.items():
        model, size, mode = k.split("/")
        cold = d[f"{model}/{size}/cold"]
        serial = d.get(f"{model}/{size}/serial", cold)
        st = v["stages"]
        probes = st.get("group probes (unfolded)", 0) + st.get("group probes (folded)", 0)
        killed = f", worker {v['killed_workers'][0]} killed" if v["killed_workers"] else ""
        rows.append(
            f"| {model} {size} | {mode} | {v['executor']}{killed} | {probes:.0f} s | "
            f"{st.get('fold decision', 0):.0f} s | {v['spread_wall_s']:.0f} s | "
            f"{v['spread_wall_s'] / serial['spread_wall_s']:.2f}× | `{v['gguf_sha256'][:16]}` | "
            f"{'yes' if v['probe_klds'] == cold['probe_klds'] else 'NO'} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", default="Q4_K_M")
    ap.add_argument("--modes", default="cold,serial,workers2,kill")
    ap.add_argument("--seed-from", type=Path, help="a run folder of the same model (calibration, caches)")
    ap.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded (a CUDA build)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results and stop")
    a = ap.parse_args()
    if a.table:
        print(table())
        return 0
    out = HERE / "out" / "workers" / a.model / a.size
    if a.seed_from:
        seed_from(a.seed_from, out)
    d = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for mode in a.modes.split(","):
        k = f"{a.model}/{a.size}/{mode}"
        if k in d:
            log(f"{k}: done")
            continue
        if mode not in ("cold", "serial", "kill") and not mode.removeprefix("workers").isdigit():
            raise SystemExit(f"unknown mode {mode!r}: cold, serial, workersN, kill")
        d[k] = run(a.model, a.size, mode, out, a.gpu_layers)
        log(f"{k}: {json.dumps({x: d[k][x] for x in ('gguf_sha256', 'spread_wall_s', 'killed_workers')})}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
