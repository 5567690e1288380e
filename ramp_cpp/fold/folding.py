"""Scale folding stage (paper §4.3, Algorithm 2; Table 11): migrate activation outliers into the weights.

For each block and each norm -> linears group of `arch.FOLD_ARCHS` (attn_norm -> q, k, v; ffn_norm ->
gate, up), with `max_abs` the per-input-column max |x| of the group's shared input (calibration):

    s = max_abs ** power          power = 1/2 (Table 11 "Scale": s = sqrt(act_scale))
    s = s / mean(s)               (Table 11 "Normalization": magnitude preservation)
    s = s + eps                   eps = 1e-5 (Table 11 "Stabilization")
    W     <- W · diag(s)          every linear of the group: input column j times s[j]
    gamma <- (gamma + offset) / s - offset     the norm's stored weight (offset: arch.FoldArch.norm_offset)

The RMSNorm's output y = n(x) · (gamma + offset) becomes y / s, and (W · diag(s)) @ (y / s) = W @ y, so the
network computes the same function; only the rounding of the stored weights changes. Columns whose
inputs carry outliers (large s) are scaled up in W, where a per-group quantizer sees them, and the
activations reaching the matmul are flattened by 1/s.

The folded model's inputs to the scaled linears are x / s, so its calibration is the original's with
max_abs / s and sum_sq / s^2 (`folded_calibration`): one measurement serves both models.

Mixture of experts (arch.MOE_GROUP): ffn_norm's output feeds the router ffn_gate_inp, every expert's slice of
ffn_gate_exps and ffn_up_exps, and (where a block has them) the shared experts ffn_gate_shexp, ffn_up_shexp
and their gate ffn_gate_inp_shexp. The norm is one, so one s serves them all: the router's columns, each
expert's slice (W_e · diag(s) for every e) and the shared experts take the same s, and γ/s compensates all of
them at once; the router's logits, hence the routing, are unchanged. s is computed from the expert tensor's
statistics pooled over its experts, max_abs = max over experts e of max_abs[e] (`InputStats.pooled`): the
largest input any expert meets per column, the one a per-group quantizer of any expert slice must hold. Every
token is routed to top-k experts, so this pooled max is the max over all tokens, the same max_abs the router
and the shared experts read; a per-expert s cannot be folded into a norm the experts share. The folded
calibration divides each expert's statistics by the same s. A fused ffn_gate_up_exps (arch.MOE_FUSED_GROUP)
is one tensor of the group: its gate rows and its up rows alike take s on their input columns.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.calibration.artifact import Calibration, check_matches
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.ggufio import (
    REWRITABLE,
    ModelInfo,
    TensorRewrite,
    read_inventory,
    rewrite_gguf,
    tensor_types,
)
from ramp_cpp.model.arch import FoldArch, FoldGroup, fold_arch
from ramp_cpp.store.cache import file_sha256_cached

FOLD_VERSION = 1  # ramp.fold.version: bump when the transformation or its metadata change

#: GGUF metadata keys a folded model carries.
KEY_FOLDED = "ramp.folded"
KEY_CALIBRATION = "ramp.fold.calibration"
KEY_VERSION = "ramp.fold.version"
KEY_SCALES = "ramp.fold.scales_sha256"  # digest of every s, so a calibration can be matched to the file

F16_MAX = float(np.finfo(np.float16).max)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FoldConfig:
    """Paper Table 11 (scale folding configuration)."""

    power: float = 0.5  # "Scale": s = sqrt(act_scale)
    eps: float = 1e-5  # "Stabilization": added after s / mean(s)


def fold_scales(max_abs: np.ndarray, cfg: FoldConfig = FoldConfig()) -> np.ndarray:
    """s = max_abs ** power; s = s / mean(s); s = s + eps (float64, one entry per input column)."""
    a = np.asarray(max_abs, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise RampError(f"activation scales must be a non-empty vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise RampError("activation scales contain negative, NaN or infinite values")
    s = a**cfg.power
    m = s.mean()
    if m <= 0:
        raise RampError("activation scales are all zero: the calibration never saw this input")
    return s / m + cfg.eps


def fold_arrays(
    gamma: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, norm_offset: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fold on arrays: gamma' = (gamma + norm_offset) / s - norm_offset and W' = W · diag(s) for each W
    in `weights` (numpy shape (n_out, n_in), so column j is scaled by s[j]; (n_expert, n_out, n_in) for an
    expert tensor, every expert's slice alike; (n_in,) for a gate vector such as ffn_gate_inp_shexp).
    Computed in float32."""
    s32 = np.asarray(s, dtype=np.float32)
    g = (np.asarray(gamma, dtype=np.float32) + np.float32(norm_offset)) / s32 - np.float32(norm_offset)
    out = []
    for w in weights:
        w = np.asarray(w, dtype=np.float32)
        if w.ndim not in (1, 2, 3) or w.shape[-1] != s32.shape[0]:
            raise RampError(f"a weight of shape {w.shape} cannot take {s32.shape[0]} input scales")
        out.append(w * s32)
    return g, out


