"""This machine's measured speeds, kept between dry runs (`known_speeds`): a plan reads what an earlier plan
on this machine measured and probes (speedprobe.py) only what is unknown.

**Where and under which key.** One JSON file per machine key, `cache_dir()/speeds/<key hash>.json`, written
atomically (store.jsonfile.write_keyed). The key: the CPU (model name, a hash of its flags), the cores and
the threads asked for, the llama.cpp build (llama-cpp-python's version and llama_print_system_info: backend
and instruction sets), the layers offloaded to a GPU, whether llama.cpp repacks weights, and FORMAT. Any of
them different is another file, measured afresh. The times assume the machine as loaded as when measured
(`SpeedProbe.load` is that load).

**What is kept, and how it serves another model.**
- Machine constants: `copy_bps`, `hash_bps` (bytes/s), `error_s`, `fold_s` (numpy seconds per weight),
  `dequant_s` per type (gguf-py, seconds per weight). Independent of the model.
- `quant_s` per (written type, imatrix, row length): ggml's quantizer, seconds per weight on rows of that
  length (its cost per weight is the row's: super-blocks, the IQ types' searches). A row length not measured
  yet is probed: 32 rows, milliseconds.
- Per model shape (architecture, blocks, every tensor's role, shape and type, context N): `load_s`,
  `token_s`, `score_s`, `base_s`, `ctx_bytes`, `header_s`, as measured. A shape not measured is scaled from
  the nearest measured one (by FLOPs per token) on this machine:

      token_s    ∝ FLOPs per token of an N-token chunk: 2·block weights + the head's weights (half the
                   chunk's rows are scored) + 4·n_blocks·q_dim·N (attention over the whole chunk)
      load_s     ∝ file bytes (mapped, then first touched)
      score_s, base_s ∝ n_vocab (numpy over N/2 rows of logits)
      header_s   ∝ header bytes (gguf-py parses the vocabulary's strings one by one)
      ctx_bytes  ∝ 4·N·n_vocab + 4·n_blocks·N·kv_dim (llama.cpp's logits buffer and F16 KV cache)

  A batch of N tokens on a CPU is compute-bound, so F16 decode time follows FLOPs within a model family;
  matrices too small to fill the cores run below that rate, so the nearer the measured shape, the better.
  With no shape measured on this machine, the model is probed (speedprobe.measure_decode).
- Per model file (path, size, mtime): `type_error` (its weights' own errors; a candidate not measured yet is
  measured on the same rows) and, per reward text, `n_avail` and `tokenize_s` (the model's tokenizer).
- Decode ratios (`SpeedProbe.decode`) per mix: an entry per (shape, written type of every quantizable
  tensor). A mix with none takes a measured mix of this machine whose weights sit at the same written types
  but for at most MIX_SLACK of them (a type's decode against F16 is its kernel's on this CPU; the nearest,
  the same shape's first); else the copy of the first blocks is decoded for the unknown mixes only
  (speedprobe.decode_ratios).

Cost on this project's 2-core machine (bench/results/dryrun.json, a 1.5B-class shape): the first plan on a
machine probes everything, minutes (the copy's decodes most; 6 min beside a test suite, 42 min at a load of 6
per core); a plan after it reads its speeds in 0.2 s, and its wall is then plan_run's reading of the model's
inventory (gguf-py parses a 152k-token vocabulary in ~20 s of CPU).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.llama.backend import RuntimeOptions, repack_weights
from ramp_cpp.model.ladder import needs_imatrix
from ramp_cpp.pipeline import speedprobe as sp
from ramp_cpp.pipeline.mixes import T, decode_mixes, error_keys, quantizable_tensors, written
from ramp_cpp.pipeline.plan import RunPlan
from ramp_cpp.store.cache import cache_dir
from ramp_cpp.store.jsonfile import read_keyed, write_keyed

FORMAT = 1
#: A mix borrows a measured mix's decode ratio when at most this share of its weights sit at other types.
MIX_SLACK = 0.2
SECTIONS = ("io", "dequant", "quant", "shapes", "texts", "errors", "mixes")


def _sha(x: Any) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _cpu() -> tuple[str, str]:
    """The CPU's model name and a hash of its flags (what llama.cpp's kernels choose from)."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and not name:
                    name = v.strip()
                elif k.strip() in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(v.split()))
    except OSError:  # not Linux: the platform's name stands for the CPU
        import platform

        name = platform.processor() or platform.machine()
    return name, hashlib.sha256(flags.encode()).hexdigest()[:16]


def machine_key(opts: RuntimeOptions) -> dict[str, Any]:
    """What the speeds kept under it depend on (module docstring)."""
    from ramp_cpp.llama.backend import _llama

    lc = _llama()
    name, flags = _cpu()
    return {"format": FORMAT, "cpu": name, "flags": flags, "cores": os.cpu_count(),
            "threads": opts.n_threads or os.cpu_count() or 1, "llama_cpp": getattr(lc, "__version__", ""),
            "system": lc.llama_print_system_info().decode(errors="replace").strip(),
            "gpu_layers": opts.n_gpu_layers, "repack": repack_weights()}


