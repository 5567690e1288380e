"""Speed of the in-process PPL loop against its limit: a bare llama_decode loop over the same tokens
(same chunks, same logits requested, nothing done with them).

    .venv/bin/python -m bench.studies.eval_speed [MODEL.gguf] [--chunks 8] [--repeats 3]

Prints tokens/s of both and the overhead ratio (ours / bare wall time); the minimum of the repeats is used
for each, interleaved so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time

from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, chunks, perplexity
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.store.texts import load_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(demo_model_path()))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    text, _ = load_text("wikitext2-test")
    cfg = EvalConfig(n_chunks=a.chunks)
    opts = RuntimeOptions(n_ctx=cfg.n_ctx, n_threads=a.threads)
    bare, ours = [], []
    for _ in range(a.repeats):
        # both loops start from a freshly loaded model (perplexity() loads its own), timed over the loop only
        with LlamaModel(a.model, opts) as m:
            cs = chunks(m.tokenize(text), cfg, m.bos if m.add_bos else None)
            t0 = time.perf_counter()
            for c in cs:
                m.logits(c, len(c) // 2, len(c) - 1)
            bare.append(time.perf_counter() - t0)
        ours.append(perplexity(a.model, text, cfg, opts).seconds)
    n_tok = len(cs) * cfg.n_ctx
    print(
        json.dumps(
            {
                "model": a.model,
                "chunks": len(cs),
                "tokens": n_tok,
                "bare_tok_per_s": n_tok / min(bare),
                "ppl_loop_tok_per_s": n_tok / min(ours),
                "overhead_ratio": min(ours) / min(bare),
                "bare_s": bare,
                "ppl_loop_s": ours,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
