"""Tensor cache: every searched tensor quantized once per candidate type, so an episode's GGUF is assembled
from stored bytes in a fraction of a second instead of re-running llama.cpp's quantizer on the model.

The bytes come from llama.cpp itself: for each candidate type `t`, one `quantize_map` call with every
searched tensor at `t` (every other quantizable tensor at `base`, same imatrix), whose tensor data is then
cut out of the written file. That carries llama.cpp's row-length fallbacks and imatrix handling over
unchanged; an assembled file (`write/assemble.py`, the write stage's) is byte for byte the file
`quantize_map` writes for the same map (header included), which `build_cache` checks on the model at hand for
every type it adds. Reading the files back is `write/cachefiles.py`'s; this module builds them.

Searchable are the blk.N linears, 3-D expert tensors included (llama.cpp writes one type for all of an
expert tensor's slices, each slice quantized with its own imatrix slice), and the embeddings
(`candidates.searchable`: token_embd, and output when the head is not tied); the caller names the ones it
searches (default: the linears). A type that needs an
importance matrix (`ladder.needs_imatrix`) is cached only for the tensors the imatrix covers.

On disk, one directory per key (model sha256, imatrix digest, base type) under the cache root:

    layout.json   key, header template (patch positions), the non-searchable tensors' place in fixed.bin
    header.bin    the template's metadata bytes;  fixed.bin: every non-searchable tensor as written
    Q8_0.bin      (the base type) every searchable tensor as written when not searched
    Q4_K.bin      the searched tensors as llama.cpp writes them when asked for Q4_K (after fallback)
    Q4_K.json     name -> [written type, offset, bytes] in Q4_K.bin; written last, so it marks Q4_K done
                  for these names (a later call searching more tensors quantizes Q4_K again for all of them)

Every file is written to a temp name and renamed, so an interrupted build leaves whole types or none, and
the next `build_cache` quantizes only the types still missing.

In memory (`build_cache(..., in_memory=True)`, issue 21's disk bound at 7B): only the base type's pass is
kept on disk; the bytes of any other (tensor, written type) are made when an assembly or the proxy asks, by
ggml's row quantizer (`write/cachefiles.py`; an expert tensor expert by expert). They are the same bytes
(`bench/results/lazy_cache.json`; tests/test_tensorcache.py and, for experts, tests/test_moe.py check every
type against llama.cpp's file). The disk then holds ≈ 8.5 bits per searched weight instead of ≈ 61 with twelve
types; the price is the quantization time per assembly (a group probe changes about 1/30 of the model), which
`_MEMO` saves on repeated asks. Types already on disk from a full build are read from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.llama.ggufio import ModelInfo, extract_tensors, read_header_template, read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure.candidates import searchable
from ramp_cpp.model.ladder import needs_imatrix
from ramp_cpp.store.atomic import atomic_path, temp_name
from ramp_cpp.store.cache import file_sha256_cached

# the write stage's names the callers of the cache used to import from here (pipeline, bench): re-exported
from ramp_cpp.write.assemble import AssembleResult as AssembleResult
from ramp_cpp.write.assemble import assemble as assemble
from ramp_cpp.write.assemble import same_file
from ramp_cpp.write.cachefiles import MEMO_BYTES as MEMO_BYTES
from ramp_cpp.write.cachefiles import TensorCache as TensorCache
from ramp_cpp.write.cachefiles import (
    as_type,
    cache_key,
    close_maps,
    has_bytes,
    load_cache,
    mapped,
    quantize_in_memory,
    read_json,
    read_layout,
    source_rows,
)
from ramp_cpp.write.cachefiles import blob_nbytes as blob_nbytes
from ramp_cpp.write.cachefiles import directory_for as directory_for
from ramp_cpp.write.cachefiles import imatrix_digest as imatrix_digest
from ramp_cpp.write.cachefiles import source_tensors as source_tensors

T = GGMLQuantizationType


def cacheable(
    names: Iterable[str], t: GGMLQuantizationType, imatrix: Mapping[str, np.ndarray] | None
) -> list[str]:
    """The tensors of `names` that can be cached as `t`: all, or for a type that needs an importance matrix
    only those the imatrix covers (llama.cpp refuses the others, ggml may abort on them)."""
    have = imatrix or {}
    return [n for n in names if not needs_imatrix(t) or n in have]


def remove_cache(cache: TensorCache) -> None:
    """Delete `cache`'s directory, its open maps closed first (their pages would keep the space held): for a
    run that no longer needs it (`--fold check` kept the other model)."""
    import shutil

    close_maps(cache.directory)
    shutil.rmtree(cache.directory, ignore_errors=True)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj))


def build_cache(
    src: str | os.PathLike[str],
    types: Iterable[str | GGMLQuantizationType],
    cache_dir: str | os.PathLike[str],
    imatrix: Mapping[str, np.ndarray] | None = None,
    base: str | GGMLQuantizationType = T.Q8_0,
    n_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    searched: Iterable[str] | None = None,
    info: ModelInfo | None = None,
    executor: Executor | None = None,
    in_memory: bool = False,
) -> TensorCache:
    """The tensor cache of `src` for candidate `types` under the root `cache_dir`: reused where this key
    (model sha256, imatrix digest, base) already holds a type for the `searched` tensors (default: the
    blk.N linears; any of `candidates.searchable`), built by one llama.cpp quantization per missing type
    otherwise. `progress(done, total)` counts the types quantized (never called if none). `executor`: where
    the passes of the types other than the base run (executor.py; each writes only its own files, so they
    may run at once on nodes that share `cache_dir`). `in_memory`: quantize only the base type by llama.cpp
    and the others when asked (module docstring)."""
    base_t = as_type(base)
    wanted = list(dict.fromkeys(as_type(t) for t in types))
    if not wanted:
        raise RampError("no candidate types to cache")
    key = cache_key(file_sha256_cached(src), imatrix_digest(imatrix), base_t)
    directory = directory_for(cache_dir, key["model_sha256"], key["imatrix_digest"], base_t)
    directory.mkdir(parents=True, exist_ok=True)
    layout = read_layout(directory, key, src)
    # reading the inventory parses the whole vocabulary (seconds on a real model): the layout keeps it
    info = layout["info"] if layout is not None else info or read_inventory(src)
    universe = [t.name for t in searchable(info)]
    names = list(dict.fromkeys(searched)) if searched is not None else [t.name for t in info.searched]
    stray = [n for n in names if n not in universe]
    if stray:
        raise RampError(
            f"{stray[0]} is not a searchable tensor of {Path(src).name} "
            "(the blk.N linears, token_embd, output)"
        )
    # the base type first: its bytes of every searchable tensor fill the others' assemblies
    need = {base_t: cacheable(universe, base_t, imatrix)}
    for t in [] if in_memory else wanted:
        need[t] = list(dict.fromkeys([*need.get(t, []), *cacheable(names, t, imatrix)]))
    todo: dict[GGMLQuantizationType, list[str]] = {}
    for t, ns in need.items():
        have = read_json(directory / f"{t.name}.json", key)
        cached = set(have["tensors"]) if have is not None else set()
        if have is None or not set(ns) <= cached:
            todo[t] = [n for n in universe if n in cached or n in set(ns)]
    if layout is None and not todo:
        todo[base_t] = need[base_t]  # the fixed part and header come from any one quantization
    ex = executor or Serial()
    jobs = [
        TypePass(str(src), directory, key, t, tuple(cover), base_t, imatrix, ex.threads or n_threads, info,
                 tuple(universe))
        for t, cover in todo.items()
    ]
    done = 0

    def step(_: int, __: None) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(jobs))

    # the base type's pass first, alone: it writes the layout, and every other type's check assembles its
    # other tensors from the base's bytes; the other passes do not depend on each other
    first = [j for j in jobs if j.ggml_type == base_t]
    Serial().map(cache_type, first, step)
    ex.map(cache_type, [j for j in jobs if j.ggml_type != base_t], step)
    cache = load_cache(directory, key, src, wanted, base_t, names, lenient=in_memory)
    if not in_memory:
        return cache
    return replace(
        cache, in_memory=True, src=str(src), imatrix=imatrix,
        n_threads=max(1, ex.threads or n_threads or os.cpu_count() or 1),
    )


@dataclass(frozen=True)
class TypePass:
    """One llama.cpp pass of the cache: `src` with the tensors `cover` at `ggml_type`, the rest at `base`."""

    src: str
    directory: Path
    key: Mapping[str, Any]
    ggml_type: GGMLQuantizationType
    cover: tuple[str, ...]
    base: GGMLQuantizationType
    imatrix: Mapping[str, np.ndarray] | None
    n_threads: int | None
    info: ModelInfo
    universe: tuple[str, ...]


def cache_type(job: TypePass) -> None:
    """Quantize, cut out `<type>.bin` and its index `<type>.json` (written last: it marks the type done), and
    check that an assembly from them is the file llama.cpp wrote; the check failing leaves no index."""
    t, d, key = job.ggml_type, job.directory, job.key
    ref = d / temp_name(f"ref-{t.name}.gguf")  # a killed pass leaves it to the next run's sweep_temps
    opts = QuantizeOptions(imatrix=job.imatrix, n_threads=job.n_threads)
    try:
        quantize_map(job.src, ref, {n: t for n in job.cover}, base=job.base, opts=opts, info=job.info)
        if read_layout(d, key, job.src) is None:
            _write_layout(d, key, ref, job.info, set(job.universe))
        index = extract_tensors(ref, list(job.cover), d / f"{t.name}.bin", force=True)
        _write_json(
            d / f"{t.name}.json",
            {"key": key, "tensors": {n: [T(ty).name, off, nb] for n, (ty, off, nb) in index.items()}},
        )
        try:
            same_file(
                load_cache(d, key, job.src, [t], job.base, list(job.cover)), {n: t for n in job.cover}, ref
            )
        except RampError:
            (d / f"{t.name}.json").unlink(missing_ok=True)  # never reuse bytes that failed
            raise
    finally:
        ref.unlink(missing_ok=True)


def _write_layout(
    directory: Path, key: Mapping[str, Any], ref: Path, info: ModelInfo, searched: set[str]
) -> None:
    """header.bin, fixed.bin (every tensor not in `searched`) and (last) layout.json from llama.cpp's
    quantization `ref`; layout.json keeps the source's inventory `info` too, so that a reused cache never
    parses the model."""
    template = read_header_template(ref)
    fixed_names = [s.name for s in template.tensors if s.name not in searched]
    index = extract_tensors(ref, fixed_names, directory / "fixed.bin", force=True)
    with atomic_path(directory / "header.bin", force=True) as tmp:
        tmp.write_bytes(template.meta)
    _write_json(
        directory / "layout.json",
        {
            "key": key,
            "info": info.to_json(),
            "alignment": template.alignment,
            "file_type_pos": template.file_type_pos,
            "tensors": [
                [s.name, s.n_elements, s.ggml_type, s.type_pos, s.offset_pos] for s in template.tensors
            ],
            "fixed": {n: [T(ty).name, off, nb] for n, (ty, off, nb) in index.items()},
        },
    )


def dequantized_rows(
    cache: TensorCache, name: str, written: GGMLQuantizationType, start: int, stop: int
) -> np.ndarray:
    """Rows start..stop-1 of searchable tensor `name` as the cache stores it in type `written` (what
    llama.cpp writes), dequantized by gguf-py: float32, shape (stop - start, n_per_row)."""
    return dequantized_spans(cache, name, written, [(start, stop)])


def dequantized_spans(
    cache: TensorCache,
    name: str,
    written: GGMLQuantizationType,
    spans: Sequence[tuple[int, int]],
    source: np.ndarray | None = None,
) -> np.ndarray:
    """The rows of every (start, stop) span of `name` in type `written`, one after another, dequantized:
    float32, shape (Σ stop - start, n_per_row). `source`: the same rows of the source as float32, when the
    caller has them (the proxy), so that an in-memory cache quantizes them without reading them again.

    One quantizer and one dequantizer call for all the spans: ggml quantizes row by row, so the bytes are
    those of the spans quantized one at a time, and a call on 16 rows costs ~2.6x a call on thousands
    (its threads are started per call; measured on 576-wide rows, Q4_K)."""
    from gguf.quants import dequantize

    n_rows = cache.info.tensor(name).n_rows
    bad = next(((a, b) for a, b in spans if not 0 <= a <= b <= n_rows), None)
    if bad is not None:
        raise RampError(f"{name}: rows {bad[0]}..{bad[1]} outside 0..{n_rows}")
    n = sum(b - a for a, b in spans)
    blob = cache.searched.get((name, written))
    if blob is None:
        if not has_bytes(cache, name, written):
            raise RampError(f"{name}: no cached bytes for {written.name}")
        if source is None:
            source = np.concatenate([source_rows(cache.src, name, a, b) for a, b in spans])
        raw = np.frombuffer(quantize_in_memory(cache, name, written, source, spans), dtype=np.uint8)
        return np.asarray(dequantize(raw.reshape(n, -1), written), dtype=np.float32)
    row_bytes = blob.nbytes // n_rows
    raw = np.empty((n, row_bytes), dtype=np.uint8)
    view = memoryview(mapped(cache.directory / blob.file))
    try:
        at = 0
        for a, b in spans:
            part = view[blob.offset + a * row_bytes : blob.offset + b * row_bytes]
            # copied out: no array may keep the map exported (`mapped` closes maps it evicts)
            raw[at : at + b - a] = np.frombuffer(part, dtype=np.uint8).reshape(b - a, row_bytes)
            part.release()
            at += b - a
    finally:
        view.release()
    return np.asarray(dequantize(raw, written), dtype=np.float32)
