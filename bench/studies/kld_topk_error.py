"""How far the cached top-k KLD is from the exact KLD (full distributions of both models in memory).

.venv/bin/python -m bench.studies.kld_topk_error QUANT.gguf BASE.gguf [--chunks 8] [--k 16 64 256]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, chunks, kld, log_softmax
from ramp_cpp.store.texts import load_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quant")
    ap.add_argument("base")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    a = ap.parse_args()
    text, _ = load_text("wikitext2-test")
    cfg = EvalConfig(n_chunks=a.chunks)
    exact = []
    with LlamaModel(a.base, RuntimeOptions()) as b, LlamaModel(a.quant, RuntimeOptions()) as q:
        for c in chunks(b.tokenize(text), cfg, b.bos if b.add_bos else None):
            lb = log_softmax(b.logits(c, 256, 511)).astype(np.float64)
            lq = log_softmax(q.logits(c, 256, 511)).astype(np.float64)
            exact.append((np.exp(lb) * (lb - lq)).sum(axis=1))
    e = np.concatenate(exact)
    rows = {}
    for k in a.k:
        r = kld(a.quant, a.base, text, EvalConfig(n_chunks=a.chunks, top_k=k))
        rows[k] = {
            "kld_mean": r.kld_mean,
            "kld_p99": r.kld_p99,
            "rest_mass_mean": r.rest_mass_mean,
            "relative_error_of_mean": (e.mean() - r.kld_mean) / e.mean(),
        }
    print(
        json.dumps(
            {"exact_kld_mean": float(e.mean()), "exact_kld_p99": float(np.percentile(e, 99)), "top_k": rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
