"""Cross-check of ramp-cpp's lm-eval model (llama.cpp, ramp_cpp.llama.downstream) against lm-eval's own HF
backend (`lm_eval.models.huggingface.HFLM`, transformers fp32 on CPU, the model loaded from the same GGUF
with `gguf_file=`), on the same task items through the same lm-eval task config and local data.

    .venv/bin/python -m bench.studies.check_lmeval_hf [MODEL.f16.gguf] [--task piqa] [--limit 100]
        [--threads 1]

Reports both backends' acc / acc_norm, whether they tokenize every request the same, and the per-item
agreement of the choices' log-likelihoods (max and mean |difference|, same chosen answer). Writes the JSON to
stdout and bench/results/check_lmeval_hf.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.paths import BENCH
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.downstream import DownstreamConfig, evaluate_downstream, items, run_tasks, scores
from ramp_cpp.pipeline.demo import fetch_demo_base
from ramp_cpp.store.atomic import atomic_path

RESULTS = BENCH / "results" / "check_lmeval_hf.json"


def hf_lm(model: Path, threads: int) -> Any:
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(threads)
    return HFLM(
        pretrained=str(model.parent), gguf_file=model.name, device="cpu", dtype="float32", batch_size=1
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None, help="GGUF (default: the demo's off-grid F16 base)")
    ap.add_argument("--task", default="piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    model = Path(a.model) if a.model else fetch_demo_base()
    out: dict[str, Any] = {"model": str(model), "task": a.task, "limit": a.limit}

    t0 = time.perf_counter()
    cfg = DownstreamConfig(tasks=(a.task,), limit=a.limit)
    ours = evaluate_downstream(model, cfg, RuntimeOptions(n_threads=a.threads), keep_items=True)
    out["ramp_cpp"] = {
        "score": asdict(ours.scores[0]), "n_ctx": ours.n_ctx, "seconds": time.perf_counter() - t0
    }

    t0 = time.perf_counter()
    try:
        hf = hf_lm(model, a.threads)
    except Exception as e:  # the answer to "can transformers read this GGUF" is part of the report
        out["hf"] = {"error": f"transformers could not load {model.name}: {type(e).__name__}: {e}"}
        print(json.dumps(out, indent=2))
        _save(out)
        return
    res = run_tasks(hf, (a.task,), a.limit, log_samples=True)
    out["hf"] = {
        "score": asdict(scores(res, (a.task,))[0]),
        "backend": "lm_eval.models.huggingface.HFLM, transformers fp32, cpu, batch_size 1",
        "seconds": time.perf_counter() - t0,
    }

    # the same requests tokenized by both: llama.cpp's tokenizer vs the HF tokenizer built from the GGUF
    reqs = [tuple(x) for s in res["samples"][a.task] for x in s["arguments"]]
    with LlamaModel(model, RuntimeOptions(n_ctx=ours.n_ctx, n_threads=a.threads)) as m:
        differ = sum(
            [int(t) for t in m.tokenize(c + x)] != list(hf.tok_encode(c + x)) for c, x in reqs
        )
    out["requests"] = len(reqs)
    out["requests_tokenized_differently"] = differ

    mine, theirs = ours.items[a.task], items(res, a.task)
    assert [x.doc_hash for x in mine] == [x.doc_hash for x in theirs], "different items"
    d = np.concatenate([np.abs(np.subtract(x.lls, y.lls)) for x, y in zip(mine, theirs, strict=True)])
    rel = np.concatenate(
        [np.abs(np.subtract(x.lls, y.lls)) / np.abs(y.lls) for x, y in zip(mine, theirs, strict=True)]
    )
    out["items"] = len(mine)
    out["loglikelihood_abs_diff"] = {
        "max": float(d.max()), "mean": float(d.mean()), "median": float(np.median(d))
    }
    out["loglikelihood_rel_diff_max"] = float(rel.max())
    out["same_acc_choice_pct"] = 100.0 * float(
        np.mean([np.argmax(x.lls) == np.argmax(y.lls) for x, y in zip(mine, theirs, strict=True)])
    )
    out["same_acc_pct"] = 100.0 * float(np.mean([x.acc == y.acc for x, y in zip(mine, theirs, strict=True)]))
    out["same_acc_norm_pct"] = 100.0 * float(
        np.mean([x.acc_norm == y.acc_norm for x, y in zip(mine, theirs, strict=True)])
    )
    print(json.dumps(out, indent=2))
    _save(out)


def _save(out: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS, force=True) as tmp:
        tmp.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
