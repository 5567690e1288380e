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
from collections import Counter
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
KEY_POWER = "ramp.fold.power"  # the exponent asked for: a number, or "search over ... on ..."
KEY_POWERS = "ramp.fold.powers"  # the exponent each group took, in plan_groups' order, comma-separated

F16_MAX = float(np.finfo(np.float16).max)

Progress = Callable[[int, int], None]


#: The searched exponents (issue 37): 0 is the group unfolded, 0.5 the paper's, 1 moves the whole outlier
#: range into the weights (SmoothQuant's alpha = 1); steps of 1/4 over AWQ's [0, 1] keep it at 5 quantizer
#: passes per group and type
SEARCH_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The type the search rounds with: what Q4_K_M gives most of a fold group's tensors (q, k, gate, up), and
#: the middle of the range the allocation moves them in at Q4_K_M's and Q3_K_M's sizes
SEARCH_TYPES = ("Q4_K",)


@dataclass(frozen=True)
class FoldConfig:
    """Paper Table 11 (scale folding configuration); `power` None: searched per group over `grid`, each
    power judged by the imatrix-weighted error of the group's tensors as llama.cpp writes them in
    `search_types` (ramp_cpp/fold/exponent.py)."""

    power: float | None = 0.5  # "Scale": s = sqrt(act_scale)
    eps: float = 1e-5  # "Stabilization": added after s / mean(s)
    grid: tuple[float, ...] = SEARCH_GRID
    search_types: tuple[str, ...] = SEARCH_TYPES

    def __post_init__(self) -> None:
        from ramp_cpp.model.ladder import type_from_name

        powers = self.grid if self.power is None else (self.power,)
        if not powers or not all(np.isfinite(p) and p >= 0 for p in powers):
            raise RampError(f"fold exponents must be finite and >= 0, got {list(powers)}")
        if self.power is None:
            if not self.search_types:
                raise RampError("a searched fold exponent needs at least one quantization type")
            for t in self.search_types:
                type_from_name(t)

    @property
    def searched(self) -> bool:
        return self.power is None

    def describe(self) -> str:
        """The ramp.fold.power value: the fixed exponent, or what the search chose from."""
        if self.power is not None:
            return f"{self.power:g}"
        return f"search over {','.join(f'{p:g}' for p in self.grid)} on {','.join(self.search_types)}"


def parse_fold_power(value: str) -> FoldConfig:
    """`--fold-power`: a number (the exponent of every group) or `search`; one line otherwise."""
    v = value.strip().lower()
    if v == "search":
        return FoldConfig(power=None)
    try:
        return FoldConfig(power=float(v))
    except ValueError:
        raise RampError(f"--fold-power: a number (0.5 is the paper's) or search, not {value!r}") from None


def fold_scales(max_abs: np.ndarray, cfg: FoldConfig = FoldConfig()) -> np.ndarray:
    """s = max_abs ** power; s = s / mean(s); s = s + eps (float64, one entry per input column)."""
    if cfg.power is None:
        raise RampError("fold_scales needs a fixed exponent; a searched one is chosen per group by fold()")
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
    power: float = 0.5  # the exponent s was made with
    errors: tuple[tuple[float, float], ...] = field(default=(), compare=False)  # searched: (power, error)


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
    power: str = "0.5"  # the ramp.fold.power value: FoldConfig.describe()

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
            "power": self.power,
            "powers": [g.power for g in self.groups],
            "power_counts": {f"{p:g}": n for p, n in sorted(Counter(g.power for g in self.groups).items())},
            "search_errors": {g.norm: {f"{p:g}": e for p, e in g.errors} for g in self.groups if g.errors},
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

    groups = _scaled(plan, cal, cfg, _searcher(model_path, types, f32, rec.arch) if cfg.searched else None,
                     progress)
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
        KEY_POWER: cfg.describe(),
        KEY_POWERS: ",".join(repr(float(g.power)) for g in groups),  # a string: inventories cut long arrays
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
        power=cfg.describe(),
    )


#: (group, its mean E[x²] per input column, the scales of a power) -> (chosen power, (power, error) per power)
Searcher = Callable[[PlannedGroup, np.ndarray, Callable[[float], np.ndarray], FoldConfig],
                    tuple[float, tuple[tuple[float, float], ...]]]


