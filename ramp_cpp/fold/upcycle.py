"""Upcycling a dense F16 model into a mixture of experts that computes the same function, for benchmarks.

No MoE checkpoint can be downloaded here, and a random-weight MoE says nothing about quality; an MoE made from
a real dense model does. Every expert is a copy of the dense FFN and the router is random; llama.cpp's
`llama` graph gates Mixtral-style (build_moe_ffn with softmax gating and norm_w = true: the top-k
probabilities are divided by their sum), so

    sum_{e in top-k} w_e · FFN(x) / sum_{e in top-k} w_e = FFN(x)

whatever the router picks. Then each expert moves off the grid on its own: its up rows are divided by
factors t_e and its down columns multiplied by them (arch.UP_TO_DOWN: SiLU(gate) · up is linear in up), so
the experts' down slices differ in their quantization error while the function stays the same. The gate
slices stay identical (nothing linear sits between gate and SiLU), and a row of up scaled by one factor
quantizes to the same integers at a scaled block scale: the experts differ where a rescale can make them.

Target architecture: llama (`qwen2moe` gates a mandatory shared expert with a sigmoid and does not
normalize the top-k weights; `qwen3moe` normalizes q and k per head: neither can equal a dense Qwen2).
llama.cpp's llama graph adds q/k/v biases when present; it ropes adjacent pairs (NORM) where qwen2 ropes
halves (NEOX), so a qwen2 model's q and k rows are permuted within each head (pair j, j + n_rot/2 -> 2j,
2j+1): the same permutation of both leaves every q·k, and so the attention, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.fold.folding import F16_MAX
from ramp_cpp.fold.pad import KEYS
from ramp_cpp.llama.ggufio import REWRITABLE, OutTensor, derive_gguf, open_reader, read_inventory
from ramp_cpp.model.arch import UP_TO_DOWN
from ramp_cpp.store.cache import file_sha256

UPCYCLE_VERSION = 1
KEY_EXPERTS = "ramp.upcycle.experts"
KEY_TOP_K = "ramp.upcycle.top_k"
KEY_SEED = "ramp.upcycle.seed"
KEY_SPREAD = "ramp.upcycle.spread"
KEY_VERSION = "ramp.upcycle.version"
KEY_SOURCE = "ramp.upcycle.source"

#: llama.cpp refuses more (LLAMA_MAX_EXPERTS in src/llama-hparams.h) and treats one expert as a dense FFN
MAX_EXPERTS = 1024


@dataclass(frozen=True)
class MoeNames:
    """llama.cpp's names for a Mixtral-style FFN: the router, each dense FFN role's 3-D expert tensor
    (ne = [n_in, n_out, n_expert]), and the metadata suffixes of the expert counts."""

    router: str = "ffn_gate_inp"
    experts: tuple[tuple[str, str], ...] = (
        ("ffn_gate", "ffn_gate_exps"), ("ffn_up", "ffn_up_exps"), ("ffn_down", "ffn_down_exps"),
    )
    expert_count: str = "expert_count"
    expert_used_count: str = "expert_used_count"
    rope_dims: str = "rope.dimension_count"


MOE = MoeNames()


@dataclass(frozen=True)
class UpcycleArch:
    """How a dense architecture becomes an MoE one llama.cpp runs: `target` is the MoE's architecture (its
    graph must gate with normalized top-k weights); `neox_to_norm` permutes q/k rows from rope halves to rope
    pairs when the target ropes differently (src/llama-model.cpp, llama_model_rope_type)."""

    arch: str
    target: str
    neox_to_norm: bool = False
    source: str = ""


UPCYCLE_ARCHS: dict[str, UpcycleArch] = {
    a.arch: a
    for a in (
        UpcycleArch("llama", "llama", source="src/models/llama.cpp (MoE branch when n_expert > 0)"),
        UpcycleArch("qwen2", "llama", neox_to_norm=True, source="src/models/qwen2.cpp, src/models/llama.cpp"),
    )
}

#: the tensors whose rows a NEOX -> NORM rope change permutes (weights and biases)
ROPED = ("attn_q", "attn_k")


@dataclass(frozen=True)
class UpcycleConfig:
    experts: int = 8
    top_k: int = 2
    seed: int = 0
    spread: float = 0.3  # each expert's up -> down factors exp(U(-spread, spread)), as `offgrid`


def neox_to_norm(head_dim: int, n_rot: int) -> np.ndarray:
    """Row order within a head that turns rope halves into rope pairs: new row 2j is old row j, new row
    2j + 1 old row j + n_rot/2 (j < n_rot/2); rows past n_rot are not roped and stay."""
    half = n_rot // 2
    pairs = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    return np.concatenate([pairs, np.arange(n_rot, head_dim)])


def _check(src: str | os.PathLike[str], cfg: UpcycleConfig) -> UpcycleArch:
    name = Path(src).name
    if not 2 <= cfg.experts <= MAX_EXPERTS:
        raise RampError(f"--experts must be in 2..{MAX_EXPERTS}, got {cfg.experts}")
    if not 1 <= cfg.top_k <= cfg.experts:
        raise RampError(f"--top-k must be in 1..{cfg.experts} (the experts), got {cfg.top_k}")
    if not cfg.spread >= 0:
        raise RampError(f"--spread must be >= 0, got {cfg.spread}")
    info = read_inventory(src)
    rec = UPCYCLE_ARCHS.get(info.arch)
    if rec is None:
        raise RampError(f"{name}: upcycling supports {', '.join(UPCYCLE_ARCHS)}; this model is {info.arch!r}")
    if info.metadata.get(f"{info.arch}.{MOE.expert_count}"):
        raise RampError(f"{name}: already a mixture of experts ({info.arch}.{MOE.expert_count} is set)")
    types = {t.name: t for t in open_reader(src, tokenizer=False).tensors}
    if rec.neox_to_norm and any(n.endswith(".attn_qkv.weight") for n in types):
        raise RampError(f"{name}: a fused attn_qkv cannot change its rope order here; split q/k/v first")
    for b in range(info.n_blocks):
        for dense, _ in MOE.experts:
            if f"blk.{b}.{dense}.bias" in types:
                raise RampError(f"{name}: blk.{b}.{dense} has a bias; llama.cpp's experts have none")
            w = f"blk.{b}.{dense}.weight"
            if w not in types:
                raise RampError(f"{name}: no {w}: not a dense gated FFN")
            qt = GGMLQuantizationType(int(types[w].tensor_type))
            if qt not in REWRITABLE:
                raise RampError(
                    f"{name}: {w} is {qt.name}; upcycling needs float weights: dequantize first "
                    f"(`ramp-cpp quantize {src} --preset F16 --allow-requantize -o M.f16.gguf`)"
                )
    return rec


def _stacked(
    dense: str, n: int, rows: np.ndarray | None, cols: np.ndarray | None
) -> Callable[[Callable[[str], np.ndarray]], np.ndarray]:
    """The expert tensor of `dense`: n copies, expert e's rows divided by rows[e], columns times cols[e]."""

    def make(get: Callable[[str], np.ndarray]) -> np.ndarray:
        w = get(dense).astype(np.float64)
        out = np.repeat(w[None], n, axis=0)
        if rows is not None:
            out /= rows[:, :, None]
        if cols is not None:
            out *= cols[:, None, :]
        if float(np.abs(out).max()) > F16_MAX:
            raise RampError(f"{dense}: a rescaled expert exceeds the F16 range; use a smaller --spread")
        return out.astype(np.float32)

    return make


