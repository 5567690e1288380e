"""Does llama.cpp's KLD depend on the thread count? (docs/workers.md): SmolLM2-135M's Q4_1 file against its
F16 on 2 reward chunks with 1, 2 and again 1 thread; prints each run's per-chunk KLDs, which were identical.

    .venv/bin/python -m bench.studies.threads_kld
"""

from __future__ import annotations

import time

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.store.cache import cache_dir
from ramp_cpp.store.texts import load_text


def main() -> int:
    m = cache_dir() / "models"
    text = load_text("wikitext2-valid")[0]
    for th in (1, 2, 1):
        t = time.perf_counter()
        r = kld(m / "SmolLM2-135M-Instruct.Q4_1.gguf", m / "SmolLM2-135M-Instruct.f16.gguf", text,
                EvalConfig(n_chunks=2), RuntimeOptions(n_threads=th))
        print(th, repr(r.kld_mean), r.chunk_kld, f"{time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
