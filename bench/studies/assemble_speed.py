"""Cost of one search episode's model file: assembling a GGUF from the tensor cache, against rerunning
llama.cpp's quantizer, and the llama.cpp load that follows either.

    .venv/bin/python -m bench.studies.assemble_speed [MODEL.gguf] [--maps 10] [--dst-dir /dev/shm]

Builds (or reuses) the tensor cache of MODEL for Q2_K..Q8_0 under bench/out/tensorcache, then for random
maps over those types times `assemble` into --dst-dir (a fresh file renamed over the last one, and with
recycle=True: the last one's pages overwritten) and LlamaModel open + close of the result. The first
map is also quantized by llama.cpp (quantize_map) for the reference time and a byte-for-byte check.
Prints JSON and writes it to bench/out/assemble_speed.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.paths import BENCH
from ramp_cpp.llama.backend import LlamaModel
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure.tensorcache import assemble, build_cache
from ramp_cpp.pipeline.demo import demo_model_path

OUT = BENCH / "out"
LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(demo_model_path()))
    ap.add_argument("--maps", type=int, default=10)
    ap.add_argument("--dst-dir", default="/dev/shm")
    ap.add_argument("--cache-dir", default=str(OUT / "tensorcache"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip the quantize_map reference")
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    cache = build_cache(a.model, LADDER, a.cache_dir, n_threads=a.threads)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_cache(a.model, LADDER, a.cache_dir, n_threads=a.threads)
    reuse_s = time.perf_counter() - t0

    info = read_inventory(a.model)
    rng = np.random.default_rng(a.seed)
    maps = [{t.name: LADDER[rng.integers(len(LADDER))] for t in info.searched} for _ in range(a.maps)]
    dst = Path(a.dst_dir) / "ramp-assemble-speed.gguf"
    assemble_s, recycle_s, load_s, sizes = [], [], [], []
    for m in maps:
        r = assemble(cache, m, dst, force=True)
        assemble_s.append(r.seconds)
        sizes.append(r.file_size)
        recycle_s.append(assemble(cache, m, dst, force=True, recycle=True).seconds)
        t0 = time.perf_counter()
        LlamaModel(dst).close()
        load_s.append(time.perf_counter() - t0)

    ref: dict[str, object] = {}
    if not a.no_reference:
        assemble(cache, maps[0], dst, force=True)
        ref_path = Path(a.dst_dir) / "ramp-assemble-speed.ref.gguf"
        t0 = time.perf_counter()
        quantize_map(a.model, ref_path, maps[0], opts=QuantizeOptions(n_threads=a.threads, force=True))
        ref = {
            "quantize_map_s": time.perf_counter() - t0,
            "identical_to_quantize_map": filecmp.cmp(dst, ref_path, shallow=False),
        }
        ref_path.unlink()
    dst.unlink(missing_ok=True)

    report = {
        "model": a.model,
        "types": list(LADDER),
        "cache_dir": str(cache.directory),
        "cache_build_s": build_s,
        "cache_reuse_s": reuse_s,
        "maps": len(maps),
        "file_size_mean": statistics.mean(sizes),
        "assemble_s_mean": statistics.mean(assemble_s),
        "assemble_s_median": statistics.median(assemble_s),
        "assemble_recycle_s_mean": statistics.mean(recycle_s),
        "assemble_recycle_s_median": statistics.median(recycle_s),
        "load_close_s_mean": statistics.mean(load_s),
        "assemble_s": assemble_s,
        "assemble_recycle_s": recycle_s,
        "load_close_s": load_s,
        **ref,
    }
    text = json.dumps(report, indent=2)
    (OUT / "assemble_speed.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
