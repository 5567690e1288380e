"""What `ramp-cpp search --method greedy --size S` costs, stage by stage, with yesterday's defaults and with
today's (issue 21), and what the file it writes is worth on held-out text.

Each run is cold: its own run folder and cache under bench/out/costs/<model>/<config>-<size>/ (the base
log-probs in the user cache are shared, and counted where they were first computed). The costs are counted by
the run itself (`ramp_cpp.costs`: wall, CPU, peak RSS, bytes written, disk held, E units, quantizer passes);
the held-out KLD is the written GGUF against the base on `wikitext2-test` chunks 0..15 of 512 tokens, as
bench/compare.py scores every cell. Resumable: a finished (model, config, size) is kept in
bench/results/costs.json and skipped; an interrupted run resumes from its run folder.

    .venv/bin/python -m bench.costs smollm2 --configs old,new --sizes Q4_K_M,Q3_K_M
    .venv/bin/python -m bench.costs 7b --configs new --sizes Q4_K_M --no-eval    # bench/shapes.py's model
    .venv/bin/python -m bench.costs 7b --configs new --sizes Q4_K_M --no-eval --tail  # its last stages again
    .venv/bin/python -m bench.costs 7b --configs new --sizes Q4_K_M --no-eval --again --state  # all again
    .venv/bin/python -m bench.costs --table                                        # the markdown tables

Configs: `old` is the default of `search --method greedy --size` before issue 21 (the paper's calibration
recipe, 128 x 2048 tokens; the twelve default candidate types; `--fold auto`, both foldings measured; group
probes of 4 depth buckets with 3 pair checks on the 4 reward chunks; presets Q4_K_M and Q3_K_M scored).
`old-bench` is the same with the benchmarks' 16 x 512 calibration (what bench/compare.py's cells used).
`new` is today's default (ramp_cpp.pipeline.sizedconfig.SEARCH_*). `new-3b` is the previous one (3 depth
buckets, the tensor cache on disk, the proxy on every row; its cells were stored as `new` until 2026-12-02);
`new-b4` that with 4 depth buckets; `new-mem` / `new-disk` that with `--tensor-cache memory` / `disk`;
`new-rs4` `new-mem` with the proxy on every 4th span of 16 rows (`--row-sample 4`); `new-b4-rs4` that with 4
depth buckets (today's default, spelled out).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.models import MODELS, base_path
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.costs import StageCost
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.request import Hooks, SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import (
    SEARCH_FOLD,
    SEARCH_GROUPS,
    SEARCH_RECIPE,
    SEARCH_ROW_SAMPLE,
    SizedConfig,
)
from ramp_cpp.store.cache import cache_dir
from ramp_cpp.store.texts import load_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "costs.json"
#: a run's small results (--state): a 7B-shaped run takes longer than one session of a 2-core machine, so the
#: results that cost decoding and quantizing are carried across sessions (everything large - the folded copy,
#: the tensor cache's base type - is made again). Kept under the user cache, not in git (14 MB a cell, most of
#: it the calibration): $RAMP_BENCH_STATE, else ~/.cache/ramp-cpp/bench-state ($RAMP_CACHE_DIR's when set);
#: copy that folder to carry a run to another machine.
STATE = Path(os.environ.get("RAMP_BENCH_STATE") or cache_dir() / "bench-state")
STATE_FILES = (
    "run.json", "predicted.json", "stages.jsonl", "calib.safetensors", "presets.json", "scores.json",
    "pauses.jsonl",
)
#: a run stopped (SIGSTOP) while other work had the cores, one line each: {"stop": t, "cont": t, "why": "..."}
#: (epoch seconds, appended by whoever stops it); the table takes each stage's overlap with them off its wall
PAUSES = "pauses.jsonl"
STATE_GLOBS = ("cache/*/measure-*.json", "cache/*/groups-*.json")
GIB = 1 << 30
SHAPES = {"7b": "shape-7b.f16.gguf", "1b": "shape-1b.f16.gguf"}  # written by bench/shapes.py


@dataclass(frozen=True)
class Config:
    recipe: str
    cc: CandidateConfig
    gcfg: GroupConfig
    fold: str
    presets: tuple[str, ...]
    tensor_cache: str = "auto"
    row_sample: int = 1


#: the default of `search --size` before the in-memory cache: 3 depth buckets, the cache on disk, every row
PREV_GROUPS = GroupConfig(n_buckets=3, pairs=0, chunks=2)
B4 = replace(PREV_GROUPS, n_buckets=4)

CONFIGS = {
    "old": Config("paper", CandidateConfig(), GroupConfig(), "auto", ("Q4_K_M", "Q3_K_M"), "disk"),
    "old-bench": Config("bench", CandidateConfig(), GroupConfig(), "auto", ("Q4_K_M", "Q3_K_M"), "disk"),
    # today's default (ramp_cpp.pipeline.sizedconfig.SEARCH_*)
    "new": Config(SEARCH_RECIPE, CandidateConfig(), SEARCH_GROUPS, SEARCH_FOLD, (),
                  row_sample=SEARCH_ROW_SAMPLE),
    # the previous default (stop 27): 3 depth buckets, the tensor cache on disk, the proxy on every row
    "new-3b": Config(SEARCH_RECIPE, CandidateConfig(), PREV_GROUPS, SEARCH_FOLD, (), "disk"),
    # that with 4 depth buckets: is the coarser grouping what costs quality?
    "new-b4": Config(SEARCH_RECIPE, CandidateConfig(), B4, SEARCH_FOLD, (), "disk"),
    # new-3b with the tensor cache in memory (the base type on disk only) or on disk: the same files
    "new-mem": Config(SEARCH_RECIPE, CandidateConfig(), PREV_GROUPS, SEARCH_FOLD, (), "memory"),
    "new-disk": Config(SEARCH_RECIPE, CandidateConfig(), PREV_GROUPS, SEARCH_FOLD, (), "disk"),
    # new-mem with the proxy on every 4th span of 16 rows of each linear (a quarter of its quantization work)
    "new-rs4": Config(SEARCH_RECIPE, CandidateConfig(), PREV_GROUPS, SEARCH_FOLD, (), "memory", 4),
    # both, and 4 depth buckets: the probes' 3.5 E more paid by the base log-probs decoded once (1.5 E less)
    "new-b4-rs4": Config(SEARCH_RECIPE, CandidateConfig(), B4, SEARCH_FOLD, (), "memory", 4),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_path(key: str) -> Path:
    if key in SHAPES:
        p = cache_dir() / "models" / SHAPES[key]
        if not p.is_file():
            raise SystemExit(f"{p} is missing: run bench/shapes.py {key} first")
        return p
    return base_path(key)


def predict(
    key: str, config: str, size: str, threads: int | None, rd: Path | None = None
) -> list[dict[str, Any]]:
    """What `search --dry-run` expects of each stage (pipeline/estimate.py, with its speed probe) for the run
    folder `rd` (default: a fresh temporary one, so that it can be asked after a run too)."""
    import tempfile

    from ramp_cpp.pipeline.estimate import estimate
    from ramp_cpp.pipeline.plan import plan_run
    from ramp_cpp.pipeline.speedprobe import speed_probe

    c = CONFIGS[config]
    with tempfile.TemporaryDirectory() as d:
        cfg = SizedConfig(calib=load_recipe(c.recipe))
        plan = plan_run(SizedRequest(model_path(key), rd or Path(d) / "run", "greedy", size, cfg, c.cc, None,
            sensitivity="measured", gcfg=c.gcfg, fold=c.fold, tensor_cache=c.tensor_cache,
            row_sample=c.row_sample), 1)
        opts = RuntimeOptions(n_threads=threads)
        stages = estimate(plan, c.presets, opts, speed_probe(plan, opts, c.presets))
    return [{"stage": s.stage, "wall_s": s.wall_s, "E": s.E, "passes": s.quant_passes, "held": s.held,
             "peak_rss": s.peak_rss, "if_unfolded": s.if_unfolded} for s in stages]


def _plan(key: str, config: str, size: str, rd: Path) -> Any:
    from ramp_cpp.pipeline.plan import plan_run

    c = CONFIGS[config]
    cfg = SizedConfig(calib=load_recipe(c.recipe))
    return plan_run(SizedRequest(model_path(key), rd, "greedy", size, cfg, c.cc, None,
        sensitivity="measured", gcfg=c.gcfg, cache_root=rd / "cache", fold=c.fold,
        tensor_cache=c.tensor_cache, row_sample=c.row_sample), 1)


#: a cell's variants beside the plain run: "tail" (the stages after the measurement again, from the finished
#: run's state) and "again" (the whole run again, cold, in a folder of its own: a second plan and its run)
VARIANTS = ("tail", "again")


def cell_name(config: str, size: str, variant: str = "") -> str:
    """The cell's folder under bench/out/costs/<model>/ and STATE/<model>/."""
    return f"{config}-{size}" + (f"-{variant}" if variant else "")


