"""Full RAMP search on the demo model, then held-out evaluation next to llama.cpp's presets.

Resumable: the search runs in --run (rerun the same command to continue after a crash), preset files and
held-out results are kept under bench/out/ and reused.

    .venv/bin/python -m bench.studies.demo_search --run bench/out/demo-run --budget 5.5 --episodes 200
    .venv/bin/python -m bench.studies.demo_search --run bench/out/demo-run-kld --budget 5.5 --metric kld

Held-out: wikitext2-test, --test-chunks chunks of 512 tokens from chunk 0 (never seen by calibration or
the reward, which use wikitext2-valid). Episode cost: mean (assemble + load + evaluate) and mean total
episode time (with acting and SAC updates) over non-memoized episodes, each divided by the bare forward
pass over the same reward tokens with the model already loaded (min of 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.paths import BENCH
from ramp_cpp.allocate.paper.search import SearchConfig, load_checkpoint
from ramp_cpp.allocate.sac.agent import SACConfig
from ramp_cpp.calibration.artifact import load_calibration
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, eval_chunks, forward_seconds, kld
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.pipeline.paper.run import search
from ramp_cpp.store.texts import load_text

OUT = BENCH / "out"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=5.5)
    ap.add_argument("--budget-mode", default="weighted")
    ap.add_argument("--metric", default="ppl")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--recipe", default="paper")
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--test-chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    model = a.model or demo_model_path()
    opts = RuntimeOptions(n_threads=a.threads)
    cfg = SearchConfig(
        budget=a.budget,
        budget_mode=a.budget_mode,
        metric=a.metric,
        chunks=a.chunks,
        calib=load_recipe(a.recipe),
    )
    sac = SACConfig(episodes=a.episodes)
    t0 = time.time()

    def on_episode(r: object) -> None:
        d = asdict(r)  # type: ignore[call-overload]
        print(
            f"ep {d['episode']:4d} R {d['reward']:+.3f} {a.metric} {d['quality']:.4f} bpw {d['bpw']:.3f} "
            f"best {d['best_quality']} {d['t_total']:.1f}s{' memo' if d['memo'] else ''}",
            flush=True,
        )

    resume = (a.run / "run.json").is_file()
    res = search(model, a.run, cfg, sac, opts, resume=resume, calib=a.calib, on_episode=on_episode)
    wall = time.time() - t0
    _, st = load_checkpoint(a.run)
    log = [r for r in st.log if not r["memo"]]
    env_s = float(np.mean([r["t_assemble"] + r["t_load"] + r["t_eval"] for r in log]))
    tot_s = float(np.mean([r["t_total"] for r in log]))
    upd_s = float(np.mean([r["t_update"] for r in log if not r["random"]] or [0.0]))
    text, _ = load_text(cfg.text)
    assert res.gguf is not None
    with LlamaModel(res.gguf, RuntimeOptions(n_ctx=cfg.n_ctx, n_threads=a.threads)) as m:
        cs = eval_chunks(m, text, cfg.eval_config)
        fwd = min(forward_seconds(m, cs) for _ in range(3))
    # held-out comparison
    cal = load_calibration(a.calib) if a.calib else load_calibration(a.run / "calib.safetensors")
    rows = {"ramp": res.gguf}
    for preset in ("Q4_K_M", "Q3_K_M"):
        for im in (False, True):
            p = OUT / f"demo.{preset}{'.imatrix' if im else ''}.gguf"
            if not p.is_file():
                quantize_preset(model, p, preset, QuantizeOptions(imatrix=cal.imatrix() if im else None))
            rows[f"{preset}{' +imatrix' if im else ''}"] = p
    test, _ = load_text("wikitext2-test")
    ecfg = EvalConfig(n_chunks=a.test_chunks)
    held = {}
    for name, p in rows.items():
        k = kld(p, model, test, ecfg, opts)
        held[name] = {
            "file": str(p),
            "mib": p.stat().st_size / 2**20,
            "ppl": k.ppl,
            "base_ppl": k.base_ppl,
            "kld": k.kld_mean,
            "kld_stderr": k.kld_stderr,
            "same_top_pct": k.same_top_pct,
        }
    best = st.best or {}
    out = {
        "run": str(a.run),
        "budget": a.budget,
        "budget_mode": a.budget_mode,
        "metric": a.metric,
        "episodes": st.episode,
        "wall_s_this_invocation": wall,
        "best": {
            k: best.get(k) for k in ("episode", "quality", "ppl", "kld", "bpw", "bpw_nominal", "bpw_file")
        },
        "episode_cost": {
            "forward_s": fwd,
            "env_s": env_s,
            "total_s": tot_s,
            "update_s": upd_s,
            "ratio_env": env_s / fwd,
            "ratio_total": tot_s / fwd,
            "n_evaluated": len(log),
            "n_memo": st.episode - len(log),
        },
        "held_out": {"text": "wikitext2-test", "chunks": a.test_chunks, "ctx": 512, "rows": held},
    }
    OUT.mkdir(exist_ok=True)
    dst = OUT / f"demo_search_{a.run.name}.json"
    dst.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print("\n| file | MiB | PPL | KLD |\n|---|---|---|---|")
    for name, r in held.items():
        print(f"| {name} | {r['mib']:.1f} | {r['ppl']:.3f} | {r['kld']:.4f} ± {r['kld_stderr']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
