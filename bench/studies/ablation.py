"""Ablation on the demo model: uniform low-bit allocations x {folding off, on} x {imatrix off, on}.

    .venv/bin/python -m bench.studies.ablation --calib bench/out/SmolLM2-135M-Instruct.f16.calib.safetensors

Every searched tensor gets the 3-bit (Q3_K, falling back to Q4_0 on 576-wide rows) or 4-bit (Q4_K -> Q5_0)
rung; other tensors Q8_0. Folding uses the calibration's max |x|; the imatrix is the calibration's E[x^2],
transformed to the folded model's inputs when folding is on. Mean KLD and PPL vs the unfolded F16 base on
held-out wikitext2-test, --chunks chunks of 512 from chunk 0. Files and results stay in bench/out/ablation/
(rerunning reuses them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.paths import BENCH
from ramp_cpp.calibration.artifact import load_calibration
from ramp_cpp.fold.folding import fold, folded_calibration_from_file
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.model.ladder import NOMINAL_TYPES
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.store.texts import load_text

OUT = BENCH / "out" / "ablation"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    a = ap.parse_args()
    base = a.model or demo_model_path()
    OUT.mkdir(parents=True, exist_ok=True)
    cal = load_calibration(a.calib)
    folded = OUT / "folded.f16.gguf"
    if folded.is_file():
        fcal = folded_calibration_from_file(cal, folded)
    else:
        fcal = fold(base, cal, folded).calibration
    test, _ = load_text("wikitext2-test")
    ecfg = EvalConfig(n_chunks=a.chunks)
    res_path = OUT / f"results-{a.chunks}.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    for bits in a.bits:
        for do_fold in (False, True):
            for use_im in (False, True):
                key = f"{bits}bit fold={'on' if do_fold else 'off'} imatrix={'on' if use_im else 'off'}"
                if key in results:
                    continue
                src = folded if do_fold else base
                c = fcal if do_fold else cal
                info = read_inventory(src)
                types = {t.name: NOMINAL_TYPES[bits] for t in info.searched}
                q = OUT / f"{bits}bit-fold{int(do_fold)}-im{int(use_im)}.gguf"
                r = quantize_map(
                    src, q, types, opts=QuantizeOptions(imatrix=c.imatrix() if use_im else None, force=True)
                )
                k = kld(q, base, test, ecfg)
                results[key] = {
                    "mib": r.file_size / 2**20,
                    "bpw_searched": r.bpw_searched,
                    "ppl": k.ppl,
                    "base_ppl": k.base_ppl,
                    "kld": k.kld_mean,
                    "kld_stderr": k.kld_stderr,
                    "same_top_pct": k.same_top_pct,
                }
                res_path.write_text(json.dumps(results, indent=2))
                print(key, json.dumps(results[key]), flush=True)
                q.unlink()
    print(f"\nheld-out wikitext2-test, {a.chunks} chunks x 512, calibration: {cal.describe()}")
    print("| allocation | folding | imatrix | MiB | bpw | PPL | mean KLD |\n|---|---|---|---|---|---|---|")
    for key, r in results.items():
        b, f, i = key.split(" ")
        print(
            f"| uniform {b} | {f.split('=')[1]} | {i.split('=')[1]} | {r['mib']:.1f} | "
            f"{r['bpw_searched']:.3f} | "
            f"{r['ppl']:.3f} (base {r['base_ppl']:.3f}) | {r['kld']:.4f} ± {r['kld_stderr']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