#: what a --tail cell leaves out of the finished run's state: its plan and stage lines (the tail has its own)
#: and the fold check's scores, so that the fold decision is made again
TAIL_DROPPED = ("predicted.json", "stages.jsonl", "pauses.jsonl", "scores.json")


def _state_pairs(key: str, config: str, size: str, rd: Path, variant: str = "") -> list[tuple[Path, Path]]:
    """(file in the run, its copy under STATE) for every small result of the run: the run folder's own, the
    proxy's and probes' saved states, and the base log-probs of the chunk sets it scores (user cache)."""
    from ramp_cpp.llama.evaluate import base_logprobs_file
    from ramp_cpp.pipeline.stages import scored_chunk_sets
    from ramp_cpp.store.cache import file_sha256_cached

    st = STATE / key / cell_name(config, size, variant)
    pairs = [(rd / n, st / n) for n in STATE_FILES]
    for where, root in ((rd, rd), (st, rd)):  # what the run has, and what the state has for it
        pairs += [(root / p.relative_to(where), st / p.relative_to(where))
                  for g in STATE_GLOBS for p in where.glob(g)]
    if (key, config, size) not in _BASE_FILES:  # planned once, before the run (its plan checks free disk)
        plan = _plan(key, config, size, rd)
        sha = file_sha256_cached(plan.model_path)
        sets = scored_chunk_sets(plan)
        _BASE_FILES[key, config, size] = [base_logprobs_file(sha, plan.text, c) for c in sets]
    pairs += [(f, st / "base-logprobs" / f.name) for f in _BASE_FILES[key, config, size]]
    return list(dict.fromkeys(pairs))


