"""A sized run's cost, stage by stage, before any of it runs (`search --size ... --dry-run`).

`speed_probe` measures this machine on this model (`SpeedProbe`): llama.cpp loads it and first touches its
weights (`load_s`), tokenizes the reward text (`tokenize_s`), decodes one reward chunk (`token_s` per token,
the median of up to 5 decodes while they take under DECODE_PROBE_S in all) and scores it (`score_s`;
`base_s`: the base log-probs' top-k and tail samples); gguf-py parses its header
(`header_s`); `native.quantize_rows` quantizes 32 rows (64k weights at least) of the first tensor of each
(written type, imatrix) the run's quantizer passes meet, on `n_threads` threads at once (`quant_s[key]` per
weight, median of 5), and gguf-py dequantizes them (`dequant_s[type]`); numpy's proxy and folding arithmetic
(`error_s`, `fold_s` per weight); a copy and a sha256 of 64 MiB (`copy_bps`, `hash_bps`); each candidate's
relative error on the rows of the first searched linear of its row length (`type_error`: which types greedy
can take); and a copy of the model's first blocks decodes as it is and with the types of each file the plan
decodes (`decode`, `decode_ratios`): what a type's decode costs against F16 differs between CPUs 2-4x (AMX,
VNNI), so a fixed table mispredicted every evaluating stage. `estimate` turns the plan's counts into costs,
with N = n_ctx:

    eval(n, f)      load_s + tokenize_s + n·(N·token_s·rel(f) + score_s)      E = n / chunks
    rel(f)          file f's decode time relative to F16's: measured on the copy (`decode`; greedy's file the
                    share ā = Σ n_params·frac / Σ n_params of the way from "below" to "above"), else
                    Σ n_params·DECODE[written type] / Σ n_params (CPU; 1 with layers offloaded to a GPU)
    pass(types)     header_s + Σ_quantizable n_params·(quant_s[written, imatrix] + dequant_s[src]/n_threads)
                    + file/copy_bps                                         one llama.cpp quantizer pass
    calibrate       load_s + tokenize_s + samples·ctx·token_s·CALIB_DECODE   E = samples·ctx / (chunks·N)
    fold            2·header_s + file/hash_bps + Σ_linears n_params·fold_s + file/copy_bps (+ the source's
                    hash when no calibrate stage made it first)
    base log-probs  per chunk set not cached (reward, fold_eval_config's, GroupConfig.chunks'): eval(n, F16)
                    + n·base_s
    presets         pass(preset) per preset in `presets` and the --size one; eval(chunks, preset) if scored
    tensor cache    per type of cc.requested() ∪ {base}: pass(searched at it) + header_s + (3·file + bin)
                    /copy_bps (cut, assemble, compare) + 2·header_s; proxy: header_s + Σ_searched n_params·
                    (dequant_s[src] + Σ_candidates (dequant_s[written] + error_s))
    group probes    (1 + len(groups_of) + pairs)·(hi/copy_bps + load_s + n_g·(N·token_s·rel(hi) + score_s))
                    + tokenize_s, n_g = min(GroupConfig.chunks, chunks); pairs counted in full (upper bound)
    fold decision   check: pass(choice) + 2·eval(n_f, choice), then (if_unfolded: only when the check keeps
                    the unfolded model; `total(stages, unfolded=True)`) tensor cache and group probes again,
                    the folded copy and (in the run folder) the folded cache deleted first;
                    auto: 2·(target/copy_bps + eval(n_f, choice));
                    choice: greedy's file, every searched tensor at its candidate nearest the target's bits
                    per weight (its decode: the mix of the candidates just below and above that many bits),
                    among the candidates on the tensor's frontier by `type_error` (allocators.frontier:
                    greedy's Lagrangian steps between those)
    allocate        FIT_TRIES·(2·target/copy_bps + header_s + (1 - kept)·memq(choice)), kept: the share of
                    greedy's searched bytes the in-memory cache's memo (1 GiB) still holds from the fold
                    decision's file (0 without one); sac: + its evaluations, eval(chunks, choice)
    evaluate        eval(chunks, choice)                                     E = 1

With the tensor cache in memory (plan.in_memory) the cache stage runs the base type's pass only and the proxy
adds Σ_searched n_params·Σ_candidates quant_s[written, imatrix]; with --row-sample K the proxy's terms count a
linear's n_params / K (the rows it reads); every assembly (a probe's group, the fold
decision's and the fits' files) adds memq(types) = Σ_searched, not at base n_params·quant_s[written, imatrix].

RAM: rss_base (the process before a model is loaded) + the model's mmap (its file size) + ctx_bytes (what a
context of N tokens adds, measured); from the tensor cache on, its .bin files (kept mapped) and the proxy's
arrays. Disk: what the run folder holds (resources.disk_needs) + calibration, folded copy, one .bin per
requested type (a fallback type's bytes are stored once per type asking for it) and the GGUF; `written`
counts disk only (scratch on /dev/shm is memory). A calibration, folded copy or base log-probs already there
cost nothing; a tensor cache already built is not detected (the plan is then an upper bound). A preset
--size's target is the preset's file as `_preset` approximates llama.cpp's mixture. The times assume the
machine stays as loaded as during the probe; what the run does after evaluate (reports, pareto.png) is not a
stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, is_prefix
from ramp_cpp.llama.ggufio import TensorInfo
from ramp_cpp.measure.candidates import searchable, searched_tensors, tensor_candidates
from ramp_cpp.measure.tensorcache import MEMO_BYTES
from ramp_cpp.model.arch import quantizable
from ramp_cpp.model.ladder import bits_per_weight, needs_imatrix, tensor_nbytes, type_from_name, written_type
from ramp_cpp.pipeline.plan import RunPlan
from ramp_cpp.store.cache import known_sha256

T = GGMLQuantizationType
#: The fallback when a type's ratio is not measured (`decode_ratios`).
#: Decode time relative to a plain F16 decode, llama.cpp's CPU backend, one thread on an idle x86 core
#: (demo model, 512 tokens): the activation collector's, and a file's per written type (a K-quant's from a
#: file with it on the 1536-wide rows, the 576-wide ones at its fallback). Threads that wait on a busy CPU
#: squeeze these ratios towards 1 (2 threads sharing 2 cores with another run: Q5_1 1.25, F16 3x slower).
CALIB_DECODE = 1.2
DECODE = {"F16": 1.0, "BF16": 1.0, "Q8_0": 1.3, "Q4_0": 1.1, "Q4_1": 2.3, "Q5_0": 1.75, "Q5_1": 2.85,
          "IQ4_NL": 1.05, "IQ4_XS": 1.25, "Q2_K": 1.05, "Q3_K": 1.0, "Q4_K": 0.65, "Q5_K": 0.6, "Q6_K": 0.8}
DECODE_OTHER = 1.5
DECODE_PROBE_S = 4.0  # the probe decodes its chunk again (up to 5 times) while it has taken less
FIT_TRIES = 1  # stages.fit_and_write allocates under a bound on the metadata it adds: one assembly
ROWS = 32
#: `type_error` is one linear's rows without the imatrix, greedy's the activation-weighted proxy of every
#: tensor: on Qwen2.5-Coder-0.5B's 896-wide rows Q5_1 lay 2% above the probe's hull, and greedy wrote 44% of
#: the weights at it. A type this near the hull counts as on it (`allocators.frontier`'s slack).
TYPE_ERROR_SLACK = 0.1


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
    #: its row length ("Q4_K@4096"), to guess which types greedy takes (`_mixes`)
    type_error: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """A stage as the cost meter names it (costs.StageCost): expected wall seconds, peak RSS, bytes written to
    disk, disk the run holds when it ends; its evaluation units and quantizer passes are exact counts."""

    stage: str
    wall_s: float
    peak_rss: int
    written: int
    held: int
    E: float
    quant_passes: int
    note: str = ""
    #: the run makes this stage only if `--fold check` keeps the unfolded model; `total` leaves it out
    if_unfolded: bool = False


def _has_im(plan: RunPlan, t: TensorInfo) -> bool:
    """The calibration records every matmul's input: the linears and the head (token_embd when tied)."""
    return plan.cfg.imatrix and (t.role != "token_embd" or plan.info.tied_output)


