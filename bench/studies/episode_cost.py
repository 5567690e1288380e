"""Episode cost vs the bare forward pass, same loaded model, interleaved repeats (min of each).

    .venv/bin/python -m bench.studies.episode_cost RUN/ [--repeats 3]

For a finished search run: the scoring loop of an episode (llama.cpp forward + log-softmax + PPL/KLD terms
against the cached base) and the bare forward pass (same chunks, same logits requested) on the run's GGUF,
plus the run log's mean assemble / load / SAC-update times. Ratios: (assemble + load + score) / forward and
(assemble + load + score + update) / forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ramp_cpp.allocate.paper.search import SearchConfig, load_checkpoint
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import base_logprobs, eval_chunks, forward_seconds, kld_loaded
from ramp_cpp.store.texts import load_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    settings = json.loads((a.run / "run.json").read_text())
    cfg = SearchConfig.from_json(settings["search"])
    gguf = next(a.run.glob("*.ramp-*.gguf"))
    text, _ = load_text(cfg.text)
    opts = RuntimeOptions(n_ctx=cfg.n_ctx)
    base = base_logprobs(settings["model_path"], text, cfg.eval_config, opts)
    fwd, score = [], []
    with LlamaModel(gguf, opts) as m:
        cs = eval_chunks(m, text, cfg.eval_config)
        for _ in range(a.repeats):
            fwd.append(forward_seconds(m, cs))
            score.append(kld_loaded(m, cs, base).seconds)
    _, st = load_checkpoint(a.run)
    log = [r for r in st.log if not r["memo"]]
    asm = float(np.mean([r["t_assemble"] for r in log]))
    load = float(np.mean([r["t_load"] for r in log]))
    upd = float(np.mean([r["t_update"] for r in log if not r["random"]]))
    f, s = min(fwd), min(score)
    out = {
        "forward_s": f,
        "score_s": s,
        "assemble_s": asm,
        "load_s": load,
        "update_s": upd,
        "ratio_env": (asm + load + s) / f,
        "ratio_with_updates": (asm + load + s + upd) / f,
        "tokens": int(sum(len(c) for c in cs)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