_BASE_FILES: dict[tuple[str, str, str], list[Path]] = {}


def save_state(key: str, config: str, size: str, variant: str = "") -> None:
    """Copy the run's small results to STATE (each atomically; files already there and the same are left)."""
    import shutil

    rd = HERE / "out" / "costs" / key / cell_name(config, size, variant)
    for src, dst in _state_pairs(key, config, size, rd, variant):
        if src.is_file() and not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst.with_suffix(".part"))
            dst.with_suffix(".part").replace(dst)


def restore_state(key: str, config: str, size: str, variant: str = "") -> int:
    """Copy STATE's results into a run folder (and user cache) that lacks them; how many were copied. A tail
    cell's state starts as the finished run's, less TAIL_DROPPED."""
    import shutil

    rd = HERE / "out" / "costs" / key / cell_name(config, size, variant)
    st = STATE / key / cell_name(config, size, variant)
    if variant == "tail" and not st.exists():
        full = STATE / key / cell_name(config, size)
        if not (full / "run.json").is_file():
            raise SystemExit(f"{full} holds no finished run to take the tail of")
        shutil.copytree(full, st.with_suffix(".part"),
                        ignore=lambda d, names: [n for n in names if n in TAIL_DROPPED and Path(d) == full])
        st.with_suffix(".part").replace(st)
    rd.mkdir(parents=True, exist_ok=True)
    n = 0
    for dst, src in _state_pairs(key, config, size, rd, variant):
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst.with_suffix(".part"))
            dst.with_suffix(".part").replace(dst)
            n += 1
    return n


