"""Padding an F16 model with zero channels so that every row length is a multiple of 256, function-preserving.

llama.cpp's K-quants quantize a row in super-blocks of 256; a row of 576 or 896 values cannot use them, so
its presets fall back to legacy types (a "Q3_K_M" of a 576-wide model holds no Q3_K). Padding makes the
presets the K-quant mixes users get on real models while the network computes the same function:

    hidden n_embd -> E' (a multiple of 256):  zero columns in every reader of the residual stream
        (token_embd, output, q/k/v, gate/up), zero rows in its writers (attn_output, ffn_down); the stream's
        extra channels stay 0. RMSNorm's mean of squares then runs over E' channels, so every norm weight
        is multiplied by sqrt(E / E') and rms_norm_eps by E / E': rms' = sqrt(E/E') · rms, exactly.
    query heads n_head -> H' (n_head_kv divides H'; H' · head_dim a multiple of 256): zero heads at the end
        of each GQA group, so each original head keeps its kv head; a zero head's q is 0, its attention
        output meets zero columns of attn_output.
    FFN n_ff -> F' (a multiple of 256): zero rows in gate/up (SiLU(0) · 0 = 0), zero columns in down.

Where the zero channels go: at the tail of each 256-block, the same number (±1) in every block, so no block is
mostly padding and a block's real values stay together in its leading 32-value sub-blocks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import REWRITABLE, OutTensor, derive_gguf, open_reader, read_inventory
from ramp_cpp.model.arch import RESCALE_ARCHS, ResidualStream
from ramp_cpp.store.cache import file_sha256

PAD_VERSION = 1
KEY_MULTIPLE = "ramp.pad.multiple"
KEY_VERSION = "ramp.pad.version"
KEY_SOURCE = "ramp.pad.source"


@dataclass(frozen=True)
class HParamKeys:
    """Suffixes of the `<arch>.*` metadata keys padding reads and writes (llama.cpp's LLM_KV names)."""

    n_embd: str = "embedding_length"
    n_ff: str = "feed_forward_length"
    n_head: str = "attention.head_count"
    n_head_kv: str = "attention.head_count_kv"
    rms_eps: str = "attention.layer_norm_rms_epsilon"
    key_length: str = "attention.key_length"
    value_length: str = "attention.value_length"


KEYS = HParamKeys()


@dataclass(frozen=True)
class PadArch:
    """How one llama.cpp architecture's tensors meet the padded dimensions. `residual`: the tensors over the
    residual stream (arch.ResidualStream); `query`: rows per query head (and its bias); `heads_out`: columns
    per query head; `ffn_in` rows and `ffn_out` columns per FFN channel; `unchanged`: tensors that see none of
    the padded dimensions. `q_is_embd`: llama.cpp's loader makes attn_q n_embd x n_embd (so H' · head_dim
    must be E')."""

    arch: str
    residual: ResidualStream
    query: str = "attn_q"
    heads_out: str = "attn_output"
    ffn_in: tuple[str, ...] = ("ffn_gate", "ffn_up")
    ffn_out: str = "ffn_down"
    unchanged: tuple[str, ...] = ("attn_k.bias", "attn_v.bias", "output.bias", "rope_freqs.weight")
    q_is_embd: bool = False
    source: str = ""


PAD_ARCHS: dict[str, PadArch] = {
    a.arch: a
    for a in (
        # attn_q is {n_embd, n_embd_head_k * n_head}: n_embd_head_k defaults to n_embd / n_head, so a q width
        # other than E' is written as attention.key_length / value_length
        PadArch("llama", RESCALE_ARCHS["llama"].residual, source="src/models/llama.cpp"),
        PadArch("qwen2", RESCALE_ARCHS["qwen2"].residual, q_is_embd=True, source="src/models/qwen2.cpp"),
    )
}


@dataclass(frozen=True)
class PadConfig:
    multiple: int = 256  # QK_K: the K-quants' super-block


@dataclass(frozen=True)
class Dim:
    """One padded dimension: `pos[i]` is where the source's channel i goes among `size`."""

    pos: np.ndarray
    size: int


@dataclass(frozen=True)
class PadPlan:
    """Where the source's channels go in the padded model, and its new hyperparameters."""

    residual: Dim
    query: Dim  # query-head channels: head h, dim d at h · head_dim + d
    ffn: Dim
    norm_scale: float  # sqrt(E / E')
    set_kv: dict[str, object]


def spread(n: int, n_to: int, block: int) -> np.ndarray:
    """Positions of n real channels among n_to (a multiple of `block`): each block ends with its share of the
    n_to - n zero channels, the shares differing by at most one."""
    nb = n_to // block
    z = n_to - n
    share = [z // nb + (1 if b < z % nb else 0) for b in range(nb)]
    return np.concatenate([b * block + np.arange(block - s) for b, s in enumerate(share)])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _int_key(meta: dict[str, object], key: str, name: str) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RampError(f"{name}: {key} is {v!r}; padding needs one integer (not per-layer values)")
    return v


def plan_pad(path: str | os.PathLike[str], cfg: PadConfig = PadConfig()) -> PadPlan:
    """The padding of the model at `path`, or one RampError line for a model it cannot pad."""
    info = read_inventory(path)
    name = Path(path).name
    rec = PAD_ARCHS.get(info.arch)
    if rec is None:
        raise RampError(f"{name}: padding supports {', '.join(PAD_ARCHS)}; this model is {info.arch!r}")
    m = cfg.multiple
    if m <= 0 or m % 32:
        raise RampError(f"--multiple must be a positive multiple of 32, got {m}")
    a, meta = info.arch, info.metadata
    e = _int_key(meta, f"{a}.{KEYS.n_embd}", name)
    f = _int_key(meta, f"{a}.{KEYS.n_ff}", name)
    h = _int_key(meta, f"{a}.{KEYS.n_head}", name)
    hkv = _int_key(meta, f"{a}.{KEYS.n_head_kv}", name) if f"{a}.{KEYS.n_head_kv}" in meta else h
    hd = meta.get(f"{a}.{KEYS.key_length}", e // h)
    if meta.get(f"{a}.{KEYS.value_length}", hd) != hd or not isinstance(hd, int) or h % hkv:
        raise RampError(f"{name}: padding needs one head size for keys and values and n_head_kv | n_head")
    eps = meta.get(f"{a}.{KEYS.rms_eps}")
    if not isinstance(eps, float):
        raise RampError(f"{name}: no {a}.{KEYS.rms_eps}: padding keeps RMSNorm exact only through its eps")
    e2, f2 = _round_up(e, m), _round_up(f, m)
    h2 = next((x for x in range(h, h + m * hkv + 1) if x % hkv == 0 and (x * hd) % m == 0), 0)
    if not h2:
        raise RampError(f"{name}: no count of {hd}-wide heads in groups of {hkv} is a multiple of {m} wide")
    if rec.q_is_embd and h2 * hd != e2:
        raise RampError(
            f"{name}: {a} needs n_head · head_dim = n_embd; {h2} heads of {hd} (the fewest in groups of "
            f"{hkv} whose width is a multiple of {m}) are not {e2} wide"
        )
    if (e2, f2, h2) == (e, f, h):
        raise RampError(f"{name}: every row length is already a multiple of {m}: nothing to pad")
    g, g2 = h // hkv, h2 // hkv
    head_pos = np.array([(i // g) * g2 + i % g for i in range(h)])
    set_kv: dict[str, object] = {
        f"{a}.{KEYS.n_embd}": e2,
        f"{a}.{KEYS.n_ff}": f2,
        f"{a}.{KEYS.n_head}": h2,
        f"{a}.{KEYS.rms_eps}": float(eps * e / e2),
    }
    if h2 * hd != e2 or f"{a}.{KEYS.key_length}" in meta:
        set_kv |= {f"{a}.{KEYS.key_length}": hd, f"{a}.{KEYS.value_length}": hd}
    return PadPlan(
        residual=Dim(spread(e, e2, m), e2),
        query=Dim((head_pos[:, None] * hd + np.arange(hd)).reshape(-1), h2 * hd),
        ffn=Dim(spread(f, f2, m), f2),
        norm_scale=math.sqrt(e / e2),
        set_kv=set_kv,
    )


@dataclass(frozen=True)
class _Axes:
    """How a tensor's rows and columns are padded (None: that axis is kept), and the factor of a norm."""

    rows: Dim | None
    cols: Dim | None
    scale: float = 1.0

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = (self.rows, self.cols)[: len(shape)]
        return tuple(n if d is None else d.size for d, n in zip(dims, shape, strict=True))


def _axes(rec: PadArch, plan: PadPlan, tensor: str) -> _Axes | None:
    """How `tensor` (a full GGUF name) is padded, None when it is unchanged; one RampError for a tensor the
    record does not know."""
    parts = tensor.split(".")
    role, kind = (parts[2], parts[3]) if parts[0] == "blk" else (parts[0], parts[-1])
    if f"{role}.{kind}" in rec.unchanged:
        return None
    res = rec.residual
    r, q, ff = plan.residual, plan.query, plan.ffn
    if role in res.norms:
        return _Axes(r, None, plan.norm_scale)
    if kind == "bias":
        rows = {rec.query: q, rec.heads_out: r, rec.ffn_out: r, **dict.fromkeys(rec.ffn_in, ff)}.get(role)
        if rows is None:
            raise RampError(f"padding does not know the bias {tensor}")
        return _Axes(rows, None)
    by_role = {rec.query: _Axes(q, r), rec.heads_out: _Axes(r, q), rec.ffn_out: _Axes(r, ff),
               **dict.fromkeys(rec.ffn_in, _Axes(ff, r))}
    if role in by_role:
        return by_role[role]
    if role in res.readers and role != "attn_qkv":
        return _Axes(None, r)
    raise RampError(f"padding does not know {tensor} ({rec.arch}): a fused or unknown tensor")


Maker = Callable[[Callable[[str], np.ndarray]], np.ndarray]


def _padded(name: str, ax: _Axes, shape: tuple[int, ...]) -> Maker:
    def make(get: Callable[[str], np.ndarray]) -> np.ndarray:
        w = get(name).astype(np.float64) * ax.scale
        idx = tuple(
            np.arange(n) if d is None else d.pos for d, n in zip((ax.rows, ax.cols), w.shape, strict=False)
        )
        out = np.zeros(shape)
        out[np.ix_(*idx)] = w
        return out.astype(np.float32)

    return make


def pad(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: PadConfig = PadConfig(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `dst`, the float GGUF `src` with every padded row length a multiple of cfg.multiple (types kept),
    with ramp.pad.* metadata."""
    plan = plan_pad(src, cfg)
    rec = PAD_ARCHS[read_inventory(src).arch]
    out = []
    for t in open_reader(src, tokenizer=False).tensors:  # shapes and types; derive_gguf copies the rest
        ax = _axes(rec, plan, t.name)
        if ax is None:
            out.append(OutTensor(t.name))
            continue
        qt = GGMLQuantizationType(int(t.tensor_type))
        if qt not in REWRITABLE:
            raise RampError(
                f"{Path(src).name}: {t.name} is {qt.name}; padding needs float weights: dequantize first "
                f"(`ramp-cpp quantize {src} --preset F16 --allow-requantize -o M.f16.gguf`)"
            )
        new = ax.shape(tuple(int(x) for x in reversed(t.shape)))
        out.append(OutTensor(t.name, _padded(t.name, ax, new), qt, new))
    kv = {
        **plan.set_kv,
        KEY_MULTIPLE: cfg.multiple,
        KEY_VERSION: PAD_VERSION,
        KEY_SOURCE: f"{Path(src).name} sha256 {file_sha256(src)}",
    }
    return derive_gguf(src, dst, out, kv, force=force, progress=progress)