# -- planning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedGroup:
    """One group of one block, by GGUF tensor name."""

    block: int
    norm: str
    linears: tuple[str, ...]
    stats_from: str


def plan_groups(rec: FoldArch, n_blocks: int, names: Collection[str]) -> list[PlannedGroup]:
    """The groups to fold in a model with tensors `names`: per block and norm, the first alternative of
    `rec.groups` whose linears the block has, with those of its `optional` linears the block has. A block
    lacking a norm's linears, or feeding the norm's output to another tensor (`also_read_by`), is refused:
    folding would change what the model computes."""

    def w(b: int, role: str) -> str:
        return f"blk.{b}.{role}.weight"

    norms = list(dict.fromkeys(g.norm for g in rec.groups))
    out = []
    for b in range(n_blocks):
        for norm in norms:
            alts: list[FoldGroup] = [g for g in rec.groups if g.norm == norm]
            if w(b, norm) not in names:
                raise RampError(f"{rec.arch} block {b} has no {w(b, norm)}: cannot fold into it")
            g = next((g for g in alts if all(w(b, x) in names for x in g.linears)), None)
            if g is None:
                want = " or ".join("/".join(a.linears) for a in alts)
                raise RampError(f"{rec.arch} block {b}: {norm} feeds none of {want}; cannot fold into it")
            other = [w(b, x) for x in g.also_read_by if w(b, x) in names]
            if other:
                raise RampError(f"block {b}: {norm} also feeds {other[0]}: folding would change its input")
            linears = [w(b, x) for x in g.linears] + [w(b, x) for x in g.optional if w(b, x) in names]
            out.append(PlannedGroup(b, w(b, norm), tuple(linears), w(b, g.stats_from)))
    return out


# -- calibration of the folded model ----------------------------------------------------------------


def folded_calibration(cal: Calibration, scales: Mapping[str, np.ndarray]) -> Calibration:
    """The calibration the folded model would measure: a linear whose weights took W · diag(s) reads x / s,
    so its max_abs becomes max_abs / s and its sum_sq becomes sum_sq / s^2 (every expert's of an expert
    tensor, its counts unchanged); other tensors are unchanged. `scales` maps weight names to their s. The
    model identity stays the caller's to set."""
    stats: dict[str, InputStats] = {}
    for name, st in cal.stats.items():
        s = scales.get(name)
        if s is None:
            stats[name] = st
            continue
        s64 = np.asarray(s, dtype=np.float64)
        if s64.shape != st.max_abs.shape[-1:]:
            raise RampError(f"{name}: {s64.shape[0]} scales for {st.max_abs.shape[-1]} input columns")
        stats[name] = replace(st, max_abs=(st.max_abs / s64).astype(np.float32), sum_sq=st.sum_sq / s64**2)
    extra = {**cal.extra, "folded_by": f"ramp-cpp scale folding v{FOLD_VERSION}"}
    return replace(cal, stats=stats, extra=extra)


