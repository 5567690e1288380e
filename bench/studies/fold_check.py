"""Scale folding equivalence: folded vs original next-token distributions through llama.cpp, with the folded
linears stored F16 (as the input) and F32, on held-out wikitext2-test chunks.

Folding is exact in real arithmetic (W·diag(s) @ (x/s) = W @ x); what remains is rounding: the folded
weights are rounded to the storage type once more, and llama.cpp's kernels round the 1/s-scaled activations
differently. The KLD measured here is that rounding's cost.

    .venv/bin/python -m bench.studies.fold_check [MODEL.f16.gguf ...] [--calib CALIB.safetensors]
        [--samples 16 --calib-ctx 512] [--calib-dir DIR] [--chunks 8 --ctx 512] [--json OUT.json]

Without --calib, a quick calibration (samples x calib-ctx tokens of wikitext2-valid) is measured through
llama.cpp with ramp_cpp.calibration.collect first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp.calibration.artifact import CalibConfig, load_calibration, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.fold.folding import fold
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import TensorRewrite, rewrite_gguf
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.store.texts import load_text


def check(model: Path, a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    keep = Path(a.calib_dir) / f"{model.stem}.calib.safetensors" if a.calib_dir else None
    if a.calib:
        cal = load_calibration(a.calib)
    elif keep and keep.is_file():
        cal = load_calibration(keep)
    else:
        body, _ = load_text("wikitext2-valid")
        cal = calibrate(model, body, CalibConfig(samples=a.samples, ctx=a.calib_ctx))
        if keep:
            save_calibration(cal, keep)
    t_cal = time.perf_counter() - t0
    test, src = load_text("wikitext2-test")
    cfg = EvalConfig(n_ctx=a.ctx, n_chunks=a.chunks)
    out: dict[str, Any] = {
        "model": str(model),
        "calibration": cal.describe(),
        "calibration_seconds": t_cal,
        "eval": f"{src}, {a.chunks} chunks x {a.ctx}",
    }
    with tempfile.TemporaryDirectory(dir=model.parent) as d:
        for f32 in (False, True):
            dst = Path(d) / f"folded.{'f32' if f32 else 'f16'}.gguf"
            r = fold(model, cal, dst, f32=f32)
            k = kld(dst, model, test, cfg)
            out["F32" if f32 else "F16"] = {
                "fold": r.summary(),
                "file_mib": dst.stat().st_size / 2**20,
                "kld": _kld_fields(k),
            }
        # Control: the same linears stored F32 without folding (s = 1). F32 weights change llama.cpp's
        # kernels (activations are no longer rounded to F16 for the matmul), so this is the KLD of the
        # kernel change alone, the floor under the folded-F32 number.
        ctrl = Path(d) / "unfolded.f32.gguf"
        names = [n for g in r.groups for n in g.linears]
        rewrite_gguf(model, ctrl, {n: TensorRewrite(GGMLQuantizationType.F32, lambda w: w) for n in names})
        out["control_unfolded_F32"] = {"kld": _kld_fields(kld(ctrl, model, test, cfg))}
    return out


def _kld_fields(k: Any) -> dict[str, float]:
    keep = ("kld_mean", "kld_stderr", "kld_p99", "kld_max", "same_top_pct", "ppl", "base_ppl")
    return {x: v for x, v in asdict(k).items() if x in keep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=[str(demo_model_path())])
    ap.add_argument("--calib", help="calibration artifact (one model only); default: a quick measurement")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--calib-dir", help="keep quick calibrations here (MODEL.calib.safetensors), reuse them")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    a = ap.parse_args()
    if a.calib and len(a.models) > 1:
        ap.error("--calib applies to one model")
    results = []
    for m in a.models:
        r = check(Path(m), a)
        results.append(r)
        print(json.dumps(r, indent=2), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
