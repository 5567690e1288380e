"""Quantize stage: an exact per-tensor type map (or a llama.cpp preset) -> a GGUF written by llama.cpp.

The map is completed over every quantizable tensor before the call, so llama.cpp's mixture rules never
touch a tensor we did not name; the written file is then read back and checked against the prediction
of `ladder.written_type`, which makes byte accounting a tested fact rather than an estimate.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError
from ramp_cpp.llama import native
from ramp_cpp.llama.ggufio import ModelInfo, read_inventory, tensor_types
from ramp_cpp.model.arch import quantizable
from ramp_cpp.model.ladder import needs_imatrix, tensor_nbytes, type_from_name, written_type
from ramp_cpp.store.atomic import atomic_path

T = GGMLQuantizationType
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

Progress = Callable[[str], None]


def _qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType.__members__[name]


@functools.lru_cache(maxsize=1)
def _ftypes() -> dict[str, int]:
    """llama.cpp's file types by name (Q4_K_M, Q8_0, F16, ...), read from llama_cpp's constants."""
    from ramp_cpp.llama.backend import _llama

    lc = _llama()
    prefix = "LLAMA_FTYPE_MOSTLY_"
    out = {k[len(prefix) :]: int(getattr(lc, k)) for k in dir(lc) if k.startswith(prefix)}
    out["F32"] = int(lc.LLAMA_FTYPE_ALL_F32)
    return out


def presets() -> list[str]:
    return sorted(_ftypes())


#: The llama.cpp file type whose default tensor type is each ggml type (llama_ftype_get_default_type):
#: used only to label a mixed file by its dominant type.
_FTYPE_OF_TYPE: dict[GGMLQuantizationType, str] = {
    T.Q4_0: "Q4_0",
    T.Q4_1: "Q4_1",
    T.Q5_0: "Q5_0",
    T.Q5_1: "Q5_1",
    T.Q8_0: "Q8_0",
    T.Q2_K: "Q2_K",
    T.Q3_K: "Q3_K_M",
    T.Q4_K: "Q4_K_M",
    T.Q5_K: "Q5_K_M",
    T.Q6_K: "Q6_K",
    T.IQ4_NL: "IQ4_NL",
    T.IQ4_XS: "IQ4_XS",
}


@dataclass(frozen=True)
class TensorResult:
    name: str
    ggml_type: str
    nbytes: int
    n_params: int


@dataclass(frozen=True)
class QuantizeResult:
    path: str
    tensors: tuple[TensorResult, ...]  # every tensor of the written file
    file_size: int
    bpw_searched: float  # bits per weight over the searched (blk.N linear) tensors
    bpw_file: float  # file bytes * 8 / all parameters
    n_fallback: int  # tensors whose requested type llama.cpp replaced for the row length


def complete_map(
    info: ModelInfo, requested: Mapping[str, str | GGMLQuantizationType], base: GGMLQuantizationType
) -> dict[str, GGMLQuantizationType]:
    """Every quantizable tensor -> the type asked for (requested, else `base`). Unknown names are refused."""
    names = {t.name for t in info.tensors}
    out: dict[str, GGMLQuantizationType] = {}
    for name, t in requested.items():
        if name not in names:
            raise RampError(f"type map names {name!r}, which is not a weight tensor of {info.path}")
        if not quantizable(name, 2, info.arch):
            raise RampError(f"type map names {name!r}, which llama.cpp never quantizes")
        out[name] = t if isinstance(t, GGMLQuantizationType) else type_from_name(t)
    for ti in info.tensors:
        if quantizable(ti.name, 2, info.arch) and ti.name not in out:
            out[ti.name] = base
    return out


def predict(info: ModelInfo, full_map: Mapping[str, GGMLQuantizationType]) -> dict[str, tuple[str, int]]:
    """name -> (type llama.cpp will write, bytes) for every weight tensor (2-D, and 3-D experts: one type for
    all their slices), with row-length fallbacks."""
    out = {}
    for t in info.tensors:
        wt = written_type(full_map[t.name], t.n_per_row) if t.name in full_map else _qtype(t.ggml_type)
        out[t.name] = (wt.name, tensor_nbytes(wt, t.n_params))
    return out


def predicted_data_bytes(info: ModelInfo, full_map: Mapping[str, GGMLQuantizationType]) -> int:
    """Bytes of all tensor data the written file will hold (alignment padding and header excluded)."""
    return sum(nbytes for _, nbytes in predict(info, full_map).values()) + info.other_bytes


def check_imatrix(expected: Mapping[str, tuple[str, int]], imatrix: Mapping[str, np.ndarray] | None) -> None:
    """`expected`: tensor -> (written type, bytes) of the tensors a map names (`predict`).
    Refuse, before llama.cpp runs, a map whose written types need an importance matrix it lacks
    (`ladder.needs_imatrix`: llama.cpp would stop with a log message, or ggml abort the process)."""
    have = imatrix or {}
    lacking = [(n, t) for n, (t, _) in expected.items() if needs_imatrix(_qtype(t)) and n not in have]
    if lacking:
        name, t = lacking[0]
        what = "the importance matrix has no entry for it" if have else "none was given"
        raise RampError(
            f"{name} would be written as {t}, which llama.cpp writes only with an importance matrix; "
            f"{what} ({len(lacking)} tensors need one)"
        )


def check_source(
    info: ModelInfo, allow_requantize: bool = False, hint: str = ", or pass --allow-requantize"
) -> None:
    """Refuse an already-quantized model (llama.cpp would requantize it, compounding the error)."""
    if allow_requantize:
        return
    quantized = [t.name for t in info.tensors if _qtype(t.ggml_type) not in FLOAT_TYPES]
    if quantized:
        raise RampError(
            f"{info.path} is already quantized ({len(quantized)} tensors, e.g. {quantized[0]} is "
            f"{info.tensor(quantized[0]).ggml_type}): quantize from F16/F32{hint}"
        )


def _result(
    info: ModelInfo, path: Path, written: Mapping[str, tuple[str, int, int]], n_fallback: int
) -> QuantizeResult:
    searched = {t.name for t in info.searched}
    rows = [TensorResult(name, *row) for name, row in written.items()]
    s_bytes = sum(r.nbytes for r in rows if r.name in searched)
    s_params = sum(r.n_params for r in rows if r.name in searched)
    size = path.stat().st_size
    return QuantizeResult(
        path=str(path),
        tensors=tuple(rows),
        file_size=size,
        bpw_searched=8.0 * s_bytes / max(1, s_params),
        bpw_file=8.0 * size / max(1, info.n_params_total),
        n_fallback=n_fallback,
    )


@dataclass(frozen=True)
class QuantizeOptions:
    imatrix: Mapping[str, np.ndarray] | None = None  # tensor name -> mean x^2 per input column
    n_threads: int | None = None  # None: all cores
    force: bool = False  # overwrite an existing output
    allow_requantize: bool = False  # accept an already-quantized input


def _run(
    info: ModelInfo,
    dst: str | os.PathLike[str],
    ftype: int,
    full_map: Mapping[str, GGMLQuantizationType],
    opts: QuantizeOptions,
    progress: Progress | None,
    what: str,
) -> QuantizeResult:
    """One llama_model_quantize call into a temp file; the checks on it; rename on success."""
    check_source(info, opts.allow_requantize)
    expected = predict(info, full_map) if full_map else {}
    check_imatrix({n: expected[n] for n in full_map}, opts.imatrix)
    with atomic_path(dst, opts.force) as tmp:
        if progress:
            progress(f"llama.cpp quantizing: {what}")
        native.quantize_model(
            info.path,
            str(tmp),
            ftype,
            bool(full_map),
            {k: int(v) for k, v in full_map.items()},
            opts.imatrix,
            opts.n_threads or os.cpu_count() or 1,
            opts.allow_requantize,
        )
        COUNTERS.quant_passes += 1
        written = tensor_types(tmp)
        wrong = [(n, written[n][0], want) for n, (want, _) in expected.items() if written[n][0] != want]
        if wrong:
            n, got, want = wrong[0]
            raise RampError(f"llama.cpp wrote {n} as {got}, predicted {want} ({len(wrong)} mismatches)")
        n_fallback = sum(1 for n, t in full_map.items() if expected[n][0] != t.name)
        result = _result(info, tmp, written, n_fallback)
    return _renamed(result, dst)


def quantize_map(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    types: Mapping[str, str | GGMLQuantizationType],
    base: GGMLQuantizationType | str = T.Q8_0,
    opts: QuantizeOptions = QuantizeOptions(),
    progress: Progress | None = None,
    info: ModelInfo | None = None,
) -> QuantizeResult:
    """Quantize `src` so every tensor named in `types` gets exactly that type (after llama.cpp's
    row-length fallback) and every other quantizable tensor gets `base`. `info`: `src`'s inventory when the
    caller has it."""
    info = info or read_inventory(src)
    full = complete_map(info, types, base if isinstance(base, GGMLQuantizationType) else type_from_name(base))
    return _run(info, dst, file_type_for(full), full, opts, progress, f"{len(full)} tensors by map")


def ftype_label(full: Mapping[str, GGMLQuantizationType]) -> str:
    """The name of `file_type_for(full)` (Q4_K_M, Q8_0, ...), as llama-quantize's command line takes it."""
    code = file_type_for(full)
    return next(k for k, v in sorted(_ftypes().items()) if v == code)


