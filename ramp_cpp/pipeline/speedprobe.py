"""This machine on this model, measured in a few minutes before a sized run (`search --size ... --dry-run`).

`speed_probe` measures this machine on this model (`SpeedProbe`): llama.cpp loads it and first touches its
weights (`load_s`), tokenizes the reward text (`tokenize_s`), decodes one reward chunk (`token_s` per token,
the median of up to 5 decodes while they take under DECODE_PROBE_S in all) and scores it (`score_s`; `base_s`:
the base log-probs' top-k and tail samples); gguf-py parses its header (`header_s`); `native.quantize_rows`
quantizes 32 rows (64k weights at least) of the first tensor of each (written type, imatrix) the run's
quantizer passes meet, on `n_threads` threads at once (`quant_s[key]` per weight, median of 5), and gguf-py
dequantizes them (`dequant_s[type]`); numpy's proxy and folding arithmetic (`error_s`, `fold_s` per weight); a
copy and a sha256 of 64 MiB (`copy_bps`, `hash_bps`); each candidate's relative error on the rows of the first
searched linear of its row length (`type_error`: which types greedy can take); and a copy of the model's first
blocks decodes as it is and with the types of each file the plan decodes (`decode`, `decode_ratios`): what a
type's decode costs against F16 differs between CPUs 2-4x (AMX, VNNI), so a fixed table mispredicted every
evaluating stage. `estimate` (estimate.py) turns what it measured into each stage's costs.

Each part is its own function (`measure_decode`, `measure_text`, `measure_header`, `measure_rates`,
`measure_io`, `_type_errors`, `decode_ratios`) so that `speedcache.known_speeds` runs only those whose
results this machine has not kept; `speed_probe` runs them all and keeps nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.llama.ggufio import TensorInfo
from ramp_cpp.measure.candidates import searched_tensors, tensor_candidates
from ramp_cpp.model.arch import quantizable
from ramp_cpp.model.ladder import needs_imatrix, written_type
from ramp_cpp.pipeline.mixes import (
    T,
    decode_mixes,
    error_key,
    has_imatrix,
    quant_key,
    quantizable_tensors,
    quantizer_passes,
)
from ramp_cpp.pipeline.plan import RunPlan

DECODE_PROBE_S = 4.0  # the probe decodes its chunk again (up to 5 times) while it has taken less
ROWS = 32


@dataclass(frozen=True)
class SpeedProbe:
    """This machine on this model (module docstring): seconds, seconds per weight, bytes per second."""

    n_threads: int
    n_avail: int  # whole chunks of N tokens in the reward text
    load_s: float
    tokenize_s: float
    token_s: float
    score_s: float
    base_s: float
    header_s: float
    quant_s: Mapping[str, float]  # "Q4_K" / "Q4_K+im" (with an importance matrix)
    dequant_s: Mapping[str, float]
    error_s: float
    fold_s: float
    copy_bps: float
    hash_bps: float
    rss_base: int
    ctx_bytes: int
    seconds: float  # the probe's own wall time
    load: float = 0.0  # the 1-minute load average per core as the probe started (others' work slows it)
    #: a file's decode time over the source's ("below", "above", "hi", "preset i": `decode_mixes`), measured
    #: on a copy of the model's first blocks (`decode_ratios`); a file not here is read from the DECODE table
    decode: Mapping[str, float] = field(default_factory=dict)
    #: each candidate's relative squared error ‖Ŵ − W‖² / ‖W‖² on the rows of the first searched linear of
    #: its row length ("Q4_K@4096"), to guess which types greedy takes (`plan_mixes`)
    type_error: Mapping[str, float] = field(default_factory=dict)



def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:")), 0)
    except OSError:  # not Linux: RAM is then planned without the process's own
        return 0


def _timed(fn: Callable[..., object], *args: object, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def _quant_rate(pool: ThreadPoolExecutor, n: int, w: T, rows: np.ndarray, im: np.ndarray | None) -> float:
    """Wall seconds per weight of ggml's quantizer, `n` threads each quantizing `rows` at once."""
    from ramp_cpp.llama import native

    native.quantize_rows(int(w), rows[:1], im)  # warm-up: the IQ types build their tables once
    job = lambda _: native.quantize_rows(int(w), rows, im)  # noqa: E731
    # the median of 5: one short sample stopped by another process would count ten times its share
    runs = [_timed(lambda: list(pool.map(job, range(n)))) for _ in range(5)]
    return float(np.median(runs)) / (n * rows.size)


