"""Correctness anchor: in-process llama.cpp PPL vs an independent PyTorch fp32 computation by transformers
(model loaded from the same GGUF with `gguf_file=`), on the very same tokens and chunks.

    .venv/bin/python -m bench.studies.check_ppl_transformers [MODEL.f16.gguf] [--chunks 8]
        [--text wikitext2-test]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, chunks, perplexity
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.store.texts import load_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(demo_model_path()))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", default="wikitext2-test")
    a = ap.parse_args()
    text, src = load_text(a.text)
    cfg = EvalConfig(n_ctx=a.ctx, n_chunks=a.chunks)
    ours = perplexity(a.model, text, cfg)
    with LlamaModel(a.model, RuntimeOptions(n_ctx=a.ctx)) as m:
        cs = chunks(m.tokenize(text), cfg, m.bos if m.add_bos else None)
    p = Path(a.model)
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    hf.eval()
    nll = []
    first = a.ctx // 2
    with torch.no_grad():
        for c in cs:
            logits = hf(torch.tensor(c[None, :], dtype=torch.long)).logits[0].double()
            lp = torch.log_softmax(logits[first:-1], dim=-1)
            tgt = torch.tensor(c[first + 1 :], dtype=torch.long)
            nll.append(-lp[torch.arange(len(tgt)), tgt].numpy())
    v = np.concatenate(nll)
    ref = float(np.exp(v.mean()))
    out = {
        "model": str(p),
        "text": src,
        "chunks": a.chunks,
        "n_ctx": a.ctx,
        "scored_tokens": int(len(v)),
        "ppl_llama_cpp": ours.ppl,
        "ppl_transformers_fp32": ref,
        "relative_difference": abs(ours.ppl - ref) / ref,
        "transformers_seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
