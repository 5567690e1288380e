"""Issue 23 item 1: one sized SAC policy trained across models on zero-evaluation states
(`ramp_cpp.allocate.sac.across`), leave-one-out, screened offline with the held-out model's measured
sensitivity as the judge (as `bench/studies/zeroeval.py` screens its rules), then saved for
`bench/compare.py`'s `policy-across` cells (the held-out KLD through llama.cpp) and, trained on all three,
for `policies/`.

Tasks: each training model's folded off-grid base (`bench/compare.py`, calibration `calib/bench.toml`) at the
whole-file sizes of llama.cpp's Q3_K_M, Q4_K_S, Q4_K_M and Q5_K_M (+ imatrix, unfolded: the sizes users
compare against), its proxy sensitivity for the state and projection, its measured sensitivity for the
reward. Each held-out model is judged at Q4_K_M's and Q3_K_M's sizes: predicted ΔKLD (over every tensor at
its highest option) as a multiple of the measured greedy's, beside `uniform` (the allocator: its leftover
bytes filled in model order) and `a = 0` (the policy's reference: each tensor nearest the target's bits, the
rest filled by the projection, which reads the proxy).

    .venv/bin/python -m bench.studies.across          # the three leave-one-out policies + the screen
    .venv/bin/python -m bench.studies.across --all    # + the policy on all three -> policies/
    .venv/bin/python -m bench.studies.across --raw    # returns not standardized per task (the ablation)
Writes bench/results/across.json and bench/out/across/<name>/policy.safetensors (+ log.jsonl); with --raw,
across-raw in both places.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.judge import Judged, judged
from bench.paths import BENCH
from ramp_cpp.allocate.allocators import ALLOCATORS
from ramp_cpp.allocate.sac.across import (
    AcrossConfig,
    Task,
    across_meta,
    mean_action,
    train_across,
    zero_action,
)
from ramp_cpp.allocate.sac.policyfile import save_policy
from ramp_cpp.allocate.sac.rollout import Context
from ramp_cpp.allocate.sac.scoring import layer_embeddings
from ramp_cpp.allocate.sac.search import policy_tensors

HERE = BENCH
MODELS = ("smollm2", "qwen0.5b", "gemma270m")
TRAIN_SIZES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")
HELD_SIZES = ("Q4_K_M", "Q3_K_M")
OUT = HERE / "out" / "across"


def target(m: Judged, size: str) -> int:
    return int(m.cells[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"])


def context(m: Judged, z: Any, size: str, cfg: AcrossConfig) -> Context:
    return Context(m.sens, z, target(m, size), cfg.span, "ramp")


def judge_of(m: Judged) -> Any:
    """Predicted ΔKLD of an allocation by the model's measured sensitivity (over its highest options)."""
    top = {t.name: t.options[-1].ggml_type for t in m.sens.tensors}
    floor = m.judge.error(top)
    return lambda choice: m.judge.error(choice) - floor


def train(name: str, models: list[str], loaded: dict[str, tuple[Judged, Any]], cfg: AcrossConfig) -> Any:
    tasks = [Task(f"{k}@{s}", context(loaded[k][0], loaded[k][1], s, cfg), judge_of(loaded[k][0]))
             for k in models for s in TRAIN_SIZES]
    t0 = time.perf_counter()
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    with (d / "log.jsonl.tmp").open("w") as f:
        out = train_across(tasks, cfg, lambda r: f.write(json.dumps(r) + "\n"))
    (d / "log.jsonl.tmp").replace(d / "log.jsonl")
    wall = time.perf_counter() - t0
    meta = across_meta(tasks, cfg, out) | {"train_wall_s": wall}
    save_policy(policy_tensors(out.agent), meta, d / "policy.safetensors")
    print(f"{name}: trained on {', '.join(models)} in {wall:.0f} s; the actor after episode {out.selected}; "
          "its R against a = 0: "
          + " ".join(f"{k} {v:+.3f}" for k, v in out.final.items()), flush=True)
    return out, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=AcrossConfig.episodes)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="also train on all three (the shipped policy)")
    ap.add_argument("--raw", action="store_true",
                    help="returns stored as they are, not standardized per task (into out/across-raw)")
    a = ap.parse_args()
    global OUT
    if a.raw:
        OUT = OUT.with_name("across-raw")
    cfg = AcrossConfig(episodes=a.episodes, seed=a.seed, normalize=not a.raw)
    loaded: dict[str, tuple[Judged, Any]] = {}
    for k in MODELS:
        m = judged(k)
        loaded[k] = (m, layer_embeddings(m.src, m.cal, m.sens, "ramp"))
    rows = []
    for held in MODELS:
        others = [k for k in MODELS if k != held]
        out, wall = train(f"leave-{held}", others, loaded, cfg)
        m, z = loaded[held]
        judge = judge_of(m)
        for size in HELD_SIZES:
            ctx = context(m, z, size, cfg)
            picks = {
                "uniform": ALLOCATORS["uniform"](m.sens, ctx.budget_bytes),
                "a = 0": zero_action(ctx).choice,
                "proxy greedy": ALLOCATORS["greedy"](m.sens, ctx.budget_bytes),
                "policy": mean_action(out.agent, ctx).choice,
                "measured greedy": ALLOCATORS["greedy"](m.judge, ctx.budget_bytes),
            }
            row = {"model": held, "size": size, "train_wall_s": wall, "episodes": cfg.episodes,
                   **{n: judge(c) for n, c in picks.items()}}
            rows.append(row)
            ref = row["measured greedy"]
            print(f"{held:9s} {size}: " + "  ".join(f"{n} {row[n] / ref:.2f}×" for n in picks), flush=True)
    if a.all:
        train("all-three", list(MODELS), loaded, cfg)
    res = HERE / "results" / f"{OUT.name}.json"
    res.with_suffix(".tmp").write_text(json.dumps({"config": cfg.to_json(), "rows": rows}, indent=1) + "\n")
    res.with_suffix(".tmp").replace(res)


if __name__ == "__main__":
    main()
