"""The dry run's decode ratios against a written file's own (issue 21): the speed probe's copy of the first
blocks decodes the files the plan reads (`speedprobe.decode_ratios`), the plan's guess for greedy's file is
interpolated between the candidates just below and above the target, and the run's real GGUF and the F16 base
are decoded whole (one 512-token reward chunk, median of up to 3 after an untimed one).

    .venv/bin/python -m bench.studies.decode_check qwen0.5b Q4_K_M \
        bench/out/costs/qwen0.5b/new-Q4_K_M/Qwen2.5-Coder-0.5B.offgrid-s0.ramp-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.costs import CONFIGS, model_path
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, chunks
from ramp_cpp.llama.ggufio import open_reader
from ramp_cpp.pipeline import mixes, speedprobe
from ramp_cpp.pipeline.plan import plan_run
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.sizedconfig import SizedConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("size")
    ap.add_argument("gguf", help="the run's written file")
    a = ap.parse_args()
    c, opts = CONFIGS["new"], RuntimeOptions(n_ctx=512)
    with tempfile.TemporaryDirectory() as d:
        plan = plan_run(SizedRequest(model_path(a.model), Path(d) / "run", "greedy", a.size,
            SizedConfig(calib=load_recipe(c.recipe)), c.cc, None, sensitivity="measured", gcfg=c.gcfg,
            fold=c.fold, tensor_cache=c.tensor_cache, row_sample=c.row_sample), 1)
        with LlamaModel(str(plan.model_path), opts) as m:
            (ch,) = chunks(m.tokenize(plan.text), EvalConfig(512, 0, 1), m.bos if m.add_bos else None)
        chunk = np.asarray(ch)
        t0 = time.perf_counter()
        # the speed probe's candidate errors: greedy's guess reads the types on each tensor's frontier
        errs = speedprobe._type_errors(plan, {t.name: t for t in open_reader(plan.model_path).tensors}, {})
        r = speedprobe.decode_ratios(plan, opts, chunk, mixes.decode_mixes(plan, c.presets, errs), Path(d))
        probe_s = time.perf_counter() - t0
        mx, q = mixes.plan_mixes(plan, c.presets, errs), mixes.quantizable_tensors(plan)
        up = sum(t.n_params * mx.frac.get(t.name, 0.0) for t in q) / sum(t.n_params for t in q)
        t_src = speedprobe._decode_s(Path(plan.model_path), opts, chunk)
        t_file = speedprobe._decode_s(Path(a.gguf), opts, chunk)
    guessed = sorted({w.name for m in (mx.below, mx.above) for w in m.values()})
    print(json.dumps({"copy_ratios": r, "guessed_types": guessed,
                      "planned_greedy": r["below"] + up * (r["above"] - r["below"]),
                      "written_file": t_file / t_src, "f16_chunk_s": t_src, "file_chunk_s": t_file,
                      "copy_seconds": probe_s}, indent=1))


if __name__ == "__main__":
    main()