def speeds_file(key: Mapping[str, Any]) -> Path:
    return cache_dir() / "speeds" / f"{_sha(key)}.json"


def shape_of(plan: RunPlan) -> tuple[str, dict[str, float]]:
    """The model's shape id (what its decode depends on) and the features speeds scale by (module doc)."""
    info, n = plan.info, plan.cfg.n_ctx
    by_role = {t.role: t for t in reversed(info.tensors)}  # each role's first tensor
    head = by_role.get("output") or by_role["token_embd"]
    q_dim = by_role["attn_q"].n_rows if "attn_q" in by_role else head.n_per_row
    kv_dim = by_role["attn_k"].n_rows if "attn_k" in by_role else q_dim
    blocks = sum(t.n_params for t in info.tensors if t.block is not None)
    kinds = Counter((t.role, t.block is None, t.n_per_row, t.n_rows, t.ggml_type) for t in info.tensors)
    sid = _sha([info.arch, info.n_blocks, info.tied_output, n, sorted([*k, c] for k, c in kinds.items())])
    return sid, {"flops": 2 * blocks + head.n_params + 4 * info.n_blocks * q_dim * n,
                 "file_size": info.file_size, "n_vocab": head.n_rows, "header": info.data_offset,
                 "ctx": 4 * n * head.n_rows + 4 * info.n_blocks * n * kv_dim}


def scaled(entry: Mapping[str, Any], want: Mapping[str, float]) -> tuple[sp.DecodeSpeeds, float]:
    """A measured shape's decode speeds and header_s, scaled to a shape of features `want` (module doc)."""
    d, have = sp.DecodeSpeeds(**entry["decode"]), entry["features"]
    r = {k: want[k] / max(1.0, have[k]) for k in want}
    return sp.DecodeSpeeds(d.load_s * r["file_size"], d.token_s * r["flops"], d.score_s * r["n_vocab"],
                           d.base_s * r["n_vocab"], int(d.ctx_bytes * r["ctx"]), d.load), \
        entry["header_s"] * r["header"]


def _model_id(plan: RunPlan) -> str:
    p = Path(plan.model_path).resolve()
    st = p.stat()
    return _sha([str(p), st.st_size, st.st_mtime_ns])


def _shares(plan: RunPlan, ws: Mapping[str, T]) -> dict[str, float]:
    """Each written type's share of the quantizable weights."""
    ts = quantizable_tensors(plan)
    n = max(1, sum(t.n_params for t in ts))
    out: dict[str, float] = {}
    for t in ts:
        out[ws[t.name].name] = out.get(ws[t.name].name, 0.0) + t.n_params / n
    return out


def _distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """The share of weights at other types between two mixes."""
    return sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in {*a, *b}) / 2


def borrowed(mixes: Mapping[str, Any], shape: str, shares: Mapping[str, float]) -> float | None:
    """The decode ratio of the measured mix nearest to `shares` (the same shape's first), if within
    MIX_SLACK."""
    near = [(_distance(shares, m["shares"]), m["shape"] != shape, m["ratio"]) for m in mixes.values()
            if m.get("ratio") is not None]
    best = min(near, default=None, key=lambda x: x[:2])
    return float(best[2]) if best is not None and best[0] <= MIX_SLACK else None