def run(key: str, config: str, size: str, evaluate: bool, threads: int | None,
        state: bool = False, variant: str = "") -> dict[str, Any]:
    """One cold run. Before it starts, the dry run's prediction goes to the run folder (`predicted.json`, made
    once, so a resumed run keeps the first one); every finished stage is appended to `stages.jsonl` with the
    process that ran it, so a run resumed across interruptions keeps what each attempt spent."""
    c = CONFIGS[config]
    model = model_path(key)
    rd = HERE / "out" / "costs" / key / cell_name(config, size, variant)
    cfg = SizedConfig(calib=load_recipe(c.recipe))
    pred = rd / "predicted.json"
    if not pred.is_file():
        p = predict(key, config, size, threads, rd)
        rd.mkdir(parents=True, exist_ok=True)
        tmp = pred.with_suffix(".tmp")
        tmp.write_text(json.dumps(p, indent=1))
        tmp.replace(pred)
    pid = os.getpid()

    def on_cost(s: StageCost) -> None:
        log(f"{key} {config} {size}: {s.stage} {s.wall_s:.0f} s, {s.E:.2f} E, {s.quant_passes} passes, "
            f"{s.quant_weights / 1e6:.0f}M weights in memory, held {s.held / GIB:.2f} GiB")
        with open(rd / "stages.jsonl", "a") as f:
            f.write(json.dumps({"pid": pid, "time": time.time(), **s.to_json()}) + "\n")
        if state:
            try:
                save_state(key, config, size, variant)
            except OSError as e:  # the run goes on; --save-state can be asked again
                log(f"state not saved: {e}")

    t0 = time.perf_counter()
    r = run_direct(SizedRequest(model, rd, "greedy", size, cfg, c.cc, presets=c.presets,
        sensitivity="measured", gcfg=c.gcfg, cache_root=rd / "cache", fold=c.fold,
        tensor_cache=c.tensor_cache, row_sample=c.row_sample), RuntimeOptions(n_threads=threads),
        hooks=Hooks(on_cost=on_cost))
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.measure.candidates import searched_tensors

    searched = sum(t.n_params for t in searched_tensors(read_inventory(model), c.cc.embeddings))
    cell: dict[str, Any] = {
        "model": model.name,
        "f16_bytes": model.stat().st_size,
        "searched_params": searched,
        "file_bytes": r.file_bytes,
        "target_bytes": r.target_bytes,
        "reward_kld": r.kld,
        "wall_s": time.perf_counter() - t0,
        "costs": [s.to_json() for s in r.costs],
        "fold": json.loads(r.report.read_text())["summary"]["fold"],
        "predicted": json.loads(pred.read_text()),
        "attempts": _attempts(rd / "stages.jsonl"),
        "pauses": _pauses(rd / PAUSES),
    }
    if evaluate:
        k = kld(r.gguf, model, load_text("wikitext2-test")[0], EvalConfig(n_chunks=16))
        cell |= {"kld": k.kld_mean, "kld_stderr": k.kld_stderr, "ppl": k.ppl}
    return cell


def _attempts(path: Path) -> list[list[dict[str, Any]]]:
    """The stages each process finished, in order (one list per attempt)."""
    by: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        d = json.loads(line)
        by.setdefault(d.pop("pid"), []).append(d)
    return list(by.values())