def file_type_for(full: Mapping[str, GGMLQuantizationType]) -> int:
    """general.file_type of a map's output: the llama.cpp file type of its most common quantized type
    (first met wins a tie), Q8_0 when there is none. Every tensor is matched by the map, so the file type
    only labels the file; it must be a quantized one for llama.cpp to consult the overrides at all."""
    counts = Counter(t for t in full.values() if t not in FLOAT_TYPES)
    label = _FTYPE_OF_TYPE.get(counts.most_common(1)[0][0], "Q8_0") if counts else "Q8_0"
    ftypes = _ftypes()
    return ftypes.get(label, ftypes["Q8_0"])


def quantize_preset(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    preset: str,
    opts: QuantizeOptions = QuantizeOptions(),
    progress: Progress | None = None,
    info: ModelInfo | None = None,
) -> QuantizeResult:
    """Quantize with llama.cpp's own rules for a file type (Q4_K_M, Q8_0, F16, ...)."""
    ftypes = _ftypes()
    key = preset.strip().upper()
    if key not in ftypes:
        raise RampError(f"unknown preset {preset!r} (known: {', '.join(sorted(ftypes))})")
    return _run(info or read_inventory(src), dst, ftypes[key], {}, opts, progress, key)


def _renamed(r: QuantizeResult, dst: str | os.PathLike[str]) -> QuantizeResult:
    return QuantizeResult(str(dst), r.tensors, r.file_size, r.bpw_searched, r.bpw_file, r.n_fallback)