class _Rows:
    """The model's header and rows, parsed only when something asks for them."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.rows: dict[str, np.ndarray] = {}
        self._data: dict[str, Any] | None = None
        self.header_s = 0.0

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self.header_s, self._data = sp.measure_header(self.plan)
        return self._data

    def any_rows(self) -> np.ndarray:
        if not self.rows:
            t = next(t for t in self.plan.info.searched)
            self.rows[t.name] = sp._rows(self.data[t.name], t)
        return next(iter(self.rows.values()))


def known_speeds(plan: RunPlan, opts: RuntimeOptions, presets: tuple[str, ...] = ()) -> sp.SpeedProbe:
    """`speedprobe.speed_probe`'s measurements, from this machine's cache where it has them (module
    docstring), the rest probed and added to it; `seconds` is this call's own wall time."""
    t_start, rss_base = time.perf_counter(), sp._rss()
    key = machine_key(opts)
    path = speeds_file(key)
    e: dict[str, Any] = {s: dict(read_keyed(path, key).get(s) or {}) for s in SECTIONS}
    new: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    n_threads, n_ctx = key["threads"], plan.cfg.n_ctx
    sid, feats = shape_of(plan)
    mid = _model_id(plan)
    tid = _sha([mid, hashlib.sha256(plan.text.encode()).hexdigest(), n_ctx])
    src, chunk = _Rows(plan), None

    # the model's decode: measured, scaled from the nearest measured shape, or probed
    if sid in e["shapes"]:
        dec, header_s = sp.DecodeSpeeds(**e["shapes"][sid]["decode"]), float(e["shapes"][sid]["header_s"])
    elif e["shapes"]:
        near = min(e["shapes"].values(), key=lambda s: abs(math.log(feats["flops"] / s["features"]["flops"])))
        dec, header_s = scaled(near, feats)
    else:
        dec, text, chunk = sp.measure_decode(plan, opts)
        _ = src.data
        header_s = src.header_s
        new["shapes"][sid] = {"features": feats, "decode": asdict(dec), "header_s": header_s}
        new["texts"][tid] = asdict(text)
    if tid not in e["texts"] and tid not in new["texts"]:
        text, chunk = sp.measure_text(plan, opts)
        new["texts"][tid] = asdict(text)
    text = sp.TextSpeeds(**{**e["texts"], **new["texts"]}[tid])

    # quantizer and dequantizer rates: per (written type, imatrix, row length) and per type
    todo = sp.quant_todo(plan, presets)
    src_type = plan.info.tensors[0].ggml_type
    deq_needed = {src_type, *(w.name for w, _, _ in todo.values())}
    rate_key = {k: f"{k}@{t.n_per_row}" for k, (_, _, t) in todo.items()}
    missing = {k: v for k, v in todo.items() if rate_key[k] not in e["quant"]
               or v[0].name not in e["dequant"] or src_type not in e["dequant"]}
    if missing or not deq_needed <= e["dequant"].keys():
        missing = missing or dict(todo)
        deq: dict[str, float] = {}
        got = sp.measure_rates(plan, opts, missing, src.data, src.rows, deq)
        new["quant"].update({rate_key[k]: v for k, v in got.items()})
        new["dequant"].update({k: v for k, v in deq.items() if k not in e["dequant"]})
    quant = {**e["quant"], **new["quant"]}
    dequant = {**e["dequant"], **new["dequant"]}
    quant_s = {k: float(quant[rate_key[k]]) for k in todo}

    # the model's own errors per candidate, then numpy's and the disk's rates
    errs = dict(e["errors"].get(mid) or {})
    if not set(error_keys(plan)) <= errs.keys():
        errs.update(sp._type_errors(plan, src.data, src.rows, known=errs.keys()))
        new["errors"][mid] = errs
    if not e["io"]:
        new["io"] = sp.measure_io(plan, src.any_rows())
    io = e["io"] or new["io"]

    if any(new.values()):  # kept now: a plan stopped during the copy's decodes (minutes) keeps the rest
        _save(path, key, new)

    # decode ratios: measured, borrowed from a near mix, or the copy decoded for the unknown ones
    decode: dict[str, float] = {}
    unknown: dict[str, dict[str, T]] = {}
    ids: dict[str, tuple[str, dict[str, float]]] = {}
    for label, mix in decode_mixes(plan, presets, errs).items():
        ws = written(plan, mix)
        if any(needs_imatrix(w) for w in ws.values()):
            continue  # not decodable without an importance matrix: the DECODE table (estimate.py)
        ids[label] = (_sha([sid, sorted((n, w.name) for n, w in ws.items())]), _shares(plan, ws))
        m = e["mixes"].get(ids[label][0])
        r = m["ratio"] if m is not None else borrowed(e["mixes"], sid, ids[label][1])
        if m is None and r is None:
            unknown[label] = mix
        elif r is not None:
            decode[label] = float(r)
    if unknown:
        if chunk is None:
            chunk = sp.measure_text(plan, opts)[1]
        with tempfile.TemporaryDirectory(prefix="ramp-probe-") as d:
            got = sp.decode_ratios(plan, replace(opts, n_ctx=n_ctx), chunk, unknown, Path(d))
        decode.update(got)
        for label in unknown:  # one llama.cpp refused is kept as None: the DECODE table, not a probe again
            mix_id, shares = ids[label]
            new["mixes"][mix_id] = {"shape": sid, "shares": shares, "ratio": got.get(label)}
        _save(path, key, {"mixes": new["mixes"]})
    return sp.SpeedProbe(
        n_threads, text.n_avail, dec.load_s, text.tokenize_s, dec.token_s, dec.score_s, dec.base_s, header_s,
        quant_s, {k: float(v) for k, v in dequant.items()}, io["error_s"], io["fold_s"], io["copy_bps"],
        io["hash_bps"], rss_base, dec.ctx_bytes, time.perf_counter() - t_start, dec.load, decode, errs,
    )


def _save(path: Path, key: Mapping[str, Any], new: Mapping[str, Mapping[str, Any]]) -> None:
    """Add `new` to the file as it is now (another plan may have added to it meanwhile), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = read_keyed(path, key)
    write_keyed(path, key, {s: {**(now.get(s) or {}), **new.get(s, {})} for s in SECTIONS})