# -- the stage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldedGroup:
    block: int
    norm: str
    linears: tuple[str, ...]
    stats_from: str
    s: np.ndarray = field(compare=False, repr=False)  # float64 (n_in,)


@dataclass(frozen=True)
class FoldResult:
    path: str
    source: str
    arch: str
    groups: tuple[FoldedGroup, ...]
    linear_type: str  # how the folded linears are stored
    description: str  # the ramp.fold.calibration value
    seconds: float
    calibration: Calibration = field(compare=False, repr=False)  # for the folded model

    def scales(self) -> dict[str, np.ndarray]:
        """Weight name -> its input scale s (q, k and v share one array)."""
        return {name: g.s for g in self.groups for name in g.linears}

    def summary(self) -> dict[str, Any]:
        s = np.concatenate([g.s for g in self.groups])
        return {
            "path": self.path,
            "source": self.source,
            "arch": self.arch,
            "groups": len(self.groups),
            "linears": sum(len(g.linears) for g in self.groups),
            "linear_type": self.linear_type,
            "s_min": float(s.min()),
            "s_max": float(s.max()),
            "s_max_over_min_median": float(np.median([g.s.max() / g.s.min() for g in self.groups])),
            "calibration": self.description,
            "seconds": self.seconds,
        }


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, (int, np.integer)) and int(v) != 0)


def fold(
    model_path: str | os.PathLike[str],
    cal: Calibration,
    dst: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
    f32: bool = False,
    cfg: FoldConfig = FoldConfig(),
    info: ModelInfo | None = None,
) -> FoldResult:
    """Write `dst`, the scale-folded copy of the F16/BF16/F32 GGUF `model_path`, with scales from `cal`
    (measured on `model_path`). Folded linears keep their type, or become F32 with `f32`; norms keep
    theirs; every other tensor and key is copied as is, plus ramp.folded, ramp.fold.calibration,
    ramp.fold.version and ramp.fold.scales_sha256. `force` overwrites `dst` and folds an already folded
    model again. `info`: `model_path`'s inventory when the caller has it."""
    t0 = time.perf_counter()
    info = info or read_inventory(model_path)
    name = Path(model_path).name
    if _is_true(info.metadata.get(KEY_FOLDED)) and not force:
        raise RampError(f"{name} is already scale-folded ({KEY_FOLDED}); --force folds it again")
    rec = fold_arch(info.arch)
    types = tensor_types(model_path)
    plan = plan_groups(rec, info.n_blocks, types)
    for t in (t for p in plan for t in (p.norm, *p.linears)):
        qt = GGMLQuantizationType[types[t][0]]
        if qt not in REWRITABLE:
            raise RampError(
                f"{name}: {t} is {qt.name}; scale folding needs float weights: dequantize first with "
                f"`ramp-cpp quantize {model_path} --preset F16 --allow-requantize -o MODEL.f16.gguf`"
            )
    if "folded_by" in cal.extra and not _is_true(info.metadata.get(KEY_FOLDED)):
        raise RampError(f"calibration from {cal.model_name} was measured on a folded model; {name} is not")
    check_matches(cal, info, need=sorted({p.stats_from for p in plan}))

    groups = _scaled(plan, cal, cfg)
    rewrites: dict[str, TensorRewrite] = {}
    for g in groups:
        norm_type = GGMLQuantizationType[types[g.norm][0]]
        rewrites[g.norm] = TensorRewrite(norm_type, _norm_fn(g.s, rec.norm_offset))
        for t in g.linears:
            qt = GGMLQuantizationType.F32 if f32 else GGMLQuantizationType[types[t][0]]
            rewrites[t] = TensorRewrite(qt, _linear_fn(t, g.s, qt))

    description = f"{cal.describe()}; source sha256 {file_sha256_cached(model_path)}"
    kv: dict[str, bool | int | float | str] = {
        KEY_FOLDED: True,
        KEY_CALIBRATION: description,
        KEY_VERSION: FOLD_VERSION,
        KEY_SCALES: scales_digest(groups),
    }
    out = rewrite_gguf(model_path, dst, rewrites, kv, force=force, progress=progress)
    fcal = folded_calibration(cal, {t: g.s for g in groups for t in g.linears})
    # remembered by (path, size, mtime): a resumed run and later stages ask again; at 7B it reads 13 GB
    fcal = replace(fcal, model_name=out.name, model_sha256=file_sha256_cached(out))
    linear_types = {rewrites[t].ggml_type.name for g in groups for t in g.linears}
    return FoldResult(
        path=str(out),
        source=str(model_path),
        arch=info.arch,
        groups=tuple(groups),
        linear_type="/".join(sorted(linear_types)),
        description=description,
        seconds=time.perf_counter() - t0,
        calibration=fcal,
    )