def _scaled(
    plan: Sequence[PlannedGroup],
    cal: Calibration,
    cfg: FoldConfig,
    search: Searcher | None = None,
    progress: Progress | None = None,
    powers: Sequence[float] | None = None,
) -> list[FoldedGroup]:
    """Each group's s: with cfg.power, that exponent; searched (cfg.power None), the power `search` picks,
    or the group's entry of `powers` (a file's ramp.fold.powers) when given."""
    out = []
    for i, g in enumerate(plan):
        st = cal.stats[g.stats_from].pooled()

        def scales(p: float, st: InputStats = st, name: str = g.stats_from) -> np.ndarray:
            try:
                return fold_scales(st.max_abs, replace(cfg, power=p))
            except RampError as e:
                raise RampError(f"{name}: {e}") from None

        errors: tuple[tuple[float, float], ...] = ()
        if cfg.power is not None:
            power = cfg.power
        elif powers is not None:
            power = float(powers[i])
        else:
            assert search is not None
            mean_sq = np.asarray(st.sum_sq, dtype=np.float64) / max(st.count, 1)
            power, errors = search(g, mean_sq, scales, cfg)
            if progress is not None:
                progress(i + 1, len(plan))
        out.append(FoldedGroup(g.block, g.norm, g.linears, g.stats_from, scales(power), power, errors))
    return out


def _searcher(model_path: str | os.PathLike[str], types: Mapping[str, tuple[str, int, int]], f32: bool,
              arch: str) -> Searcher:
    """choose_power over the group's tensors llama.cpp quantizes, read from `model_path` as float32 rows."""
    from ramp_cpp.fold.exponent import choose_power
    from ramp_cpp.model.arch import quantizable
    from ramp_cpp.model.ladder import type_from_name
    from ramp_cpp.write.cachefiles import source_rows

    threads = max(1, min(4, os.cpu_count() or 1))

    def search(g: PlannedGroup, mean_sq: np.ndarray, scales: Callable[[float], np.ndarray], cfg: FoldConfig
               ) -> tuple[float, tuple[tuple[float, float], ...]]:
        ws = []
        for t in g.linears:
            if not quantizable(t, 2, arch):  # the router: never quantized, so its rounding is s's no matter
                continue
            rows = source_rows(str(model_path), t, 0, 1 << 62)
            if rows.ndim == 2:  # a 1-D gate vector is never quantized either
                ws.append(rows)
        f16 = not f32 and any(types[t][0] == "F16" for t in g.linears)
        qtypes = [type_from_name(x) for x in cfg.search_types]
        return choose_power(ws, mean_sq, scales, cfg.grid, qtypes, f16, threads)

    return search


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
    recomputed from `cal` (a searched exponent: with the powers the file's ramp.fold.powers records) and must
    reproduce the file's ramp.fold.scales_sha256, which proves the file was folded with this calibration and
    `cfg`; then `folded_calibration` applies them."""
    info = info or read_inventory(folded_path)
    name = Path(folded_path).name
    if not _is_true(info.metadata.get(KEY_FOLDED)):
        raise RampError(f"{name} is not scale-folded (no {KEY_FOLDED})")
    version = info.metadata.get(KEY_VERSION)
    if version != FOLD_VERSION:
        raise RampError(f"{name} was folded by scale folding v{version}; this is v{FOLD_VERSION}")
    plan = plan_groups(fold_arch(info.arch), info.n_blocks, tensor_types(folded_path))
    check_matches(cal, info, need=sorted({g.stats_from for g in plan}))
    powers: list[float] | None = None
    if cfg.searched:  # the search's choices are the file's: re-searching would need the unfolded weights
        asked, listed = info.metadata.get(KEY_POWER), str(info.metadata.get(KEY_POWERS, ""))
        powers = [float(p) for p in listed.split(",") if p]
        if asked != cfg.describe() or len(powers) != len(plan):
            raise RampError(f"{name} was not folded with a searched exponent ({cfg.describe()}): "
                            f"{KEY_POWER} is {asked!r}")
    groups = _scaled(plan, cal, cfg, powers=powers)
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