def _key(w: T, im: bool) -> str:
    return f"{w.name}+im" if im else w.name


def _preset(plan: RunPlan, name: str) -> dict[str, T]:
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


def _passes(plan: RunPlan, presets: tuple[str, ...]) -> dict[str, list[dict[str, T]]]:
    """Every quantizer pass of the tensor cache (the base type first, over every searchable tensor) and of the
    presets stage: tensor -> asked type, the others at the base type."""
    cc, s = plan.cc, searched_tensors(plan.info, plan.cc.embeddings)
    cache = [{t.name: w for t in s if not needs_imatrix(w) or _has_im(plan, t)}
             for w in dict.fromkeys([cc.base, *cc.requested()])]
    cache[0] = {t.name: cc.base for t in searchable(plan.info)}
    pre = [_preset(plan, p) for p in dict.fromkeys([*presets, *([plan.preset] if plan.preset else [])])]
    return {"cache": cache, "presets": pre}


def _quantized(plan: RunPlan) -> list[TensorInfo]:
    return [t for t in plan.info.tensors if quantizable(t.name, 2)]


def _written(plan: RunPlan, types: Mapping[str, T]) -> dict[str, T]:
    """Every quantizable tensor -> the type llama.cpp writes for it (`types`, else the cache's base type)."""
    return {t.name: written_type(types.get(t.name, plan.cc.base), t.n_per_row) for t in _quantized(plan)}