def _scaled(plan: Sequence[PlannedGroup], cal: Calibration, cfg: FoldConfig) -> list[FoldedGroup]:
    out = []
    for g in plan:
        try:
            s = fold_scales(cal.stats[g.stats_from].pooled().max_abs, cfg)
        except RampError as e:
            raise RampError(f"{g.stats_from}: {e}") from None
        out.append(FoldedGroup(g.block, g.norm, g.linears, g.stats_from, s))
    return out


def scales_digest(groups: Sequence[FoldedGroup]) -> str:
    """sha256 over (norm name, s as float64 bytes) of every group, in order."""
    h = hashlib.sha256()
    for g in groups:
        h.update(g.norm.encode())
        h.update(np.ascontiguousarray(g.s, dtype=np.float64).tobytes())
    return h.hexdigest()


def folded_calibration_from_file(
    cal: Calibration, folded_path: str | os.PathLike[str], cfg: FoldConfig = FoldConfig(),
    info: ModelInfo | None = None,
) -> Calibration:
    """The calibration of a model folded earlier with `cal` (measured on the original): the scales are
    recomputed from `cal` and must reproduce the file's ramp.fold.scales_sha256, which proves the file was
    folded with this calibration and `cfg`; then `folded_calibration` applies them."""
    info = info or read_inventory(folded_path)
    name = Path(folded_path).name
    if not _is_true(info.metadata.get(KEY_FOLDED)):
        raise RampError(f"{name} is not scale-folded (no {KEY_FOLDED})")
    version = info.metadata.get(KEY_VERSION)
    if version != FOLD_VERSION:
        raise RampError(f"{name} was folded by scale folding v{version}; this is v{FOLD_VERSION}")
    plan = plan_groups(fold_arch(info.arch), info.n_blocks, tensor_types(folded_path))
    check_matches(cal, info, need=sorted({g.stats_from for g in plan}))
    groups = _scaled(plan, cal, cfg)
    if scales_digest(groups) != info.metadata.get(KEY_SCALES):
        raise RampError(
            f"{name} was folded with another calibration or settings ({info.metadata.get(KEY_CALIBRATION)}), "
            f"not {cal.describe()}"
        )
    fcal = folded_calibration(cal, {t: g.s for g in groups for t in g.linears})
    return replace(fcal, model_name=name, model_sha256=file_sha256_cached(folded_path))


def _norm_fn(s: np.ndarray, offset: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(gamma: np.ndarray) -> np.ndarray:
        return fold_arrays(gamma, [], s, offset)[0]

    return fn


def _linear_fn(name: str, s: np.ndarray, qt: GGMLQuantizationType) -> Callable[[np.ndarray], np.ndarray]:
    def fn(w: np.ndarray) -> np.ndarray:
        out = fold_arrays(np.ones_like(s), [w], s)[1][0]
        # F16 saturates to inf past 65504 (folding multiplies an outlier column by s > 1)
        if qt == GGMLQuantizationType.F16 and float(np.abs(out).max()) > F16_MAX:
            raise RampError(f"{name}: a folded weight exceeds the F16 range; store folded linears with --f32")
        return out

    return fn