def _fixed(values: np.ndarray) -> Callable[[Callable[[str], np.ndarray]], np.ndarray]:
    return lambda _get: values.astype(np.float32)


def _permuted_rows(name: str, order: np.ndarray) -> Callable[[Callable[[str], np.ndarray]], np.ndarray]:
    def make(get: Callable[[str], np.ndarray]) -> np.ndarray:
        return get(name)[order]

    return make


def upcycle(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: UpcycleConfig = UpcycleConfig(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `dst`, the dense float GGUF `src` with every block's FFN turned into cfg.experts experts (top
    cfg.top_k), each a rescaled copy of it, and a random router; ramp.upcycle.* metadata."""
    rec = _check(src, cfg)
    info = read_inventory(src)
    a, meta = info.arch, info.metadata
    tensors = {t.name: t for t in open_reader(src, tokenizer=False).tensors}  # names, shapes, types only
    rng = np.random.default_rng(cfg.seed)
    n_embd = int(meta[f"{a}.{KEYS.n_embd}"])
    n_head = int(meta[f"{a}.{KEYS.n_head}"])
    hd = int(meta.get(f"{a}.{KEYS.key_length}", n_embd // n_head))
    within = neox_to_norm(hd, int(meta.get(f"{a}.{MOE.rope_dims}", hd)))
    exps = dict(MOE.experts)
    out: list[OutTensor] = []
    for t in tensors.values():
        parts = t.name.split(".")
        role = parts[2] if parts[0] == "blk" else ""
        if role in exps:
            b = int(parts[1])
            if role != MOE.experts[0][0]:
                continue  # the block's expert tensors are all written where its first FFN tensor was
            n_ff = int(tensors[f"blk.{b}.{UP_TO_DOWN.producer}.weight"].shape[1])
            # rng draws in block order: router, then each expert's factors
            router = rng.standard_normal((cfg.experts, n_embd)) / np.sqrt(n_embd)
            f = np.exp(rng.uniform(-cfg.spread, cfg.spread, (cfg.experts, n_ff)))
            out.append(OutTensor(f"blk.{b}.{MOE.router}.weight", _fixed(router), GGMLQuantizationType.F32,
                                 router.shape))
            for dense, exp in MOE.experts:
                d = tensors[f"blk.{b}.{dense}.weight"]
                shape = (cfg.experts, *(int(x) for x in reversed(d.shape)))
                rows = f if dense == UP_TO_DOWN.producer else None
                cols = f if dense == UP_TO_DOWN.consumer else None
                out.append(OutTensor(f"blk.{b}.{exp}.weight", _stacked(d.name, cfg.experts, rows, cols),
                                     GGMLQuantizationType(int(d.tensor_type)), shape))
            continue
        if rec.neox_to_norm and role in ROPED:
            shape = tuple(int(x) for x in reversed(t.shape))
            order = (np.arange(shape[0] // hd)[:, None] * hd + within).reshape(-1)
            out.append(OutTensor(t.name, _permuted_rows(t.name, order),
                                 GGMLQuantizationType(int(t.tensor_type)), shape))
            continue
        out.append(OutTensor(t.name))
    t_arch = rec.target
    kv = {
        f"{t_arch}.{MOE.expert_count}": cfg.experts,
        f"{t_arch}.{MOE.expert_used_count}": cfg.top_k,
        KEY_EXPERTS: cfg.experts,
        KEY_TOP_K: cfg.top_k,
        KEY_SEED: int(cfg.seed),
        KEY_SPREAD: float(cfg.spread),
        KEY_VERSION: UPCYCLE_VERSION,
        KEY_SOURCE: f"{Path(src).name} sha256 {file_sha256(src)}",
    }
    return derive_gguf(src, dst, out, kv, arch=t_arch, force=force, progress=progress)
