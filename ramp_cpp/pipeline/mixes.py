"""The files a sized run quantizes and decodes, as its plan sees them before the run: each quantizer pass's
types (the tensor cache's, the presets'), a file's written types and bytes, and `Mixes`, the files whose
decode the plan reads (greedy's guessed file between the candidates just below and above the target's bits
per weight on each tensor's frontier, the probes' highest, the presets). The speed probe (speedprobe.py)
decodes them and the plan (estimate.py) counts them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ramp_cpp.llama.ggufio import TensorInfo
from ramp_cpp.measure.candidates import searchable, searched_tensors, tensor_candidates
from ramp_cpp.model.arch import quantizable
from ramp_cpp.model.ladder import bits_per_weight, needs_imatrix, tensor_nbytes, type_from_name, written_type
from ramp_cpp.pipeline.plan import RunPlan

T = GGMLQuantizationType
#: `type_error` is one linear's rows without the imatrix, greedy's the activation-weighted proxy of every
#: tensor: on Qwen2.5-Coder-0.5B's 896-wide rows Q5_1 lay 2% above the probe's hull, and greedy wrote 44% of
#: the weights at it. A type this near the hull counts as on it (`allocators.frontier`'s slack).
TYPE_ERROR_SLACK = 0.1


def has_imatrix(plan: RunPlan, t: TensorInfo) -> bool:
    """The calibration records every matmul's input: the linears and the head (token_embd when tied)."""
    return plan.cfg.imatrix and (t.role != "token_embd" or plan.info.tied_output)


def quant_key(w: T, im: bool) -> str:
    return f"{w.name}+im" if im else w.name


