"""ctypes binding of the native helper (native/ramp_native.cpp, built by the top-level CMakeLists.txt).

llama_cpp is imported first so that libllama.so is already in the process: the helper then binds to that
very library, the one llama-cpp-python evaluates with.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ramp_cpp.errors import RampError, out_of_space
from ramp_cpp.llama.backend import InputStats, RuntimeOptions, StatsModel, _llama

ABI_VERSION = 2
#: exports added since (ramp_native.cpp's ramp_abi_minor): a library older than this lacks them
ABI_MINOR = 2
_LIB: ctypes.CDLL | None = None


class _TypeEntry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("type", ctypes.c_int32)]


class _ImatrixEntry(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.POINTER(ctypes.c_float)),
        ("size", ctypes.c_size_t),
    ]


def library_path() -> Path:
    env = os.environ.get("RAMP_NATIVE_LIB")
    if env:
        return Path(env)
    return Path(__file__).parents[1] / "lib" / "libramp_native.so"


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    _llama()
    path = library_path()
    if not path.is_file():
        raise RampError(
            f"native helper not built ({path} missing): run `make native` in the ramp-cpp checkout"
        )
    try:
        h = ctypes.CDLL(str(path))
    except OSError as e:
        raise RampError(f"cannot load the native helper {path}: {e} (rebuild with `make native`)") from None
    h.ramp_abi_version.restype = ctypes.c_int32
    minor = getattr(h, "ramp_abi_minor", None)
    if minor is not None:
        minor.restype = ctypes.c_int32
    have = (h.ramp_abi_version(), minor() if minor is not None else 0)
    if have[0] != ABI_VERSION or have[1] < ABI_MINOR:
        raise RampError(
            f"native helper {path} is stale (ABI {have[0]}.{have[1]}, this code needs "
            f"{ABI_VERSION}.{ABI_MINOR}): `make native`"
        )
    h.ramp_quantize_model.restype = ctypes.c_int
    h.ramp_quantize_model.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.POINTER(_TypeEntry),
        ctypes.c_int32,
        ctypes.POINTER(_ImatrixEntry),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    h.ramp_quantize_rows.restype = ctypes.c_size_t
    h.ramp_quantize_rows.argtypes = [
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    h.ramp_row_size.restype = ctypes.c_size_t
    h.ramp_row_size.argtypes = [ctypes.c_int32, ctypes.c_int64]
    h.ramp_stats_new.restype = ctypes.c_void_p
    h.ramp_stats_new.argtypes = []
    for fn in (h.ramp_stats_free, h.ramp_stats_reset):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p]
    h.ramp_stats_count.restype = ctypes.c_int32
    h.ramp_stats_count.argtypes = [ctypes.c_void_p]
    h.ramp_stats_entry.restype = ctypes.c_char_p
    h.ramp_stats_entry.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
    ]
    h.ramp_stats_copy.restype = ctypes.c_int32
    h.ramp_stats_copy.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    h.ramp_stats_error.restype = ctypes.c_char_p
    h.ramp_stats_error.argtypes = [ctypes.c_void_p]
    h.ramp_stats_watch.restype = None
    h.ramp_stats_watch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
    h.ramp_stats_copy_rel.restype = ctypes.c_int32
    h.ramp_stats_copy_rel.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_int64)]
    h.ramp_stats_experts.restype = None
    h.ramp_stats_experts.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    h.ramp_stats_expert_counts.restype = ctypes.c_int64
    h.ramp_stats_expert_counts.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    _LIB = h
    return h


def quantize_model(
    src: str,
    dst: str,
    ftype: int,
    pure: bool,
    type_map: Mapping[str, int],
    imatrix: Mapping[str, np.ndarray] | None,
    n_threads: int,
    allow_requantize: bool,
) -> None:
    """llama_model_quantize(src -> dst) with exact per-tensor types and an optional importance matrix."""
    h = lib()
    names = [n.encode() for n in type_map]
    entries = (_TypeEntry * max(1, len(names)))()
    for i, (n, t) in enumerate(zip(names, type_map.values(), strict=True)):
        entries[i].name = n
        entries[i].type = int(t)
    im_items = list((imatrix or {}).items())
    keep = [(k.encode(), np.ascontiguousarray(v, dtype=np.float32)) for k, v in im_items]
    im = (_ImatrixEntry * max(1, len(keep)))()
    for i, (k, v) in enumerate(keep):
        im[i].name = k
        im[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        im[i].size = v.size
    err = ctypes.create_string_buffer(4096)
    rc = h.ramp_quantize_model(
        src.encode(),
        dst.encode(),
        ftype,
        int(pure),
        entries,
        len(names),
        im,
        len(keep),
        n_threads,
        int(allow_requantize),
        err,
        len(err),
    )
    if rc != 0:
        full = out_of_space(dst)  # llama.cpp reports a failed write as an iostream error
        if full is not None:
            raise full
        msg = " ".join(err.value.decode(errors="replace").split()) or "see RAMP_VERBOSE=1"
        raise RampError(f"llama.cpp quantization of {src} failed: {msg[-400:]}")


def quantize_rows(
    ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None, n_threads: int = 1
) -> bytes:
    """ggml_quantize_chunk over a 2-D float32 array (n_rows, n_per_row): the bytes llama.cpp stores.
    `n_threads` > 1 splits the rows into that many runs quantized at once (rows are independent, and ctypes
    releases the GIL during each call), as llama.cpp's quantizer splits a tensor among its threads."""
    h = lib()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = src.shape
    row_bytes = h.ramp_row_size(ggml_type, n_per_row)
    out = np.empty(row_bytes * n_rows, dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    im_ptr = None if im is None else im.ctypes.data

    def run(span: tuple[int, int]) -> int:
        a, b = span
        return int(h.ramp_quantize_rows(
            ggml_type, src.ctypes.data + a * n_per_row * 4, out.ctypes.data + a * row_bytes, b - a, n_per_row,
            im_ptr,
        ))

    k = max(1, min(n_threads, n_rows))
    cuts = [n_rows * i // k for i in range(k + 1)]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    if len(spans) <= 1:
        n = sum(run(s) for s in spans)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(spans)) as pool:
            n = sum(pool.map(run, spans))
    return out[:n].tobytes()


class ActivationCollector:
    """The native activation-statistics collector: llama.cpp's eval callback accumulates, per weight tensor
    met in a MUL_MAT, max |x| and sum x^2 per input column and the rows seen (ramp_native.cpp); per expert
    for an expert tensor met in a MUL_MAT_ID, with the rows routed to each expert (InputStats.counts).
    `watch`:
    graph-node name prefixes whose own results are accumulated the same way, under the node's name (e.g.
    "l_out-": the residual stream after each block); `residual`: those of them that are the residual stream,
    whose tokens' mean squares ms(h) weight the inputs that follow (`relative`)."""

    def __init__(self, watch: Sequence[str] = (), residual: Sequence[str] = ()) -> None:
        self._h = lib()
        self.handle: int | None = self._h.ramp_stats_new()
        if not self.handle:
            raise RampError("native helper could not allocate an activation collector")
        self._h.ramp_stats_experts(self.handle, 1)
        for prefix in dict.fromkeys([*watch, *residual]):
            self._h.ramp_stats_watch(self.handle, prefix.encode(), int(prefix in residual))

    @property
    def callback_address(self) -> int:
        """Address of ramp_stats_eval_callback, for llama_context_params.cb_eval."""
        addr = ctypes.cast(self._h.ramp_stats_eval_callback, ctypes.c_void_p).value
        assert addr is not None
        return addr

    def reset(self) -> None:
        self._h.ramp_stats_reset(self.handle)

    def error(self) -> str:
        return bytes(self._h.ramp_stats_error(self.handle) or b"").decode(errors="replace")

    def stats(self) -> dict[str, InputStats]:
        """Everything accumulated since the last reset, in the order the graph first met each tensor."""
        h = self._h
        out: dict[str, InputStats] = {}
        width, rows = ctypes.c_int64(), ctypes.c_int64()
        for i in range(h.ramp_stats_count(self.handle)):
            name = h.ramp_stats_entry(self.handle, i, ctypes.byref(width), ctypes.byref(rows))
            shape, counts = self._shape(i, width.value)
            mx = np.empty(shape, dtype=np.float32)
            sq = np.empty(shape, dtype=np.float64)
            if name is None or h.ramp_stats_copy(self.handle, i, mx.ctypes.data, sq.ctypes.data) != 0:
                raise RampError(f"native activation collector lost entry {i}")
            out[name.decode()] = InputStats(max_abs=mx, sum_sq=sq, count=int(rows.value), counts=counts)
        return out

    def _shape(self, i: int, width: int) -> tuple[tuple[int, ...], np.ndarray | None]:
        """Entry i's array shape, (width,) or (n_expert, width), and its per-expert counts (None: 2-D)."""
        n = int(self._h.ramp_stats_expert_counts(self.handle, i, None))
        if n < 0:
            raise RampError(f"native activation collector lost entry {i}")
        if n == 0:
            return (width,), None
        counts = np.empty(n, dtype=np.int64)
        self._h.ramp_stats_expert_counts(self.handle, i, counts.ctypes.data)
        return (n, width), counts

    def relative(self) -> dict[str, tuple[np.ndarray, int]]:
        """Per entry, Σ_t x_tj² / ms(h_t) over the rows met after a residual node of the same tokens (h_t that
        token's row of the residual stream, ms its mean square), and how many rows that is ((n_expert,
        width) for an expert tensor, each expert's row over the rows routed to it; the count is tokens)."""
        h = self._h
        out: dict[str, tuple[np.ndarray, int]] = {}
        width, rows = ctypes.c_int64(), ctypes.c_int64()
        for i in range(h.ramp_stats_count(self.handle)):
            name = h.ramp_stats_entry(self.handle, i, ctypes.byref(width), ctypes.byref(rows))
            rel = np.empty(self._shape(i, width.value)[0], dtype=np.float64)
            n = ctypes.c_int64()
            if name is None or h.ramp_stats_copy_rel(self.handle, i, rel.ctypes.data, ctypes.byref(n)) != 0:
                raise RampError(f"native activation collector lost entry {i}")
            out[name.decode()] = (rel, int(n.value))
        return out

    def close(self) -> None:
        if self.handle:
            self._h.ramp_stats_free(self.handle)
            self.handle = None


def stats_model(
    path: str | os.PathLike[str],
    opts: RuntimeOptions = RuntimeOptions(),
    piece: int = StatsModel.PIECE,
    watch: Sequence[str] = (),
    residual: Sequence[str] = (),
) -> StatsModel:
    """A GGUF loaded with the native activation collector on llama.cpp's eval callback (StatsModel)."""
    return StatsModel(path, ActivationCollector(watch, residual), opts, piece)
