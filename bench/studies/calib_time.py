"""Cost of calibration: decode time of the same windows with and without the activation collector
(llama.cpp's eval callback), min of interleaved repeats, on the demo model by default.

    .venv/bin/python -m bench.studies.calib_time [MODEL.gguf] [--windows 2] [--ctx 2048] [--repeats 2]

The collector makes the scheduler stop after every weight matmul (to hand us its input), so this measures
that overhead together with the statistics loop itself. Extrapolate to the paper recipe (128 windows)
with `paper_recipe_estimate_s`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.calibration.collect import windows
from ramp_cpp.llama.backend import RuntimeOptions, StatsModel
from ramp_cpp.llama.native import ActivationCollector, stats_model
from ramp_cpp.pipeline.demo import demo_model_path
from ramp_cpp.store.texts import load_text


class _NoCollector(StatsModel):
    """The same context, pieces and all-position logits, with no eval callback."""

    def _context_params(self) -> Any:
        c = super()._context_params()
        c.cb_eval = self._lc.ggml_backend_sched_eval_callback()  # NULL
        c.cb_eval_user_data = None
        return c


def _time(model: StatsModel, ws: list) -> float:
    t0 = time.perf_counter()
    for w in ws:
        model.run(w)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(demo_model_path()))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    text, _ = load_text("wikitext2-valid")
    cfg = CalibConfig(samples=a.windows, ctx=a.ctx)
    opts = RuntimeOptions(n_ctx=a.ctx, n_threads=a.threads)
    with stats_model(a.model, opts) as on, _NoCollector(a.model, ActivationCollector(), opts) as off:
        ws = windows(on.tokenize(text), cfg, on.bos if on.add_bos else None)
        t_on, t_off = [], []
        for _ in range(a.repeats):
            t_off.append(_time(off, ws))
            t_on.append(_time(on, ws))
    n = a.windows * a.ctx
    best_on, best_off = min(t_on), min(t_off)
    print(
        json.dumps(
            {
                "model": a.model,
                "tokens": n,
                "seconds_with_collector": best_on,
                "seconds_without": best_off,
                "overhead_ratio": best_on / best_off,
                "tokens_per_second": n / best_on,
                "paper_recipe_estimate_s": 128 * 2048 / (n / best_on),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
