"""SAC in rounds of K rollouts on a real model (issue 22, item 2): K = 2 scored on two Ray workers gives the
K = 2 search scored in this process, episode for episode; the wall time of K = 1 (today's search) beside it.

    .venv/bin/python -m bench.studies.sac_rounds smollm2 --size Q4_K_M --evaluations 30 [--workers 2]

On the benchmark's off-grid base, folded (power 0.5), measured sensitivity, tensor cache and reward chunks
(`bench/compare.py`'s, made first when missing; nothing of it is timed). Modes, each a fresh search, seed 0:

    k1          --rollouts 1, in this process (what `search --method sac` does)
    k2          --rollouts 2, in this process (each round's two allocations one after the other)
    k2-workers  --rollouts 2, each round's two allocations as two jobs on a local Ray (one thread each)

For each: wall time, real evaluations, the best reward KLD, and the held-out KLD (wikitext2-test chunks 0..15)
of the best allocation. Writes bench/results/sac_rounds.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from typing import Any

from bench.compare import (
    HERE,
    REWARD,
    RUN,
    Fold,
    Results,
    calibrated,
    evaluate,
    log,
    prepare,
    preset_cell,
    tensor_cache,
)
from ramp_cpp.store.texts import load_text

MODES = ("k1", "k2", "k2-workers")


def digest(log_: list[dict[str, Any]]) -> str:
    """The search's log without its timings: equal digests, equal searches."""
    rows = [{k: v for k, v in r.items() if not k.startswith("t_")} for r in log_]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", default="Q4_K_M")
    ap.add_argument("--evaluations", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    a = ap.parse_args()

    from ramp_cpp.allocate.allocators import greedy
    from ramp_cpp.allocate.sac.rollout import Context
    from ramp_cpp.allocate.sac.scoring import RewardScorer, layer_embeddings
    from ramp_cpp.allocate.sac.search import SizedSearchConfig, search
    from ramp_cpp.executor import make_executor
    from ramp_cpp.fold.source import cleanup, workdir
    from ramp_cpp.measure.proxy import measure
    from ramp_cpp.measure.tensorcache import assemble

    b = prepare(a.model, "offgrid", 0, a.recipe)
    folded = Fold(0.5)
    target = preset_cell(Results(a.model), b, a.size, Fold(None), 16)["file_bytes"]
    src, cal = b.model(folded)
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    sens, _ = calibrated(b, src, cal, sens)
    cache = tensor_cache(b, src, cal, sens)
    ref = greedy(sens, target)
    text = load_text("wikitext2-valid")[0]
    rows: dict[str, Any] = {}
    for mode in MODES:
        k = 1 if mode == "k1" else 2
        cfg = SizedSearchConfig(evaluations=a.evaluations, rollouts=k)
        ctx = Context(sens, layer_embeddings(src, cal, sens, cfg.variant), target, cfg.span, cfg.variant,
                      cfg.projection)
        rd = HERE / "out" / "sac_rounds" / f"{a.model}-{a.size}-{mode}"
        shutil.rmtree(rd, ignore_errors=True)
        wd = workdir()
        ex = make_executor(a.workers, None, None, 0) if mode.endswith("workers") else None
        try:
            scorer = RewardScorer(cache, b.path, text, REWARD, RUN, wd)
            batch = scorer.on(ex) if ex is not None else None
            log(f"{a.model}: {mode}, {a.evaluations} evaluations")
            t0 = time.perf_counter()
            out = search(ctx, scorer, ref, cfg, rd, None, batch)
            wall = time.perf_counter() - t0
            q = wd / "best.gguf"
            assemble(cache, out.choice, q, force=True)
            held_out = evaluate(q, b, 16)["kld_mean"]
        finally:
            if ex is not None:
                ex.close()
            cleanup(wd)
        rows[mode] = {
            "rollouts": k,
            "executor": ex.describe() if ex is not None else "serial",
            "wall_s": wall,
            "evaluations": out.state.evaluations,
            "episodes": out.state.episode,
            "wall_per_evaluation_s": wall / max(out.state.evaluations, 1),
            "reward_kld_best": out.kld,
            "reward_kld_greedy": out.kld_ref,
            "held_out_kld_best": held_out,
            "log_digest": digest(out.state.log),
        }
        log(f"  {mode}: {wall:.0f} s, {out.state.evaluations} evaluations, best reward KLD {out.kld:.5f}, "
            f"held-out {held_out:.5f}, log {rows[mode]['log_digest']}")
    result = {
        "command": " ".join([".venv/bin/python", "-m", "bench.studies.sac_rounds", *sys.argv[1:]]),
        "model": a.model,
        "size": a.size,
        "target_bytes": target,
        "k2_same_search_on_workers": rows["k2"]["log_digest"] == rows["k2-workers"]["log_digest"],
        "modes": rows,
    }
    (HERE / "results" / "sac_rounds.json").write_text(json.dumps(result, indent=1))
    print("| mode | executor | wall | evaluations | s / evaluation | best reward KLD | held-out KLD | log |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['executor']} | {r['wall_s']:.0f} s | {r['evaluations']} | "
              f"{r['wall_per_evaluation_s']:.1f} | {r['reward_kld_best']:.5f} | "
              f"{r['held_out_kld_best']:.5f} | `{r['log_digest']}` |")


if __name__ == "__main__":
    main()
