"""How many of Table 24's static dims are constant or saturated, per model and feature variant.

    .venv/bin/python -m bench.studies.feature_saturation MODEL.gguf [MODEL2.gguf ...] [--samples 8 --ctx 512]

Each model is calibrated on wikitext2-valid (or `--calib-dir` holds `<stem>.calib.safetensors` to reuse);
output: per dim the fraction of tensors at the clip value and whether the dim is useless (constant or >= 95%
clipped), for `paper` and `ramp`. Results also go to bench/out/feature_saturation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.paths import BENCH
from ramp_cpp.calibration.artifact import CalibConfig, load_calibration, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.calibration.features import FeatureConfig, model_features, saturation
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.store.texts import load_text

OUT = BENCH / "out"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-dir", type=Path, default=OUT)
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    text, _ = load_text("wikitext2-valid")
    res = {}
    for m in a.models:
        cp = a.calib_dir / f"{m.name.split('.')[0]}.calib.safetensors"
        if cp.is_file():
            cal = load_calibration(cp)
        else:
            cal = calibrate(m, text, CalibConfig(samples=a.samples, ctx=a.ctx), RuntimeOptions())
            save_calibration(cal, cp)
        res[m.name] = {"calibration": cal.describe()}
        for v in ("paper", "ramp"):
            reps = saturation(model_features(m, cal, FeatureConfig(variant=v)))
            res[m.name][v] = {
                "useless": [r.name for r in reps if r.useless],
                "dims": {
                    r.name: {"at_clip": r.at_clip, "constant": r.constant, "lo": r.lo, "hi": r.hi}
                    for r in reps
                },
            }
            print(
                f"{m.name:40s} {v:6s} useless {len(res[m.name][v]['useless'])}/9: "
                f"{', '.join(res[m.name][v]['useless']) or '-'}  "
                + " ".join(f"{r.name}={r.at_clip:.0%}" for r in reps if r.at_clip > 0),
                flush=True,
            )
    (OUT / "feature_saturation.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