def _pauses(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


Lines = list[dict[str, Any]]


def _unpaused(attempts: list[Lines], pauses: Lines) -> list[Lines]:
    """Each stage line's wall time less its overlap with the pauses: the line ends at `time` and began wall_s
    before it."""

    def paused(st: dict[str, Any]) -> float:
        a, b = st["time"] - st["wall_s"], st["time"]
        return sum(max(0.0, min(b, p["cont"]) - max(a, p["stop"])) for p in pauses)

    return [[st | {"wall_s": st["wall_s"] - paused(st)} for st in a] for a in attempts]


def save(key: str, cell: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        d = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        d[key] = cell
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(RESULTS)


def ratio(actual: float, predicted: float | None) -> str:
    if predicted is None:
        return "-"
    return f"{predicted:.0f} ({actual / predicted:.2f})" if predicted > 0.5 else f"{predicted:.0f}"


SUMMED = ("wall_s", "cpu_s", "written", "tokens", "E", "quant_passes", "quant_weights")


def _combined(attempts: list[list[dict[str, Any]]]) -> list[StageCost]:
    """Each stage over every attempt of a resumed run: times, E and passes summed (an attempt that finds a
    stage done spends ~0 on it; a stage killed midway is not counted), peak RSS and disk held the maxima."""
    out: dict[str, dict[str, Any]] = {}
    for a in attempts:
        for st in a:
            d = {k: v for k, v in st.items() if k in StageCost.__dataclass_fields__}
            have = out.setdefault(d["stage"], dict(d, **dict.fromkeys(SUMMED, 0)))
            for k in SUMMED:
                have[k] += d.get(k, 0)
            for k in ("peak_rss", "held"):
                have[k] = max(have[k], d[k])
    return [StageCost(**v) for v in out.values()]


def probe_clocks(key: str, pauses: Lines, since: float) -> dict[str, float]:
    """Each group-probe stage's seconds by its evaluations' own clocks, less their overlap with `pauses`:
    groups.py saves every evaluation with its wall time and end, so an attempt lost with its machine, which
    left no stage line, still counts. Only evaluations that ended after `since` (the cell's first stage
    began) are this cell's: a state restored from another run (--tail) or saved before the end was recorded
    (2026-12-03 night) is left to the stage lines. A cache directory is the unfolded model's when its proxy
    was measured on the file the probes compare against."""
    model, config, size, *variant = key.split("|")
    cell = cell_name(config, size, *variant)
    out: dict[str, float] = {}

    def paused(e: dict[str, Any]) -> float:
        a, b = e["ended"] - e["seconds"], e["ended"]
        return sum(max(0.0, min(b, p["cont"]) - max(a, p["stop"])) for p in pauses)

    for root in (STATE / model / cell, HERE / "out" / "costs" / model / cell):
        for g in root.glob("cache/*/groups-*.json"):
            d = json.loads(g.read_text())
            evals = [e for e in d["evals"].values() if e.get("ended", 0.0) > since]
            if not evals:
                continue
            m = next(g.parent.glob("measure-*.json"), None)
            src = json.loads(m.read_text())["key"]["model_sha256"] if m else None
            stage = f"group probes ({'unfolded' if src == d['key']['base_sha256'] else 'folded'})"
            clock = sum(e["seconds"] - paused(e) for e in evals)
            out[stage] = max(out.get(stage, 0.0), clock)
    return out


def table() -> str:
    d = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    lines = []
    for key, cell in d.items():
        attempts, pauses = cell.get("attempts", []), cell.get("pauses", [])
        costs = (_combined(_unpaused(attempts, pauses)) if len(attempts) > 1 or pauses
                 else [StageCost(**s) for s in cell["costs"]])
        began = [st["time"] - st["wall_s"] for a in attempts for st in a]
        since = min(began, default=float("inf"))
        clocks = probe_clocks(key, pauses, since)
        # a stage line lost with its machine: the evaluations' own clocks, where they say more
        costs = [replace(s, wall_s=clocks[s.stage]) if clocks.get(s.stage, 0.0) > s.wall_s * 1.05 else s
                 for s in costs]
        recounted = [s.stage for s in costs if s.wall_s == clocks.get(s.stage)]
        pred = {p["stage"]: p["wall_s"] for p in cell.get("predicted", [])}
        # a cell planned again after its run (today's plan) keeps the plan made before it
        first = {p["stage"]: p["wall_s"] for p in cell.get("predicted_first", [])}
        # the plan's total: its stages the run makes whichever way the fold check goes, and those it made
        ran = {s.stage for s in costs}
        planned = sum(p["wall_s"] for p in cell.get("predicted", [])
                      if not p.get("if_unfolded") or p["stage"] in ran)
        f16 = cell["f16_bytes"]

        def mem(w: int, n: int = cell.get("searched_params", 0)) -> str:
            return f"{w / n:.1f}" if w and n else "0" if n else "-"

        lines += [
            f"\n**{key}** ({cell['model']}, F16 {f16 / GIB:.2f} GiB; fold: {cell['fold']['choice']}"
            + (f"; {len(attempts)} attempts" if len(attempts) > 1 else "")
            + (f"; paused {sum(p['cont'] - p['stop'] for p in pauses):.0f} s, not counted" if pauses else "")
            + (f"; {', '.join(recounted)} by the evaluations' own clocks" if recounted else "")
            + (f"; held-out KLD {cell['kld']:.4f} ± {cell['kld_stderr']:.4f}" if "kld" in cell else "")
            + ")\n",
            "| stage | wall s | --dry-run's s (actual / predicted) | CPU s | peak RSS GiB | written GiB "
            "| held GiB | E | quantizer passes | in memory (passes' worth) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        if first:
            lines[-2] = lines[-2].replace("predicted)", "predicted): today's plan; the one before the run")
        for s in costs:
            planned_s = ratio(s.wall_s, pred.get(s.stage))
            if first:
                planned_s += f"; {ratio(s.wall_s, first.get(s.stage))}"
            lines.append(
                f"| {s.stage} | {s.wall_s:.0f} | {planned_s} | {s.cpu_s:.0f} "
                f"| {s.peak_rss / GIB:.2f} "
                f"| {s.written / GIB:.2f} | {s.held / GIB:.2f} | {s.E:.2f} | {s.quant_passes} "
                f"| {mem(s.quant_weights)} |"
            )
        held = max(s.held for s in costs)
        wall = sum(s.wall_s for s in costs)
        lines.append(
            f"| **total** | {wall:.0f} | {ratio(wall, planned if pred else None)} "
            f"| {sum(s.cpu_s for s in costs):.0f} | "
            f"{max(s.peak_rss for s in costs) / GIB:.2f} | {sum(s.written for s in costs) / GIB:.2f} | "
            f"{held / GIB:.2f} ({held / f16:.2f}x F16) | {sum(s.E for s in costs):.1f} | "
            f"{sum(s.quant_passes for s in costs)} | {mem(sum(s.quant_weights for s in costs))} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", choices=[*MODELS, *SHAPES])
    ap.add_argument("--configs", default="new")
    ap.add_argument("--sizes", default="Q4_K_M")
    ap.add_argument("--no-eval", action="store_true", help="no held-out KLD (a shape's means nothing)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--state", action="store_true",
                    help="carry the run's small results in $RAMP_BENCH_STATE (default: the user cache's "
                         "bench-state/), restored, then saved per stage")
    ap.add_argument("--save-state", action="store_true", help="save them now (after a run was stopped)")
    ap.add_argument("--tail", action="store_true",
                    help="the stages after the measurement again (fold decision, allocate, evaluate) in a "
                         "cell of their own: the finished run's state less its plan, stage lines and fold "
                         "check (implies --state)")
    ap.add_argument("--again", action="store_true",
                    help="the whole run again, cold, in a cell of its own (a second plan checked by a second "
                         "run; with --state it is carried across sessions)")
    ap.add_argument("--predict", action="store_true",
                    help="finished cells without one: the dry run's prediction, asked now for a cold folder")
    a = ap.parse_args()
    if a.tail and a.again:
        ap.error("--tail or --again, not both")
    variant = "tail" if a.tail else "again" if a.again else ""
    if a.table:
        print(table())
        return 0
    if a.model is None:
        ap.error("name a model, or --table")
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for config in a.configs.split(","):
        for size in a.sizes.split(","):
            key = "|".join([a.model, config, size] + ([variant] if variant else []))
            if key in done and a.predict and "predicted" not in done[key]:
                log(f"{key}: predicting")
                save(key, done[key] | {"predicted": predict(a.model, config, size, a.threads)})
                continue
            if key in done:
                log(f"{key}: done")
                continue
            if a.save_state:
                save_state(a.model, config, size, variant)
                log(f"{key}: state saved under {STATE / a.model}")
                continue
            if a.state or a.tail:
                n = restore_state(a.model, config, size, variant)
                log(f"{key}: {n} files restored from {STATE / a.model}")
            log(f"{key}: running")
            save(key, run(a.model, config, size, not a.no_eval and a.model not in SHAPES, a.threads,
                          a.state or a.tail, variant))
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