#: The copy's blocks hold at least this many times the rest's weights (embeddings, head), or are all of them.
DECODE_BLOCKS_OVER_REST = 1


def _decode_s(path: Path, opts: RuntimeOptions, chunk: np.ndarray) -> float:
    """Wall seconds of one decode of `chunk` by the model at `path`: the median of up to 3 decodes while they
    take under DECODE_PROBE_S / 2 in all, after one that is not timed (the first decode after a load ran up to
    1.3x slower on Qwen2.5-Coder-0.5B's copy)."""
    from ramp_cpp.llama.backend import LlamaModel

    with LlamaModel(str(path), opts) as m:
        m.logits(chunk, len(chunk) // 2, len(chunk) - 1)
        runs: list[float] = []
        while not runs or (sum(runs) < DECODE_PROBE_S / 2 and len(runs) < 3):
            runs.append(_timed(m.logits, chunk, len(chunk) // 2, len(chunk) - 1))
    return float(np.median(runs))


def decode_ratios(
    plan: RunPlan, opts: RuntimeOptions, chunk: np.ndarray, mixes: Mapping[str, Mapping[str, T]], work: Path
) -> dict[str, float]:
    """Each mix's decode time over the source's, on this machine: a copy of the model's first k blocks (the
    fewest whose weights are DECODE_BLOCKS_OVER_REST times the rest's, or all of them, so that the blocks and
    the head weigh in its decode about as in the whole model's) is decoded as it is (T_src) and quantized by
    llama.cpp with the mix's types (T_mix, fallbacks and all):

        ratio(mix) = T_mix / T_src

    What a type costs against F16 differs between CPUs 2-4x (AMX, VNNI) and between tensors of one model (a
    per-type table weighted by weights was 1.24x off on Qwen2.5-Coder-0.5B's written file), so the mixes the
    run will decode are decoded. A mix with a type that needs an importance matrix, or a copy llama.cpp will
    not load, is left out (the DECODE table then)."""
    import re

    from ramp_cpp.errors import RampError
    from ramp_cpp.llama.ggufio import read_inventory, rewrite_gguf
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map

    info = plan.info
    blk = re.compile(r"blk\.(\d+)\.")
    per_block = sum(t.n_params for t in info.tensors if t.block == 0)
    rest = DECODE_BLOCKS_OVER_REST * sum(t.n_params for t in info.tensors if t.block is None)
    k = min(info.n_blocks, max(1, -(-rest // max(1, per_block))))
    kept = lambda name: (b := blk.match(name)) is None or int(b.group(1)) < k  # noqa: E731
    copy = [t for t in quantizable_tensors(plan) if kept(t.name)]
    out: dict[str, float] = {}
    seen: dict[tuple[tuple[str, T], ...], float] = {}
    chunk = chunk[: max(8, len(chunk) // 2)]  # half a chunk: the ratio, not the time, is what is kept
    try:
        src = rewrite_gguf(plan.model_path, work / "src.gguf", {}, {f"{info.arch}.block_count": k}, keep=kept)
        t_src, src_info = _decode_s(src, opts, chunk), read_inventory(src)
        qopts = QuantizeOptions(n_threads=opts.n_threads, force=True)
        for label, mix in mixes.items():
            full = {t.name: mix.get(t.name, plan.cc.base) for t in copy}
            key = tuple(sorted(full.items()))
            if key not in seen and not any(needs_imatrix(w) for w in full.values()):
                dst = work / "mix.gguf"
                quantize_map(src, dst, full, plan.cc.base, qopts, info=src_info)
                seen[key] = _decode_s(dst, opts, chunk) / t_src
                dst.unlink()
            if key in seen:
                out[label] = seen[key]
    except RampError:  # an architecture whose copy llama.cpp refuses: the table it is
        return out
    return out

def _raw(tensor: Any, t: TensorInfo) -> np.ndarray:
    """The first rows of `t` as stored: 64k weights at least, ROWS rows at least (milliseconds of work)."""
    return np.asarray(tensor.data[: max(ROWS, (1 << 16) // t.n_per_row)])


def _rows(tensor: Any, t: TensorInfo) -> np.ndarray:
    """`_raw`'s rows as float32, from gguf-py's reader."""
    from gguf.quants import dequantize

    raw = _raw(tensor, t)
    return np.asarray(dequantize(raw, T(int(tensor.tensor_type))), dtype=np.float32).reshape(len(raw), -1)


def _type_errors(
    plan: RunPlan, data: Mapping[str, Any], rows: dict[str, np.ndarray], known: Collection[str] = ()
) -> dict[str, float]:
    """‖Ŵ − W‖² / ‖W‖² of every candidate of each row length, all on the rows of its first searched linear
    (`SpeedProbe.type_error`): the same rows for every type, so that their order is the types' own. Not the
    embeddings' rows while a linear has that length: a base dequantized from a GGUF can keep them on its
    source's grid (Qwen2.5-Coder-0.5B's off-grid base: Q5_0 at 1e-8 there, 0.2x Q5_1's elsewhere). The keys
    in `known` are not measured again."""
    from gguf.quants import dequantize

    from ramp_cpp.llama import native

    out: dict[str, float] = {}
    # linears first, so that a row length's sample is a linear's where one has it
    searched = sorted(searched_tensors(plan.info, plan.cc.embeddings),
                      key=lambda x: x.role in ("token_embd", "output"))
    first: dict[int, TensorInfo] = {}
    for t in searched:
        first.setdefault(t.n_per_row, t)
    for t in searched:
        for _, w in tensor_candidates(plan.cc, t, has_imatrix(plan, t)):
            key = error_key(w, t.n_per_row)
            if key in out or key in known or needs_imatrix(w):
                continue
            f = first[t.n_per_row]
            if f.name not in rows:
                rows[f.name] = _rows(data[f.name], f)
            r = rows[f.name]
            q = np.frombuffer(native.quantize_rows(int(w), r, None), dtype=np.uint8).reshape(len(r), -1)
            d = np.asarray(dequantize(q, w), dtype=np.float32).reshape(r.shape) - r
            norm = max(1e-30, float(np.square(r).sum(dtype=np.float64)))
            out[key] = float(np.square(d).sum(dtype=np.float64)) / norm
    return out


@dataclass(frozen=True)
class DecodeSpeeds:
    """What one load and decode of the model measure (`measure_decode`): `SpeedProbe`'s fields so named."""

    load_s: float
    token_s: float
    score_s: float
    base_s: float
    ctx_bytes: int
    load: float  # the 1-minute load average per core as they were measured


@dataclass(frozen=True)
class TextSpeeds:
    """The reward text on this model: whole chunks of N tokens in it, and the seconds to tokenize it."""

    n_avail: int
    tokenize_s: float


def load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0.0


def _first_chunk(plan: RunPlan, m: Any, tokens: np.ndarray) -> np.ndarray:
    from ramp_cpp.llama.evaluate import chunks

    cfg = plan.cfg
    (c,) = chunks(tokens, EvalConfig(cfg.n_ctx, cfg.first_chunk, 1), m.bos if m.add_bos else None)
    return c


def measure_text(plan: RunPlan, opts: RuntimeOptions) -> tuple[TextSpeeds, np.ndarray]:
    """The reward text tokenized by the model (its weights are mapped, not read); its first chunk."""
    from ramp_cpp.llama.backend import LlamaModel

    with LlamaModel(plan.model_path, replace(opts, n_ctx=plan.cfg.n_ctx)) as m:
        t0 = time.perf_counter()
        tokens = m.tokenize(plan.text)
        t = TextSpeeds(len(tokens) // plan.cfg.n_ctx, time.perf_counter() - t0)
        return t, _first_chunk(plan, m, tokens)


def measure_decode(plan: RunPlan, opts: RuntimeOptions) -> tuple[DecodeSpeeds, TextSpeeds, np.ndarray]:
    """llama.cpp loads the model and first touches its weights, tokenizes the reward text and decodes its
    first chunk (the median of up to 5 decodes while they take under DECODE_PROBE_S); numpy scores it."""
    from ramp_cpp.llama.backend import LlamaModel
    from ramp_cpp.llama.evaluate import _tail_samples, _top_k, logsumexp_rows

    cfg, load, rss_base = plan.cfg, load_per_core(), _rss()
    t0 = time.perf_counter()
    with LlamaModel(plan.model_path, replace(opts, n_ctx=cfg.n_ctx)) as m:
        t1 = time.perf_counter()
        tokens = m.tokenize(plan.text)
        t2 = time.perf_counter()
        c = _first_chunk(plan, m, tokens)
        warm = _timed(m.logits, c[:8], 0, 8)  # the weights' first touch: part of every load
        decodes: list[float] = []
        # a small model's one chunk is a second or two, and the first decode after a load runs ~1.5x slow
        # (the demo model's evaluation stages came out at 0.6-0.7x the plan): decode again while that is cheap
        while not decodes or (sum(decodes) < DECODE_PROBE_S and len(decodes) < 5):
            t3 = time.perf_counter()
            x = np.array(m.logits(c, len(c) // 2, len(c) - 1))
            decodes.append(time.perf_counter() - t3)
        load_s, token_s = t1 - t0 + warm, float(np.median(decodes)) / len(c)
        ctx_bytes = max(0, _rss() - rss_base - plan.info.file_size)
    score_s = _timed(logsumexp_rows, x, np.empty_like(x))
    top = _top_k(x, min(64, x.shape[1] - 1))[0]
    base_s = _timed(_tail_samples, x, logsumexp_rows(x, np.empty_like(x)), top, 64, np.random.default_rng(0))
    base_s += _timed(_top_k, x, top.shape[1])
    text = TextSpeeds(len(tokens) // cfg.n_ctx, t2 - t1)
    return DecodeSpeeds(load_s, token_s, score_s, base_s, ctx_bytes, load), text, c


def measure_header(plan: RunPlan) -> tuple[float, dict[str, Any]]:
    """Seconds gguf-py takes to parse the model's header; its tensors by name. The full parse, tokenizer
    arrays included, though only the tensors are used here: its time is estimate.py's `header_s`, the cost of
    each parse of a header that a stage copies whole (fold's rewrite, a fit's file), which HeaderReader's
    would understate (0.2 s against ~40 s on a 151,936-token vocabulary).
    A machine parses it once per model shape (speedcache.py)."""
    from ramp_cpp.llama.ggufio import open_reader

    t0 = time.perf_counter()
    data = {t.name: t for t in open_reader(plan.model_path).tensors}
    return time.perf_counter() - t0, data


def quant_todo(plan: RunPlan, presets: tuple[str, ...]) -> dict[str, tuple[T, bool, TensorInfo]]:
    """quant_key -> (written type, imatrix, the first tensor written at it) of every quantizer pass the run
    makes: the tensor whose rows measure that key's rate."""
    todo: dict[str, tuple[T, bool, TensorInfo]] = {}
    for types in [p for ps in quantizer_passes(plan, presets).values() for p in ps]:
        for t in (t for t in plan.info.tensors if quantizable(t.name, 2)):
            w = written_type(types.get(t.name, plan.cc.base), t.n_per_row)
            todo.setdefault(quant_key(w, has_imatrix(plan, t)), (w, has_imatrix(plan, t), t))
    return todo


def measure_rates(
    plan: RunPlan, opts: RuntimeOptions, todo: Mapping[str, tuple[T, bool, TensorInfo]],
    data: Mapping[str, Any], rows: dict[str, np.ndarray], dequant_s: dict[str, float],
) -> dict[str, float]:
    """quant_s of each key of `todo` (ggml's quantizer on its tensor's first rows, `n_threads` at once); the
    dequantizers' rates gguf-py shows on the way go into `dequant_s` (those not there yet)."""
    from gguf.quants import dequantize

    from ramp_cpp.llama import native

    n_threads = opts.n_threads or os.cpu_count() or 1
    quant_s: dict[str, float] = {}
    with ThreadPoolExecutor(n_threads) as pool:
        for key, (w, im, t) in todo.items():
            if t.name not in rows:
                src, raw = T(int(data[t.name].tensor_type)), _raw(data[t.name], t)
                rows[t.name] = _rows(data[t.name], t)
                if src.name not in dequant_s:
                    dequant_s[src.name] = _timed(dequantize, raw, src) / rows[t.name].size
            r = rows[t.name]
            imx = np.ones(r.shape[1], dtype=np.float32) if im else None
            quant_s[key] = _quant_rate(pool, n_threads, w, r, imx)
            if w.name not in dequant_s:
                q = np.frombuffer(native.quantize_rows(int(w), r, imx), dtype=np.uint8).reshape(len(r), -1)
                dequant_s[w.name] = _timed(dequantize, q, w) / r.size
    return quant_s


def measure_io(plan: RunPlan, r: np.ndarray) -> dict[str, float]:
    """numpy's proxy and folding arithmetic on rows `r` (seconds per weight); sha256 and a file copy of up to
    64 MiB of the model (bytes per second, in the system temp dir, removed)."""
    big, col = np.tile(r, (max(1, (1 << 20) // r.size), 1)), np.ones(r.shape[1])
    error_s = _timed(lambda: np.square(big - big[::-1]).sum(axis=0, dtype=np.float64) @ col) / big.size
    fold_s = _timed(lambda: (big.astype(np.float16).astype(np.float32) * col).astype(np.float16)) / big.size
    n = min(64 << 20, plan.info.file_size)
    with open(plan.model_path, "rb") as f:
        blob = f.read(n)
    hash_bps = n / _timed(lambda: hashlib.sha256(blob).digest())
    with tempfile.TemporaryDirectory(prefix="ramp-probe-") as d:
        (Path(d) / "a").write_bytes(blob)
        copy_bps = n / _timed(shutil.copyfile, Path(d) / "a", Path(d) / "b")
    return {"error_s": error_s, "fold_s": fold_s, "hash_bps": hash_bps, "copy_bps": copy_bps}


def speed_probe(plan: RunPlan, opts: RuntimeOptions, presets: tuple[str, ...] = ()) -> SpeedProbe:
    """Measure everything `estimate` needs (module docstring), keeping nothing: 64 MiB and the copy of the
    first blocks (1.3 GB for a 7B model) are written in the system temp dir and removed. `speedcache.
    known_speeds` measures only what this machine has not measured before."""
    t_start, n_threads, rss_base = time.perf_counter(), opts.n_threads or os.cpu_count() or 1, _rss()
    dec, text, c = measure_decode(plan, opts)
    header_s, data = measure_header(plan)
    rows: dict[str, np.ndarray] = {}
    dequant_s: dict[str, float] = {}
    quant_s = measure_rates(plan, opts, quant_todo(plan, presets), data, rows, dequant_s)
    type_error = _type_errors(plan, data, rows)
    io = measure_io(plan, next(iter(rows.values())))
    with tempfile.TemporaryDirectory(prefix="ramp-probe-") as d:
        mixes = decode_mixes(plan, presets, type_error)
        decode = decode_ratios(plan, replace(opts, n_ctx=plan.cfg.n_ctx), c, mixes, Path(d))
    return SpeedProbe(
        n_threads, text.n_avail, dec.load_s, text.tokenize_s, dec.token_s, dec.score_s, dec.base_s, header_s,
        quant_s, dequant_s, io["error_s"], io["fold_s"], io["copy_bps"], io["hash_bps"], rss_base,
        dec.ctx_bytes, time.perf_counter() - t_start, dec.load, decode, type_error,
    )