def _pad(plan: RunPlan, n: int) -> int:
    return -(-n // plan.info.alignment) * plan.info.alignment


def _file_bytes(plan: RunPlan, types: Mapping[str, T]) -> int:
    info, ws = plan.info, _written(plan, types)
    return info.data_offset + info.other_bytes + sum(
        _pad(plan, tensor_nbytes(ws[t.name] if t.name in ws else type_from_name(t.ggml_type), t.n_params))
        for t in info.tensors)


@dataclass(frozen=True)
class _Mixes:
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


def _error_key(w: T, n_per_row: int) -> str:
    return f"{w.name}@{n_per_row}"


def _frontier(plan: RunPlan, t: TensorInfo, cands: list[T], type_error: Mapping[str, float]) -> list[T]:
    """`t`'s candidates greedy steps between (allocators.frontier) by the probe's errors; all of them when one
    has no error measured."""
    from ramp_cpp.allocate.allocators import frontier
    from ramp_cpp.measure.sensitivity import Option

    err = [type_error.get(_error_key(w, t.n_per_row)) for w in cands]
    if any(e is None for e in err):
        return cands
    opts = [Option(w, _pad(plan, tensor_nbytes(w, t.n_params)), float(e or 0.0))
            for w, e in zip(cands, err, strict=True)]
    return [o.ggml_type for o in frontier(opts, TYPE_ERROR_SLACK)]


def _mixes(plan: RunPlan, presets: tuple[str, ...], type_error: Mapping[str, float] = {}) -> _Mixes:
    """`_Mixes` of `plan`; with `type_error` (`SpeedProbe.type_error`) greedy's guess reads only the types on
    each tensor's frontier: on the 7B shape the nearest candidates below the target (Q4_0, Q4_1) decode at
    ~2.8x F16's where the file greedy wrote, of K-quants and IQ4, decoded at ~0.4-0.8x."""
    from ramp_cpp.measure.candidates import type_for_bpw

    info, cc = plan.info, plan.cc
    searched = searched_tensors(info, cc.embeddings)
    every = {t.name: [w for _, w in tensor_candidates(cc, t, _has_im(plan, t))] for t in searched}
    cands = {t.name: _frontier(plan, t, every[t.name], type_error) for t in searched}
    lowest = {t.name: min(_pad(plan, tensor_nbytes(w, t.n_params)) for w in every[t.name]) for t in searched}
    fixed = plan.lo - sum(lowest.values())
    pre = _passes(plan, presets)["presets"]
    target = plan.target or _file_bytes(plan, pre[-1])
    bpw = 8 * (target - fixed) / max(1, sum(t.n_params for t in searched))
    below = {n: max((w for w in c if bits_per_weight(w) <= bpw), key=bits_per_weight, default=c[0])
             for n, c in cands.items()}
    above = {n: min((w for w in c if bits_per_weight(w) >= bpw), key=bits_per_weight, default=c[-1])
             for n, c in cands.items()}
    frac = {n: (bpw - bits_per_weight(below[n])) / (bits_per_weight(above[n]) - bits_per_weight(below[n]))
            if above[n] != below[n] else 0.0 for n in cands}
    return _Mixes(target, every, {n: type_for_bpw(c, bpw) for n, c in cands.items()}, below, above, frac,
                  {n: c[-1] for n, c in cands.items()}, pre)


def decode_mixes(
    plan: RunPlan, presets: tuple[str, ...] = (), type_error: Mapping[str, float] = {}
) -> dict[str, dict[str, T]]:
    """The files whose decode the plan reads (`_Mixes`), by label: tensor -> requested type."""
    m = _mixes(plan, presets, type_error)
    pre = {f"preset {i}": p for i, p in enumerate(m.presets)}
    return {"below": m.below, "above": m.above, "hi": m.hi, **pre}


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
    copy = [t for t in _quantized(plan) if kept(t.name)]
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

def _rows(tensor: Any, t: TensorInfo) -> np.ndarray:
    """The first rows of `t` (64k weights at least, ROWS rows at least) as float32, from gguf-py's reader."""
    from gguf.quants import dequantize

    k = max(ROWS, (1 << 16) // t.n_per_row)
    raw = np.asarray(tensor.data[:k])
    return np.asarray(dequantize(raw, T(int(tensor.tensor_type))), dtype=np.float32).reshape(len(raw), -1)


def _type_errors(plan: RunPlan, data: Mapping[str, Any], rows: dict[str, np.ndarray]) -> dict[str, float]:
    """‖Ŵ − W‖² / ‖W‖² of every candidate of each row length, all on the rows of its first searched linear
    (`SpeedProbe.type_error`): the same rows for every type, so that their order is the types' own. Not the
    embeddings' rows while a linear has that length: a base dequantized from a GGUF can keep them on its
    source's grid (Qwen2.5-Coder-0.5B's off-grid base: Q5_0 at 1e-8 there, 0.2x Q5_1's elsewhere)."""
    from gguf.quants import dequantize

    from ramp_cpp.llama import native

    out: dict[str, float] = {}
    # linears first, so that a row length's sample is a linear's where one has it
    searched = sorted(searched_tensors(plan.info, plan.cc.embeddings),
                      key=lambda x: x.role in ("token_embd", "output"))
    for t in searched:
        for _, w in tensor_candidates(plan.cc, t, _has_im(plan, t)):
            key = _error_key(w, t.n_per_row)
            if key in out or needs_imatrix(w):
                continue
            first = next(x for x in searched if x.n_per_row == t.n_per_row)
            r = rows.setdefault(first.name, _rows(data[first.name], first))
            q = np.frombuffer(native.quantize_rows(int(w), r, None), dtype=np.uint8).reshape(len(r), -1)
            d = np.asarray(dequantize(q, w), dtype=np.float32).reshape(r.shape) - r
            norm = max(1e-30, float(np.square(r).sum(dtype=np.float64)))
            out[key] = float(np.square(d).sum(dtype=np.float64)) / norm
    return out


def speed_probe(plan: RunPlan, opts: RuntimeOptions, presets: tuple[str, ...] = ()) -> SpeedProbe:
    """Measure what `estimate` needs (module docstring); nothing is kept (64 MiB and the copy of the first
    blocks, 1.3 GB for a 7B model, are written in the system temp dir and removed)."""
    from gguf.quants import dequantize

    from ramp_cpp.llama import native
    from ramp_cpp.llama.backend import LlamaModel
    from ramp_cpp.llama.evaluate import _tail_samples, _top_k, chunks, logsumexp_rows
    from ramp_cpp.llama.ggufio import open_reader

    t_start, cfg, info = time.perf_counter(), plan.cfg, plan.info
    n_threads = opts.n_threads or os.cpu_count() or 1
    load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0.0
    rss_base = _rss()
    t0 = time.perf_counter()
    with LlamaModel(plan.model_path, replace(opts, n_ctx=cfg.n_ctx)) as m:
        t1 = time.perf_counter()
        tokens = m.tokenize(plan.text)
        t2 = time.perf_counter()
        (c,) = chunks(tokens, EvalConfig(cfg.n_ctx, cfg.first_chunk, 1), m.bos if m.add_bos else None)
        warm = _timed(m.logits, c[:8], 0, 8)  # the weights' first touch: part of every load
        decodes: list[float] = []
        # a small model's one chunk is a second or two, and the first decode after a load runs ~1.5x slow
        # (the demo model's evaluation stages came out at 0.6-0.7x the plan): decode again while that is cheap
        while not decodes or (sum(decodes) < DECODE_PROBE_S and len(decodes) < 5):
            t3 = time.perf_counter()
            x = np.array(m.logits(c, len(c) // 2, len(c) - 1))
            decodes.append(time.perf_counter() - t3)
        load_s, tokenize_s, token_s = t1 - t0 + warm, t2 - t1, float(np.median(decodes)) / len(c)
        ctx_bytes = max(0, _rss() - rss_base - info.file_size)
    score_s = _timed(logsumexp_rows, x, np.empty_like(x))
    top = _top_k(x, min(64, x.shape[1] - 1))[0]
    base_s = _timed(_tail_samples, x, logsumexp_rows(x, np.empty_like(x)), top, 64, np.random.default_rng(0))
    base_s += _timed(_top_k, x, top.shape[1])
    t0 = time.perf_counter()
    data = {t.name: t for t in open_reader(plan.model_path).tensors}
    header_s = time.perf_counter() - t0
    todo: dict[str, tuple[T, bool, TensorInfo]] = {}
    for types in [p for ps in _passes(plan, presets).values() for p in ps]:
        for t in (t for t in info.tensors if quantizable(t.name, 2)):
            w = written_type(types.get(t.name, plan.cc.base), t.n_per_row)
            todo.setdefault(_key(w, _has_im(plan, t)), (w, _has_im(plan, t), t))
    quant_s: dict[str, float] = {}
    dequant_s: dict[str, float] = {}
    rows: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(n_threads) as pool:
        for key, (w, im, t) in todo.items():
            if t.name not in rows:
                k = max(ROWS, (1 << 16) // t.n_per_row)  # 64k weights at least: a sample of milliseconds
                src, raw = T(int(data[t.name].tensor_type)), np.asarray(data[t.name].data[:k])
                rows[t.name] = _rows(data[t.name], t)
                dequant_s.setdefault(src.name, _timed(dequantize, raw, src) / rows[t.name].size)
            r = rows[t.name]
            imx = np.ones(r.shape[1], dtype=np.float32) if im else None
            quant_s[key] = _quant_rate(pool, n_threads, w, r, imx)
            q = np.frombuffer(native.quantize_rows(int(w), r, imx), dtype=np.uint8).reshape(len(r), -1)
            dequant_s.setdefault(w.name, _timed(dequantize, q, w) / r.size)
    type_error = _type_errors(plan, data, rows)
    r = next(iter(rows.values()))
    big, col = np.tile(r, (max(1, (1 << 20) // r.size), 1)), np.ones(r.shape[1])
    error_s = _timed(lambda: np.square(big - big[::-1]).sum(axis=0, dtype=np.float64) @ col) / big.size
    fold_s = _timed(lambda: (big.astype(np.float16).astype(np.float32) * col).astype(np.float16)) / big.size
    n = min(64 << 20, info.file_size)
    with open(plan.model_path, "rb") as f:
        blob = f.read(n)
    hash_bps = n / _timed(lambda: hashlib.sha256(blob).digest())
    with tempfile.TemporaryDirectory(prefix="ramp-probe-") as d:
        (Path(d) / "a").write_bytes(blob)
        copy_bps = n / _timed(shutil.copyfile, Path(d) / "a", Path(d) / "b")
        for copied in Path(d).iterdir():
            copied.unlink()
        mixes = decode_mixes(plan, presets, type_error)
        decode = decode_ratios(plan, replace(opts, n_ctx=cfg.n_ctx), c, mixes, Path(d))
    return SpeedProbe(
        n_threads, len(tokens) // cfg.n_ctx, load_s, tokenize_s, token_s, score_s, base_s, header_s, quant_s,
        dequant_s, error_s, fold_s, copy_bps, hash_bps, rss_base, ctx_bytes, time.perf_counter() - t_start,
        load, decode, type_error,
    )


def _base_cached(plan: RunPlan, sha: str | None, ecfg: EvalConfig) -> bool:
    """evaluate.base_logprobs's cache holds these chunks."""
    from ramp_cpp.llama.evaluate import base_logprobs_file

    return sha is not None and base_logprobs_file(sha, plan.text, ecfg).is_file()


def estimate(
    plan: RunPlan, presets: tuple[str, ...], opts: RuntimeOptions, probe: SpeedProbe
) -> list[StagePlan]:
    """The stages `run.run_direct` will meter for `plan`, in order, with their expected costs (module
    docstring); E and quantizer passes are the counts the run makes."""
    from ramp_cpp.fold.source import CALIB
    from ramp_cpp.measure.groups import groups_of
    from ramp_cpp.pipeline.folddecision import KEPT_UNFOLDED
    from ramp_cpp.pipeline.resources import disk_needs
    from ramp_cpp.pipeline.stages import fold_eval_config
    from ramp_cpp.store.cache import scratch_root

    p, info, cfg, cc = probe, plan.info, plan.cfg, plan.cc
    N, file, chunks = cfg.n_ctx, info.file_size, cfg.chunks
    needs = disk_needs(info, cc, plan.fold, plan.hi, plan.run_dir, plan.cache_root, in_memory=plan.in_memory)
    on_disk = not str(scratch_root().resolve()).startswith("/dev/shm")  # else scratch writes are memory
    searched = searched_tensors(info, cc.embeddings)
    quantized = _quantized(plan)
    src_deq = p.dequant_s.get(info.tensors[0].ggml_type, 0.0)

    def rel(types: Mapping[str, T], hi: Mapping[str, T] | None = None, a: Mapping[str, float] = {}) -> float:
        """`types`' decode time over F16's by the DECODE table; with `hi`, each tensor a fraction `a` of the
        way to hi's type."""
        if opts.n_gpu_layers:
            return 1.0
        d = lambda m: {n: DECODE.get(w.name, DECODE_OTHER) for n, w in _written(plan, m).items()}  # noqa: E731
        lo, up = d(types), d(hi or types)
        n = sum(t.n_params * (lo[t.name] + a.get(t.name, 0.0) * (up[t.name] - lo[t.name])) for t in quantized)
        return n / max(1, sum(t.n_params for t in quantized))

    def ev(n: float, r: float) -> float:
        return p.load_s + p.tokenize_s + n * (N * p.token_s * r + p.score_s)

    def qpass(types: Mapping[str, T]) -> tuple[float, int]:
        ws, size = _written(plan, types), _file_bytes(plan, types)
        sec = p.header_s + sum(t.n_params * (p.quant_s.get(_key(ws[t.name], _has_im(plan, t)), 0.0)
                                             + src_deq / p.n_threads) for t in quantized)
        return sec + size / p.copy_bps, size

    def memq(types: Mapping[str, T]) -> float:
        """Seconds the in-memory cache spends making `types`' bytes (its base type is on disk)."""
        if not plan.in_memory:
            return 0.0
        ws = {t.name: written_type(types.get(t.name, cc.base), t.n_per_row) for t in searched}
        return sum(t.n_params * p.quant_s.get(_key(ws[t.name], _has_im(plan, t)), 0.0)
                   for t in searched if types.get(t.name, cc.base) != cc.base)

    m = _mixes(plan, presets, p.type_error)
    cands, passes, target, choice = m.cands, _passes(plan, presets), m.target, m.choice
    r_choice, r_hi = rel(m.below, m.above, m.frac), p.decode.get("hi", rel(m.hi))
    if "below" in p.decode and "above" in p.decode:  # measured: greedy's file a share of the way up
        n_q = max(1, sum(t.n_params for t in quantized))
        up = sum(t.n_params * m.frac.get(t.name, 0.0) for t in quantized) / n_q
        r_choice = p.decode["below"] + up * (p.decode["above"] - p.decode["below"])
    out: list[StagePlan] = []
    held = needs.held

    def add(stage: str, wall: float, ram: int, written: int, grows: int = 0, E: float = 0.0,
            passes: int = 0, note: str = "") -> None:
        nonlocal held
        held += grows
        out.append(StagePlan(stage, wall, p.rss_base + ram, written, held, E, passes, note))

    loaded = file + p.ctx_bytes
    sha = known_sha256(plan.model_path)
    hash_s = 0.0 if sha else file / p.hash_bps
    if plan.calib is None and not (plan.run_dir / CALIB).is_file():
        c = cfg.calib
        stats = 12 * sum(t.n_per_row for t in info.tensors if t.searched or t.role == "output"
                         or (t.role == "token_embd" and info.tied_output))
        add("calibrate", p.load_s + p.tokenize_s + c.samples * c.ctx * p.token_s * CALIB_DECODE + hash_s,
            loaded, stats, stats, c.samples * c.ctx / (chunks * N))
        hash_s = 0.0
    # a run resumed after its fold check kept the unfolded model (stages.release_folded) makes no folded files
    freed = plan.fold == "check" and (plan.run_dir / KEPT_UNFOLDED).is_file()
    folds = True in plan.foldings and not freed and not (plan.run_dir / "folded.f16.gguf").is_file()
    if folds:
        lin = sum(t.n_params for t in info.searched)
        # the folded copy's hash (remembered for the stages after), and the source's if calibrate did not
        wall = 2 * p.header_s + hash_s + file / p.hash_bps + lin * p.fold_s + file / p.copy_bps
        add("fold", wall, file, file, needs.folded)
        hash_s = 0.0
    ecfg, fcfg = cfg.eval_config, fold_eval_config(plan)
    n_fold, n_g = min(fcfg.n_chunks or 0, p.n_avail), min(plan.gcfg.chunks or chunks, chunks)
    sets = [ecfg, *([fcfg] if plan.fold in ("auto", "check") else []),
            *([replace(ecfg, n_chunks=n_g)] if plan.sensitivity == "measured" and plan.gcfg.chunks else [])]
    missing = {json.dumps(s.key()): s for s in sets if not _base_cached(plan, sha, s)}
    n_of = {k: n_fold if s.up_to else s.n_chunks or 0 for k, s in missing.items()}
    # evaluate.base_logprobs_sets decodes the largest set and cuts the sets that are its first chunks
    big = max(sets, key=lambda s: n_fold if s.up_to else s.n_chunks or 0)
    todo = {k: n_of[k] for k, s in missing.items() if s == big or not is_prefix(s, big)}
    npz = sum(n * (N - N // 2 - 1) * (8 * (ecfg.top_k + ecfg.tail_samples) + 4) for n in n_of.values())
    add("base log-probs", hash_s + sum(ev(n, 1.0) + n * p.base_s for n in todo.values()), loaded * bool(todo),
        npz, E=sum(todo.values()) / chunks, note="" if missing else "cached")
    pre = [(*qpass(t), p.decode.get(f"preset {i}", rel(t))) for i, t in enumerate(passes["presets"])]
    scored = len(dict.fromkeys(presets))  # the first of the presets stage's passes; the --size one last
    add("presets", sum(s + (ev(chunks, r) if i < scored else 0) for i, (s, _, r) in enumerate(pre)),
        loaded, on_disk * sum(b for _, b, _ in pre), E=scored, passes=len(pre))
    cache_s, cache_w, cache_bytes = 2 * p.header_s, 0, 0

    def measured_params(t: TensorInfo) -> float:
        """The weights the proxy reads of `t`: a linear's sampled rows (proxy.row_spans); embeddings whole."""
        return t.n_params if t.role == "token_embd" else t.n_params / plan.row_sample

    if plan.in_memory:  # the base type's pass only; the proxy quantizes each candidate in memory
        passes["cache"] = passes["cache"][:1]
        cache_s += sum(measured_params(t) * sum(p.quant_s.get(_key(w, _has_im(plan, t)), 0.0)
                                                for w in cands[t.name] if w != cc.base) for t in searched)
    for types in passes["cache"]:
        sec, size = qpass(types)
        bins = sum(tensor_nbytes(written_type(w, info.tensor(n).n_per_row), info.tensor(n).n_params)
                   for n, w in types.items())
        cache_s += sec + p.header_s + (3 * size + bins) / p.copy_bps
        cache_w, cache_bytes = cache_w + 2 * size + bins, cache_bytes + bins
    cache_s += p.header_s + sum(
        measured_params(t) * (src_deq + sum(p.dequant_s.get(w.name, 0.0) + p.error_s for w in cands[t.name]))
        for t in searched)
    if any(t.role == "token_embd" for t in searched):
        cache_s += p.load_s + p.tokenize_s  # the proxy's token frequencies: the calibration text tokenized
    n_probes = 1 + len(groups_of(info, [t.name for t in searched], plan.gcfg.n_buckets)) + plan.gcfg.pairs
    pairs = f"{n_probes} evaluations" + (f" ({plan.gcfg.pairs} pairs at most)" if plan.gcfg.pairs else "")
    probe_s = p.tokenize_s + n_probes * (plan.hi / p.copy_bps + p.load_s + n_g * (N * p.token_s * r_hi
                                                                                  + p.score_s))
    probe_s += memq(choice)  # in memory: each group's tensors quantized once for its probe
    # the proxy's arrays (MeasureConfig.chunk_elements weights at a time) stay in the process's heap after
    work, measured = 16 * min(1 << 24, max(t.n_params for t in searched)), plan.sensitivity == "measured"
    first = len(out)
    for f in (False,) if freed else plan.measured_first:
        what = "folded" if f else "unfolded"
        add(f"tensor cache + proxy ({what})", cache_s,
            file + cache_bytes + work, cache_w, cache_bytes, passes=len(passes["cache"]))
        if measured:
            add(f"group probes ({what})", probe_s, work + cache_bytes + plan.hi + p.ctx_bytes,
                on_disk * n_probes * plan.hi, E=n_probes * n_g / chunks, note=pairs)
    maps = len(plan.measured_first) * cache_bytes
    ram, scratch = work + maps + target + p.ctx_bytes, on_disk * target
    if plan.fold == "check" and not freed:
        add("fold decision", qpass(choice)[0] + target / p.copy_bps + 2 * ev(n_fold, r_choice) + memq(choice),
            max(ram, work + maps + file), 2 * scratch, 0, 2 * n_fold / chunks, 1,
            "if the check keeps the unfolded model, the stages marked † follow")
        # the unfolded model measured as the folded one was, only if the check keeps it: after the folded copy
        # and (in the run folder) the folded cache are deleted (stages.release_folded)
        in_run = plan.cache_root.resolve().is_relative_to(plan.run_dir.resolve())
        held_u = held - file + cache_bytes * (not in_run)
        out += [replace(s, stage=s.stage.replace("(folded)", "(unfolded)"), held=held_u, if_unfolded=True)
                for s in out[first:-1]]
    elif plan.fold == "auto":
        add("fold decision", 2 * (target / p.copy_bps + ev(n_fold, r_choice) + memq(choice)), ram,
            2 * scratch, 0, 2 * n_fold / chunks)
    else:
        add("fold decision", 0.0, 0, 0)
    sac, e_sac = plan.sac, 0.0
    if plan.method == "sac":  # every evaluation real (memo hits are free), the second look's too
        e_sac = sac.evaluations + (sac.rescore_top > 0) * (sac.rescore_top + 1) * sac.rescore_chunks / chunks
    note = f"{FIT_TRIES} fits assumed" + (", SAC's evaluations at most, not its updates" if e_sac else "")
    # the fold decision assembled greedy's file just before: what of it the memo still holds is not made again
    made = {t.name: written_type(choice[t.name], t.n_per_row) for t in searched}
    choice_bytes = sum(tensor_nbytes(made[t.name], t.n_params) for t in searched)
    decided = plan.fold in ("auto", "check") and not freed
    kept = min(1.0, MEMO_BYTES / max(1, choice_bytes)) if decided else 0.0
    fit = FIT_TRIES * (2 * target / p.copy_bps + p.header_s + (1 - kept) * memq(choice))
    add("allocate", fit + e_sac * (target / p.copy_bps + ev(chunks, r_choice) - p.tokenize_s), ram,
        FIT_TRIES * (target + scratch), target, e_sac, note=note)
    # greedy's types are not known before it runs, and their decode is not their bits': measured mixes span
    # 0.85x (the preset) to 2.7x (every tensor just below the target) F16's on Qwen2.5-Coder-0.5B
    span = [v for k, v in p.decode.items() if k in ("below", "above") or k.startswith("preset")]
    add("evaluate", ev(chunks, r_choice), ram, 0, E=1.0,
        note=f"{ev(chunks, min(span)):.0f}-{ev(chunks, max(span)):.0f} s by the types chosen" if span else "")
    return out


def total(stages: list[StagePlan], unfolded: bool = False) -> StagePlan:
    """Sums, and the maxima of peak RSS and disk held (as costs.total), of the stages the run makes when the
    fold check keeps the folded model (`unfolded`: the unfolded one)."""
    held, grown = 0, 0
    for s in stages:  # the unfolded model's cache stays to the end of the run: held after it, by as much
        if s.if_unfolded and not unfolded:
            continue
        if s.if_unfolded:
            grown = max(grown, s.held - held)
        held = max(held, s.held + (0 if s.if_unfolded else grown))
    stages = [s for s in stages if unfolded or not s.if_unfolded]
    return StagePlan("total", sum(s.wall_s for s in stages), max(s.peak_rss for s in stages),
                     sum(s.written for s in stages), held, sum(s.E for s in stages),
                     sum(s.quant_passes for s in stages))
