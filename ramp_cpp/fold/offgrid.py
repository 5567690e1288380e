"""Off-grid bases for benchmarks: a function-preserving random channel rescale of an F16 model.

Every real model this project can download ships already quantized; its F16 dequantization sits on the
source's quantization grid, so the source's own type re-emits it almost for free, and an allocator that
measures error finds those tensors and wins for a reason no user with a bf16 checkpoint will see. Rescaling
channels by random factors moves every searched linear off that grid while the network computes the same
function (up to one F16 rounding):

    per block, factors drawn log-uniform: f = exp(U(-spread, spread)), one per channel
    attention norm:  gamma / s,     attn_q, attn_k, attn_v (or attn_qkv) columns · s
    FFN norm:        gamma / u,     ffn_gate, ffn_up columns · u
    V -> O:          attn_v rows (and bias) / t,  attn_output columns · t[kv head of each query head]
    up -> down:      ffn_up rows / v,             ffn_down columns · v

The norm groups are those of scale folding (`arch.FOLD_ARCHS`); the producer -> consumer pairs come from
`arch.RESCALE_ARCHS`. `token_embd` and `output` have no such rescale: they keep the source's grid (the bench
reports their source type). Pairs of a fused attn_qkv are left alone (V's rows are inside the fused tensor).

With `permute` (issue 23) the residual stream's channels are also permuted (`arch.ResidualStream`): that moves
token_embd and output too, since which values share a quantization block along a row changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.fold.folding import F16_MAX, plan_groups
from ramp_cpp.llama.ggufio import REWRITABLE, TensorRewrite, read_inventory, rewrite_gguf, tensor_types
from ramp_cpp.model.arch import fold_arch, rescale_arch
from ramp_cpp.store.cache import file_sha256

OFFGRID_VERSION = 1
KEY_SEED = "ramp.offgrid.seed"
KEY_SPREAD = "ramp.offgrid.spread"
KEY_VERSION = "ramp.offgrid.version"
KEY_SOURCE = "ramp.offgrid.source"
KEY_PERMUTED = "ramp.offgrid.permuted"


@dataclass(frozen=True)
class OffgridConfig:
    seed: int = 0
    spread: float = 0.3  # |log f| ≤ spread: factors in [0.74, 1.35], far above F16's 1e-3 relative step
    # issue 23: also permute the residual stream's channels (`arch.ResidualStream`), the one change that
    # moves token_embd / output off the source's grid (a rescale cannot: nothing before the embedding or
    # after the head absorbs the factors). Off by default: the earlier bases stay as they were.
    permute: bool = False


@dataclass(frozen=True)
class Permutation:
    """Hidden channel j of the copy is channel `order[j]` of the source: `cols` are taken in that order
    along their input columns, `rows` (writers' rows and biases, 1-D norm weights) along their first axis."""

    order: np.ndarray
    cols: frozenset[str]
    rows: frozenset[str]


@dataclass(frozen=True)
class Scales:
    """What multiplies each tensor: `cols[name]` its input columns, `rows[name]` its output rows (weights and
    biases), `norms[name]` divides a norm weight."""

    cols: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    norms: dict[str, np.ndarray]


def _factors(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    return np.exp(rng.uniform(-spread, spread, n))


def plan_scales(path: str | os.PathLike[str], cfg: OffgridConfig = OffgridConfig()) -> Scales:
    """Draw the factors of every block of the model at `path` (seeded: the same cfg gives the same model)."""
    info = read_inventory(path)
    names = set(tensor_types(path))
    fold_rec, rec = fold_arch(info.arch), rescale_arch(info.arch)
    n_head = info.metadata.get(f"{info.arch}.attention.head_count")
    n_head_kv = info.metadata.get(f"{info.arch}.attention.head_count_kv", n_head)
    if not isinstance(n_head, int) or not isinstance(n_head_kv, int):
        raise RampError(f"{Path(path).name}: per-layer head counts are not supported by the off-grid rescale")
    rng = np.random.default_rng(cfg.seed)
    cols: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}

    def mul(d: dict[str, np.ndarray], name: str, f: np.ndarray) -> None:
        d[name] = d[name] * f if name in d else f

    for g in plan_groups(fold_rec, info.n_blocks, names):
        s = _factors(rng, info.tensor(g.linears[0]).n_per_row, cfg.spread)
        norms[g.norm] = s
        for lin in g.linears:
            mul(cols, lin, s)
    for b in range(info.n_blocks):
        for p in rec.pairs:
            prod, cons = f"blk.{b}.{p.producer}.weight", f"blk.{b}.{p.consumer}.weight"
            if prod not in names or cons not in names:
                continue
            n_rows = info.tensor(prod).n_rows
            t = _factors(rng, n_rows, cfg.spread)
            mul(rows, prod, t)
            bias = f"blk.{b}.{p.producer}.bias"
            if bias in names:
                mul(rows, bias, t)
            n_cols = info.tensor(cons).n_per_row
            if p.per_head:
                head = n_rows // n_head_kv
                if head * n_head_kv != n_rows or head * n_head != n_cols:
                    raise RampError(
                        f"{prod} ({n_rows} rows) and {cons} ({n_cols} columns) do not split into heads"
                    )
                group = n_head // n_head_kv
                kv_of_col = (np.arange(n_cols) // head) // group * head + np.arange(n_cols) % head
                mul(cols, cons, t[kv_of_col])
            else:
                if n_cols != n_rows:
                    raise RampError(f"{prod} has {n_rows} rows but {cons} {n_cols} columns")
                mul(cols, cons, t)
    return Scales(cols, rows, norms)


def plan_permutation(path: str | os.PathLike[str], cfg: OffgridConfig) -> Permutation | None:
    """The residual permutation of the model at `path` (None unless cfg.permute). It has its own generator,
    seeded by (seed, 1), so the rescale's factors are those of the same seed without it."""
    if not cfg.permute:
        return None
    info = read_inventory(path)
    res = rescale_arch(info.arch).residual
    names = set(tensor_types(path))
    n_embd = info.metadata.get(f"{info.arch}.embedding_length")
    if not isinstance(n_embd, int):
        raise RampError(f"{Path(path).name}: no {info.arch}.embedding_length to permute")
    blocks = [f"blk.{b}." for b in range(info.n_blocks)]

    def present(roles: tuple[str, ...], suffixes: tuple[str, ...]) -> frozenset[str]:
        cands = {f"{p}{r}.{x}" for r in roles for x in suffixes for p in ("", *blocks)}
        return frozenset(cands & names)

    order = np.random.default_rng([cfg.seed, 1]).permutation(n_embd)
    return Permutation(
        order, present(res.readers, ("weight",)), present(res.writers, ("weight", "bias"))
        | present(res.norms, ("weight", "bias")),
    )


def _rewrite(
    name: str,
    qt: GGMLQuantizationType,
    col: np.ndarray | None,
    row: np.ndarray | None,
    norm: np.ndarray | None,
    perm_col: np.ndarray | None = None,
    perm_row: np.ndarray | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    def fn(w: np.ndarray) -> np.ndarray:
        out = w.astype(np.float64)
        if norm is not None:
            out = out / norm
        if col is not None:
            out = out * col[None, :]
        if row is not None:
            out = out / (row[:, None] if out.ndim == 2 else row)
        # the permutation last: the factors above are indexed by the source's channels
        if perm_col is not None:
            out = out[:, perm_col]
        if perm_row is not None:
            out = out[perm_row]
        if qt == GGMLQuantizationType.F16 and float(np.abs(out).max()) > F16_MAX:
            raise RampError(f"{name}: a rescaled weight exceeds the F16 range; use a smaller --spread")
        return out.astype(np.float32)

    return fn


def offgrid(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: OffgridConfig = OffgridConfig(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `dst`, the off-grid copy of the float GGUF `src` (types kept), with ramp.offgrid.* metadata."""
    if not cfg.spread > 0:
        raise RampError(f"--spread must be > 0, got {cfg.spread}")
    sc = plan_scales(src, cfg)
    pm = plan_permutation(src, cfg)
    pcols, prows = (pm.cols, pm.rows) if pm else (frozenset(), frozenset())
    types = tensor_types(src)
    rewrites = {}
    for name in sorted({*sc.cols, *sc.rows, *sc.norms, *pcols, *prows}):
        qt = GGMLQuantizationType[types[name][0]]
        if qt not in REWRITABLE:
            raise RampError(
                f"{Path(src).name}: {name} is {qt.name}; the off-grid rescale needs float weights: "
                f"dequantize first (`ramp-cpp quantize {src} --preset F16 --allow-requantize -o M.f16.gguf`)"
            )
        order = pm.order if pm else None
        rewrites[name] = TensorRewrite(
            qt,
            _rewrite(
                name, qt, sc.cols.get(name), sc.rows.get(name), sc.norms.get(name),
                order if name in pcols else None, order if name in prows else None,
            ),
        )
    kv = {
        KEY_SEED: int(cfg.seed),
        KEY_SPREAD: float(cfg.spread),
        KEY_VERSION: OFFGRID_VERSION,
        KEY_SOURCE: f"{Path(src).name} sha256 {file_sha256(src)}",
        **({KEY_PERMUTED: True} if cfg.permute else {}),
    }
    return rewrite_gguf(src, dst, rewrites, kv, force=force, progress=progress)
