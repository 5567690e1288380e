"""Where one group-probe job's time goes (issue 22's projection): assemble the file from the tensor cache,
load it, decode the reward chunks (with the log-sum-exp of the logits), and the KLD arithmetic, each timed
alone. CPU seconds are given beside wall seconds: the single-threaded parts (assemble, KLD arithmetic) cost
the same CPU time when other jobs share the cores, so they project to other machines better than wall time on
a busy one.

    .venv/bin/python -m bench.studies.jobparts bench/out/workers/qwen0.5b/Q4_K_M  # bench.studies.workers'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.paths import BENCH
from ramp_cpp.calibration.artifact import load_calibration
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import (
    EvalConfig,
    _Scorer,
    base_logprobs,
    eval_chunks,
    kld_terms,
    logsumexp_rows,
)
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.tensorcache import assemble, build_cache
from ramp_cpp.store.texts import load_text


def timed(fn: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--scratch", default="/dev/shm")
    a = ap.parse_args()
    run = json.loads((a.folder / "cold" / "run.json").read_text())
    model = run["model_path"]
    seed = a.folder / "seed-calib.safetensors"
    cal = load_calibration(seed if seed.is_file() else a.folder / "cold" / "calib.safetensors")
    im = cal.imatrix()
    q4 = sorted((a.folder / "cache").glob("*/Q4_K.json"))[0]  # the same tensors in every folding's cache
    names = list(json.loads(q4.read_text())["tensors"])
    cache = build_cache(model, CandidateConfig().requested(), a.folder / "cache", imatrix=im, searched=names)
    text = load_text("wikitext2-valid")[0]
    ecfg = EvalConfig(n_chunks=2)
    base = base_logprobs(model, text, ecfg, RuntimeOptions())
    dst = Path(a.scratch) / "jobparts.gguf"
    out: dict[str, float] = {}
    for _ in range(2):  # the second round is the one kept: page cache warm, as in a run
        r, out["assemble_wall"], out["assemble_cpu"] = timed(
            lambda: assemble(cache, {n: "Q4_K" for n in names}, dst, force=True))
        out["file_bytes"] = r.file_size
        m, out["load_wall"], out["load_cpu"] = timed(lambda: LlamaModel(dst, RuntimeOptions(n_ctx=512)))
        cs = eval_chunks(m, text, ecfg)
        score = _Scorer(m)
        fw = fc = kw = kc = lc = 0.0
        row = 0
        for c in cs:
            w0, c0 = time.perf_counter(), time.process_time()
            x, lse, tgt = score(c)
            w1, c1 = time.perf_counter(), time.process_time()
            kld_terms(base, slice(row, row + len(tgt)), x, lse, tgt)
            w2, c2 = time.perf_counter(), time.process_time()
            logsumexp_rows(x, np.empty_like(x))  # the part of the decode that stays on the CPU with a GPU
            c3 = time.process_time()
            fw, fc, kw, kc = fw + w1 - w0, fc + c1 - c0, kw + w2 - w1, kc + c2 - c1
            lc += c3 - c2
            row += len(tgt)
        out |= {"forward_wall": fw, "forward_cpu": fc, "kld_wall": kw, "kld_cpu": kc, "logsumexp_cpu": lc,
                "tokens": float(sum(len(c) for c in cs)), "n_vocab": float(m.n_vocab)}
        m.close()
    dst.unlink()
    res = BENCH / "results" / "jobparts.json"
    d = json.loads(res.read_text()) if res.is_file() else {}
    d[Path(model).name] = out
    tmp = res.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    tmp.replace(res)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
