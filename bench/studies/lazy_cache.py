"""Can a probe's tensors be quantized in memory instead of read from a disk cache of every type? (issue 21)

At 7B the tensor cache (every searched tensor at each of 12 types, ≈ 61 bits per weight) is what breaks the
2.5× disk bound, and its 12 llama.cpp passes are most of the run's quantization time. If ggml's own row
quantizer (`native.quantize_rows`: ggml_quantize_chunk, what llama.cpp's quantizer calls per tensor) gives the
cache's bytes, a cache can hold fewer types, or none, and make the rest when a probe asks.

For every (searched tensor, written type) blob of the benchmark's tensor cache (`bench/compare.py`'s, on the
folded off-grid base, with the folded calibration's imatrix), this quantizes the tensor from the folded F16
file with `quantize_rows` and the tensor's imatrix column weights, and compares the bytes. Times each type's
in-memory quantization (one thread), beside one llama.cpp pass of the same type over the whole model
(`quantize_map`, all cores).

    .venv/bin/python -m bench.studies.lazy_cache smollm2

Writes bench/results/lazy_cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare import HERE, Fold, prepare, tensor_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    ap.add_argument("--passes", default="Q4_K,IQ4_XS", help="types timed as one llama.cpp pass each")
    a = ap.parse_args()

    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from ramp_cpp.llama.native import quantize_rows
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
    from ramp_cpp.measure.proxy import measure

    b = prepare(a.model, "offgrid", 0, a.recipe)
    src, cal = b.model(Fold(0.5))
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    cache = tensor_cache(b, src, cal, sens)
    im = cal.imatrix()
    weights = {t.name: t for t in GGUFReader(src).tensors}
    same: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seconds: dict[str, float] = defaultdict(float)
    params: dict[str, int] = defaultdict(int)
    mismatched: list[str] = []
    for (name, wt), blob in sorted(cache.searched.items(), key=lambda kv: (kv[0][1].name, kv[0][0])):
        if name not in cache.names:
            continue
        w = np.asarray(weights[name].data, dtype=np.float32)
        w = w.reshape(-1, w.shape[-1])
        t0 = time.perf_counter()
        q = quantize_rows(int(wt), w, im.get(name))
        seconds[wt.name] += time.perf_counter() - t0
        params[wt.name] += w.size
        with open(cache.directory / blob.file, "rb") as f:
            f.seek(blob.offset)
            cached = f.read(blob.nbytes)
        equal = cached[: len(q)] == q and not any(cached[len(q):])  # the rest is alignment padding
        same[wt.name][0] += equal
        same[wt.name][1] += 1
        if not equal:
            mismatched.append(f"{name}:{wt.name}")
    passes: dict[str, float] = {}
    for tn in a.passes.split(","):
        t = T[tn]
        with tempfile.TemporaryDirectory(dir=b.out) as d:
            types = {n: t for n in cache.names}
            t0 = time.perf_counter()
            quantize_map(src, Path(d) / "pass.gguf", types, base=cache.base,
                         opts=QuantizeOptions(imatrix=im, force=True))
            passes[tn] = time.perf_counter() - t0
    rows: dict[str, Any] = {
        t: {"blobs": n, "identical": k, "seconds": seconds[t], "ns_per_weight": 1e9 * seconds[t] / params[t]}
        for t, (k, n) in sorted(same.items())
    }
    result = {
        "command": " ".join([".venv/bin/python", "-m", "bench.studies.lazy_cache", *sys.argv[1:]]),
        "model": a.model,
        "types": rows,
        "mismatched": mismatched[:20],
        "llama_pass_s": passes,
        "in_memory_all_types_s": sum(seconds.values()),
    }
    (HERE / "results" / "lazy_cache.json").write_text(json.dumps(result, indent=1))
    print("| written type | blobs | identical to the cache | in memory, 1 thread | ns / weight |")
    print("|---|---|---|---|---|")
    for t, r in rows.items():
        print(f"| {t} | {r['blobs']} | {r['identical']} | {r['seconds']:.1f} s | {r['ns_per_weight']:.1f} |")
    print(f"\nall types in memory: {result['in_memory_all_types_s']:.1f} s; one llama.cpp pass (all cores, "
          f"whole model): " + ", ".join(f"{k} {v:.1f} s" for k, v in passes.items()))


if __name__ == "__main__":
    main()
