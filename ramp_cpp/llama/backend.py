"""The one module that talks to llama.cpp through llama-cpp-python's ctypes API (in process).

Everything measured here runs the kernels a deployed GGUF runs: the same libllama.so the native helper
links, with its CPU, CUDA or Metal backend as llama-cpp-python was built.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np

from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError


@dataclass
class InputStats:
    """Statistics of the input x of one weight tensor, per input column (ggml ne[0]).

    An expert tensor (a 3-D weight of n_expert slices, met in MUL_MAT_ID) has them per expert: `max_abs` and
    `sum_sq` are (n_expert, n_in), row e over the rows routed to expert e, and `counts[e]` is how many rows
    that is (llama-imatrix's per-expert counts); `count` stays the tokens seen, each routed to top-k experts,
    so counts.sum() = k * count."""

    max_abs: np.ndarray  # float32 (n_in,), or (n_expert, n_in) for an expert tensor
    sum_sq: np.ndarray  # float64, max_abs's shape
    count: int  # rows (tokens) accumulated
    counts: np.ndarray | None = None  # int64 (n_expert,): rows routed to each expert; None for a 2-D weight

    @property
    def n_expert(self) -> int:
        """Experts of an expert tensor's statistics, 0 for a 2-D weight's."""
        return 0 if self.counts is None else int(self.counts.shape[0])

    @property
    def mean_sq(self) -> np.ndarray:
        """E[x^2] per column: what llama.cpp's quantizer takes as the importance matrix. Per expert for an
        expert tensor, over the rows routed to it; an expert no row reached gets ones, as llama-quantize
        reads a llama-imatrix file (tools/quantize/quantize.cpp, load_imatrix)."""
        if self.counts is None:
            return (self.sum_sq / max(self.count, 1)).astype(np.float32)
        c = self.counts.astype(np.float64)[:, None]
        return np.where(c > 0, self.sum_sq / np.maximum(c, 1.0), 1.0).astype(np.float32)

    def pooled(self) -> InputStats:
        """An expert tensor's statistics over all the rows routed to any expert (max over experts, sums
        added, rows = counts.sum()); a 2-D weight's unchanged."""
        if self.counts is None:
            return self
        return InputStats(self.max_abs.max(axis=0), self.sum_sq.sum(axis=0), int(self.counts.sum()))


class Collector(Protocol):
    """What StatsModel needs of an activation collector (native.ActivationCollector). It is passed in, so
    this module, the only one talking to llama_cpp, never imports the native binding (which imports it)."""

    handle: Any

    @property
    def callback_address(self) -> int: ...
    def reset(self) -> None: ...
    def error(self) -> str: ...
    def stats(self) -> dict[str, InputStats]: ...
    def close(self) -> None: ...

_BACKEND_READY = False
_LOG_CALLBACK: Any = None  # the ctypes callback llama.cpp holds a pointer to: kept alive here
_M = TypeVar("_M", bound="LlamaModel")


def verbose() -> bool:
    return os.environ.get("RAMP_VERBOSE", "") not in ("", "0")


def _route_log(llama_cpp: Any) -> None:
    """llama.cpp's log (ggml's too: llama_log_set sets both) reaches stderr only with RAMP_VERBOSE=1.
    llama-cpp-python's own callback filters by a table of levels older than ggml's DEBUG level (its ERROR is
    ggml's WARN), so at any verbosity it printed llama.cpp's warnings: the vocabulary loader's `load:` lines
    on every model loaded. The native helper swaps in its own callback around a quantization and restores
    this one."""
    global _LOG_CALLBACK
    loud = verbose()

    def emit(level: int, text: bytes, user_data: Any) -> None:
        if loud:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _LOG_CALLBACK = llama_cpp.llama_log_callback(emit)
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _llama() -> Any:
    """Import llama_cpp lazily (it loads libllama.so) and initialise the backend once."""
    global _BACKEND_READY
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError from a broken libllama.so
        raise RampError(f"llama-cpp-python is not usable: {e}") from None
    if not _BACKEND_READY:
        _route_log(llama_cpp)
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def llama_lib_dir() -> Path:
    """Directory holding the libllama.so that llama_cpp loads (the native helper links the same one)."""
    llama_cpp = _llama()
    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:  # not Linux: no AMX build of llama.cpp to avoid
        return False


