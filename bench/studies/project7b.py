"""Projected wall time of the default `search --method greedy --size Q4_K_M` on the llama-2-7b shape, on one
GPU and on 8 GPUs through Ray (issue 22). Every input is a measurement named below except the GPU's decode
speed, which no machine of this project has measured: it is an argument (default: 4,700 tokens/s for a 7B at
pp512, the order llama.cpp's CUDA benchmarks report for one data-centre GPU, PR #3776), and the projection is
printed for it.

Inputs (bench/results/*.json):
- jobparts.json (bench/studies/jobparts.py on Qwen2.5-Coder-0.5B): one probe's assemble, load, KLD arithmetic
  and log-sum-exp over the vocabulary; scaled to the 7B shape by file bytes and by tokens × vocabulary;
- costs.json (bench/costs.py, Qwen2.5-Coder-0.5B, today's default): the tensor cache's twelve quantizer passes
  and the proxy (CPU), the fold's copy and the calibration, scaled by parameter count;
- bench/studies/ray_overhead.py: Ray's per-job cost is below 0.1 s (0.8 ms empty, 7 ms with the reward text).

The CPU stages are scaled from 2 cores to `--cores` linearly (llama.cpp's quantizer and the proxy are
multi-threaded; linear is the optimistic bound). Printed as a markdown table.

    .venv/bin/python -m bench.studies.project7b --gpus 1,8 --cores 16
"""

from __future__ import annotations

import argparse
import json

from bench.paths import BENCH

RESULTS = BENCH / "results"
QWEN = "Qwen2.5-Coder-0.5B.offgrid-s0.f16.gguf"
P_QWEN, P_7B = 0.494e9, 6.74e9  # parameters
VOCAB_7B = 32000
BYTES_7B_Q4KM = 3.80 * (1 << 30)  # llama-2-7b at Q4_K_M's whole-file size
PROBES_7B = 24  # 7 roles x 3 depth buckets + token_embd + output + the reference (SEARCH_GROUPS)
PROBE_TOKENS = 2 * 512  # SEARCH_GROUPS.chunks reward chunks
FOLD_TOKENS = 2 * 8 * 512  # --fold check: two files on FOLD_CHECK_CHUNKS chunks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,8")
    ap.add_argument("--cores", type=int, default=16, help="CPU cores of each GPU node")
    ap.add_argument(
        "--gpu-tok-s", type=float, default=4700.0, help="7B decode speed of one GPU (not measured)"
    )
    a = ap.parse_args()
    jp = json.loads((RESULTS / "jobparts.json").read_text())[QWEN]
    costs = {
        c["stage"]: c
        for c in json.loads((RESULTS / "costs.json").read_text())["qwen0.5b|new-3b|Q4_K_M"]["costs"]
    }
    scale_p = P_7B / P_QWEN
    cpu = 2 / a.cores  # 2-core measurements to a node's cores
    # one probe on a GPU node: assemble (CPU, by bytes), load (by bytes, as here), decode on the GPU, numpy
    by_bytes = BYTES_7B_Q4KM / jp["file_bytes"]
    by_vocab = PROBE_TOKENS * VOCAB_7B / (jp["tokens"] * jp["n_vocab"])
    probe = {
        "assemble": jp["assemble_cpu"] * by_bytes,
        "load": jp["load_wall"] * by_bytes,
        "decode (GPU)": PROBE_TOKENS / a.gpu_tok_s,
        "KLD arithmetic": jp["kld_cpu"] * PROBE_TOKENS / jp["tokens"] + jp["logsumexp_cpu"] * by_vocab,
        "Ray": 0.05,
    }
    per_probe = sum(probe.values())
    serial = {
        "calibration (16 x 512)": 8192 / a.gpu_tok_s * 3,  # statistics copied back per layer: 3x a decode
        "fold (13.5 GB copy)": costs["fold"]["wall_s"] * scale_p,
        "presets (1 pass)": costs["presets"]["wall_s"] * scale_p * cpu,
        "allocate + write": costs["allocate"]["wall_s"] * scale_p * cpu,
        "evaluate + base log-probs": (4 + 14) * 512 / a.gpu_tok_s + 2 * probe["load"],
    }
    fold_check = (
        costs["presets"]["wall_s"] * scale_p * cpu
        + probe["assemble"]
        + probe["load"]
        + (FOLD_TOKENS / 2 / a.gpu_tok_s)
    )
    print(
        f"one probe on a GPU node: {per_probe:.1f} s = "
        + ", ".join(f"{k} {v:.1f} s" for k, v in probe.items())
    )
    print()
    print("| stage | " + " | ".join(f"{g} GPU{'s' if int(g) > 1 else ''}" for g in a.gpus.split(",")) + " |")
    print("|---|" + "---|" * len(a.gpus.split(",")))
    passes_s = costs["tensor cache + proxy (folded)"]["wall_s"] * scale_p * cpu
    totals = {}
    for g in (int(x) for x in a.gpus.split(",")):
        waves = -(-PROBES_7B // g)
        totals[g] = {
            **serial,
            # the base type's pass alone, then the other 11 as jobs, one per node (tensorcache.cache_type);
            # the stage's proxy part is small (its errors are written 28 s after the last pass on Qwen)
            "tensor cache + proxy (1 + 11 passes)": passes_s / 12 * (1 + -(-11 // g)),
            f"group probes ({PROBES_7B} jobs)": waves * per_probe,
            "fold check (2 jobs)": fold_check * (1 if g > 1 else 2),
        }
    for k in next(iter(totals.values())):
        print(f"| {k} | " + " | ".join(f"{t[k] / 60:.1f} min" for t in totals.values()) + " |")
    print(
        "| **total** | " + " | ".join(f"**{sum(t.values()) / 60:.0f} min**" for t in totals.values()) + " |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