def preset_types(plan: RunPlan, name: str) -> dict[str, T]:
    """llama.cpp's preset, roughly: its type (Q4_K for Q4_K_M), the head at Q6_K in a K-quant preset, and
    attn_v and ffn_down at Q6_K (Q4_K for Q3_K_M) in llama.cpp's use_more_bits blocks of an _M or _L one."""
    main = next((T.__members__[n] for n in (name, name.rsplit("_", 1)[0]) if n in T.__members__), T.Q8_0)
    info, n = plan.info, plan.info.n_blocks
    out = {}
    for t in (t for t in info.tensors if quantizable(t.name, 2)):
        b = t.block if t.block is not None else -1
        more = name[-2:] in ("_M", "_L") and t.role in ("attn_v", "ffn_down") and (
            b < n // 8 or b >= 7 * n // 8 or (b - n // 8) % 3 == 2)
        head = "_K" in name and (t.role == "output" or (t.role == "token_embd" and info.tied_output))
        out[t.name] = T.Q6_K if head or (more and main != T.Q3_K) else T.Q4_K if more else main
    return out


def quantizer_passes(plan: RunPlan, presets: tuple[str, ...]) -> dict[str, list[dict[str, T]]]:
    """Every quantizer pass of the tensor cache (the base type first, over every searchable tensor) and of the
    presets stage: tensor -> asked type, the others at the base type."""
    cc, s = plan.cc, searched_tensors(plan.info, plan.cc.embeddings)
    cache = [{t.name: w for t in s if not needs_imatrix(w) or has_imatrix(plan, t)}
             for w in dict.fromkeys([cc.base, *cc.requested()])]
    cache[0] = {t.name: cc.base for t in searchable(plan.info)}
    pre = [preset_types(plan, p) for p in dict.fromkeys([*presets, *([plan.preset] if plan.preset else [])])]
    return {"cache": cache, "presets": pre}


def quantizable_tensors(plan: RunPlan) -> list[TensorInfo]:
    return [t for t in plan.info.tensors if quantizable(t.name, 2)]


def written(plan: RunPlan, types: Mapping[str, T]) -> dict[str, T]:
    """Every quantizable tensor -> the type llama.cpp writes for it (`types`, else the cache's base type)."""
    return {t.name: written_type(types.get(t.name, plan.cc.base), t.n_per_row)
            for t in quantizable_tensors(plan)}


def pad(plan: RunPlan, n: int) -> int:
    return -(-n // plan.info.alignment) * plan.info.alignment


def file_bytes(plan: RunPlan, types: Mapping[str, T]) -> int:
    info, ws = plan.info, written(plan, types)
    return info.data_offset + info.other_bytes + sum(
        pad(plan, tensor_nbytes(ws[t.name] if t.name in ws else type_from_name(t.ggml_type), t.n_params))
        for t in info.tensors)


@dataclass(frozen=True)
class Mixes:
    """The files whose decode the plan reads: greedy's `choice` (each searched tensor at its candidate
    nearest the target's bits per weight; its decode the mix of the candidates just `below` and `above` that
    many bits, a fraction `frac` of the way up), the probes' `hi` (each at its highest candidate) and the
    presets."""

    target: int
    cands: dict[str, list[T]]
    choice: dict[str, T]
    below: dict[str, T]
    above: dict[str, T]
    frac: dict[str, float]
    hi: dict[str, T]
    presets: list[dict[str, T]]


def error_key(w: T, n_per_row: int) -> str:
    return f"{w.name}@{n_per_row}"


def error_keys(plan: RunPlan) -> list[str]:
    """The `type_error` keys the plan reads: each searched row length's candidates but those that need an
    importance matrix (speedprobe._type_errors measures them)."""
    return list(dict.fromkeys(
        error_key(w, t.n_per_row) for t in searched_tensors(plan.info, plan.cc.embeddings)
        for _, w in tensor_candidates(plan.cc, t, has_imatrix(plan, t)) if not needs_imatrix(w)))


def frontier_types(plan: RunPlan, t: TensorInfo, cands: list[T], type_error: Mapping[str, float]) -> list[T]:
    """`t`'s candidates greedy steps between (allocators.frontier) by the probe's errors; all of them when one
    has no error measured."""
    from ramp_cpp.allocate.allocators import frontier
    from ramp_cpp.measure.sensitivity import Option

    err = [type_error.get(error_key(w, t.n_per_row)) for w in cands]
    if any(e is None for e in err):
        return cands
    opts = [Option(w, pad(plan, tensor_nbytes(w, t.n_params)), float(e or 0.0))
            for w, e in zip(cands, err, strict=True)]
    return [o.ggml_type for o in frontier(opts, TYPE_ERROR_SLACK)]


def plan_mixes(plan: RunPlan, presets: tuple[str, ...], type_error: Mapping[str, float] = {}) -> Mixes:
    """`Mixes` of `plan`; with `type_error` (`SpeedProbe.type_error`) greedy's guess reads only the types on
    each tensor's frontier: on the 7B shape the nearest candidates below the target (Q4_0, Q4_1) decode at
    ~2.8x F16's where the file greedy wrote, of K-quants and IQ4, decoded at ~0.4-0.8x."""
    from ramp_cpp.measure.candidates import type_for_bpw

    info, cc = plan.info, plan.cc
    searched = searched_tensors(info, cc.embeddings)
    every = {t.name: [w for _, w in tensor_candidates(cc, t, has_imatrix(plan, t))] for t in searched}
    cands = {t.name: frontier_types(plan, t, every[t.name], type_error) for t in searched}
    lowest = {t.name: min(pad(plan, tensor_nbytes(w, t.n_params)) for w in every[t.name]) for t in searched}
    fixed = plan.lo - sum(lowest.values())
    pre = quantizer_passes(plan, presets)["presets"]
    target = plan.target or file_bytes(plan, pre[-1])
    bpw = 8 * (target - fixed) / max(1, sum(t.n_params for t in searched))
    below = {n: max((w for w in c if bits_per_weight(w) <= bpw), key=bits_per_weight, default=c[0])
             for n, c in cands.items()}
    above = {n: min((w for w in c if bits_per_weight(w) >= bpw), key=bits_per_weight, default=c[-1])
             for n, c in cands.items()}
    frac = {n: (bpw - bits_per_weight(below[n])) / (bits_per_weight(above[n]) - bits_per_weight(below[n]))
            if above[n] != below[n] else 0.0 for n in cands}
    return Mixes(target, every, {n: type_for_bpw(c, bpw) for n, c in cands.items()}, below, above, frac,
                  {n: c[-1] for n, c in cands.items()}, pre)


def decode_mixes(
    plan: RunPlan, presets: tuple[str, ...] = (), type_error: Mapping[str, float] = {}
) -> dict[str, dict[str, T]]:
    """The files whose decode the plan reads (`Mixes`), by label: tensor -> requested type."""
    m = plan_mixes(plan, presets, type_error)
    pre = {f"preset {i}": p for i, p in enumerate(m.presets)}
    return {"below": m.below, "above": m.above, "hi": m.hi, **pre}