def repack_weights() -> bool:
    """Whether llama.cpp may put weights in its extra buffer types (runtime repacking: AMX on Xeons from
    Sapphire Rapids on, the AVX2/NEON Q4_0 and IQ4_NL layouts elsewhere). Off on a CPU with AMX unless
    RAMP_REPACK=1: llama.cpp's AMX matrix multiply segfaults on some tensor shapes (llama.cpp issue 20824,
    open; this project's test models crash in it), and with F16 weights its buffer is a second, anonymous
    copy of the model besides the mapped file. RAMP_REPACK=0 turns repacking off everywhere."""
    env = os.environ.get("RAMP_REPACK", "")
    return env != "0" if env else not _cpu_has_amx()


@dataclass(frozen=True)
class RuntimeOptions:
    """How llama.cpp runs: context per chunk, CPU threads, layers offloaded to a GPU build."""

    n_ctx: int = 512  # llama-perplexity's default chunk length
    n_threads: int | None = None  # None: all cores
    n_gpu_layers: int = 0  # >0 needs a CUDA/Metal build of llama-cpp-python


class LlamaModel:
    """A GGUF loaded for scoring: tokenize text, run one chunk, read its logits."""

    def __init__(self, path: str | os.PathLike[str], opts: RuntimeOptions = RuntimeOptions()) -> None:
        lc = _llama()
        self._lc = lc
        self.path = str(path)
        self.opts = opts
        if not Path(path).is_file():
            raise RampError(f"{path}: no such file")
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        mparams.use_extra_bufts = repack_weights()
        self._model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise RampError(
                f"{path}: llama.cpp could not load this model (run with RAMP_VERBOSE=1 for its log)"
            )
        self._held: np.ndarray | None = None  # the tokens whose KV cache logits_reusing may keep
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        cparams = self._context_params()
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            self._model = None
            raise RampError(f"{path}: llama.cpp could not create a context of {opts.n_ctx} tokens")
        n = int(cparams.n_batch)
        self._batch = lc.llama_batch_init(n, 0, 1)
        self._tok = np.ctypeslib.as_array(self._batch.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n,))
        self._nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(n,))
        for i in range(n):
            self._batch.seq_id[i][0] = 0
        self._nseq[:] = 1
        self._pos[:] = np.arange(n, dtype=self._pos.dtype)

    def _context_params(self) -> Any:
        """llama_context_params: one sequence of n_ctx tokens decoded as one batch."""
        cparams = self._lc.llama_context_default_params()
        cparams.n_ctx = self.opts.n_ctx
        cparams.n_batch = self.opts.n_ctx
        cparams.n_ubatch = min(self.opts.n_ctx, 512)
        cparams.n_seq_max = 1
        threads = self.opts.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        return cparams

    # -- tokens -------------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return int(self._lc.llama_vocab_bos(self._vocab))

    @property
    def eos(self) -> int:
        return int(self._lc.llama_vocab_eos(self._vocab))

    @property
    def has_bos(self) -> bool:
        return self.bos != self._lc.LLAMA_TOKEN_NULL

    @property
    def add_bos(self) -> bool:
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ctypes.c_int32 * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            raise RampError("llama.cpp failed to tokenize the text")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    # -- forward ------------------------------------------------------------------------------------
    def logits(self, tokens: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Run `tokens` as a fresh sequence; return the logits of positions start..stop-1, shape
        (stop - start, n_vocab), float32: a view of llama.cpp's output buffer, which the next call overwrites
        and `close` frees (copy what must outlive either)."""
        n = len(tokens)
        if n > self.opts.n_ctx:
            raise RampError(f"chunk of {n} tokens exceeds the context of {self.opts.n_ctx}")
        lc = self._lc
        self._held = None
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        return self._decode(tokens, 0, start, stop)

    def logits_reusing(self, tokens: np.ndarray, start: int, stop: int) -> np.ndarray:
        """As `logits`, but the KV cache of the longest prefix (up to `start`) shared with the previous call
        of this method is kept and only the rest is decoded: the choices of a multiple-choice question share
        their context, which is then decoded once."""
        n = len(tokens)
        if n > self.opts.n_ctx:
            raise RampError(f"sequence of {n} tokens exceeds the context of {self.opts.n_ctx}")
        lc = self._lc
        keep = 0
        if self._held is not None:
            m = min(len(self._held), start)  # rows start.. are read back, so they must be decoded now
            diff = np.flatnonzero(self._held[:m] != tokens[:m])
            keep = int(diff[0]) if len(diff) else m
        self._held = None  # until this decode succeeds
        mem = lc.llama_get_memory(self._ctx)
        # seq_rm refuses partial removal on some caches (sliding-window, recurrent): decode all then
        if keep == 0 or not lc.llama_memory_seq_rm(mem, 0, keep, -1):
            lc.llama_memory_clear(mem, True)
            keep = 0
        out = self._decode(tokens, keep, start, stop)
        self._held = np.array(tokens, dtype=np.int32)
        return out

    def _decode(self, tokens: np.ndarray, keep: int, start: int, stop: int) -> np.ndarray:
        """Decode tokens[keep:] at positions keep.. onto a cache holding the first `keep`; return the logits
        of positions start..stop-1."""
        lc = self._lc
        m = len(tokens) - keep
        self._tok[:m] = tokens[keep:]
        self._pos[:m] = np.arange(keep, len(tokens), dtype=self._pos.dtype)
        self._want[:m] = 0
        self._want[start - keep : stop - keep] = 1
        self._batch.n_tokens = m
        rc = lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RampError(f"llama_decode failed with code {rc}")
        COUNTERS.tokens += m
        ptr = lc.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(stop - start, self.n_vocab))

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        lc = self._lc
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class StatsModel(LlamaModel):
    """A GGUF loaded with llama.cpp's eval callback pointed at the native activation collector: every
    decoded token adds its matmul inputs to per-tensor statistics (native.ActivationCollector).

    A window of n_ctx tokens is decoded as consecutive pieces of at most `piece` tokens with the KV cache
    kept between them, so attention sees the whole window while llama.cpp's logits buffer stays
    piece x n_vocab floats (a 2048-token window at a 262k vocabulary would need 2 GB at once). Logits are
    requested for every position because the last block otherwise drops the rows whose outputs are not
    wanted (inp_out_ids) before its FFN, and the statistics would count fewer tokens there.
    """

    PIECE = 512  # llama-imatrix / llama-perplexity's default batch

    def __init__(
        self,
        path: str | os.PathLike[str],
        collector: Collector,
        opts: RuntimeOptions = RuntimeOptions(),
        piece: int = PIECE,
    ) -> None:
        """`collector`: a fresh native.ActivationCollector (`native.stats_model` makes both); closed with
        the model."""
        if piece < 1:
            collector.close()
            raise RampError(f"piece must be >= 1, got {piece}")
        self.piece = min(piece, opts.n_ctx)
        self.collector: Collector | None = collector
        super().__init__(path, opts)

    def _context_params(self) -> Any:
        cparams = super()._context_params()
        cparams.n_batch = self.piece
        cparams.n_ubatch = self.piece
        assert self.collector is not None
        cparams.cb_eval = self._lc.ggml_backend_sched_eval_callback(self.collector.callback_address)
        cparams.cb_eval_user_data = self.collector.handle
        return cparams

    def run(self, tokens: np.ndarray) -> None:
        """Decode `tokens` as one fresh sequence, adding to the statistics."""
        n = len(tokens)
        if n > self.opts.n_ctx:
            raise RampError(f"window of {n} tokens exceeds the context of {self.opts.n_ctx}")
        lc = self._lc
        self._held = None
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        for start in range(0, n, self.piece):
            m = min(self.piece, n - start)
            self._tok[:m] = tokens[start : start + m]
            self._pos[:m] = np.arange(start, start + m, dtype=self._pos.dtype)
            self._want[:m] = 1
            self._batch.n_tokens = m
            rc = lc.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise RampError(f"llama_decode failed with code {rc}")
            COUNTERS.tokens += m

    def reset(self) -> None:
        assert self.collector is not None
        self.collector.reset()

    def stats(self) -> dict[str, InputStats]:
        """Statistics since the last reset, keyed by weight name; one RampError if the callback met an
        input it could not read."""
        assert self.collector is not None
        problem = self.collector.error()
        if problem:
            raise RampError(f"{self.path}: activation statistics incomplete: {problem}")
        return self.collector.stats()

    def close(self) -> None:
        super().close()  # the context (which holds the callback's user data) goes first
        if getattr(self, "collector", None) is not None:
            assert self.collector is not None
            self.collector.close()
            self.collector = None
