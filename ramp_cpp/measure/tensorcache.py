"""Tensor cache: every searched tensor quantized once per candidate type, so an episode's GGUF is assembled
from stored bytes in a fraction of a second instead of re-running llama.cpp's quantizer on the model.

The bytes come from llama.cpp itself: for each candidate type `t`, one `quantize_map` call with every
searched tensor at `t` (every other quantizable tensor at `base`, same imatrix), whose tensor data is then
cut out of the written file. That carries llama.cpp's row-length fallbacks and imatrix handling over
unchanged; an assembled file is byte for byte the file `quantize_map` writes for the same map (header
included), which `build_cache` checks on the model at hand for every type it adds.

Searchable are the blk.N linears and the embeddings (`candidates.searchable`: token_embd, and output when
the head is not tied); the caller names the ones it searches (default: the linears). A type that needs an
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
ggml's row quantizer (`native.quantize_rows`: ggml_quantize_chunk, the call llama.cpp's quantizer makes per
tensor) on the source's rows with the tensor's imatrix columns. They are the same bytes
(`bench/studies/lazy_cache.py`: 1,266 of 1,266 blobs of SmolLM2's cache; tests/test_tensorcache.py checks every type
against llama.cpp's file). The disk then holds ≈ 8.5 bits per searched weight instead of ≈ 61 with twelve
types; the price is the quantization time per assembly (a group probe changes about 1/30 of the model), which
`_MEMO` saves on repeated asks. Types already on disk from a full build are read from there.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.llama.ggufio import (
    HeaderTemplate,
    ModelInfo,
    TensorInfo,
    TensorSlot,
    extract_tensors,
    file_equals,
    open_reader,
    read_header_template,
    read_inventory,
    template_pieces,
    write_pieces,
)
from ramp_cpp.llama.quantize import QuantizeOptions, complete_map, file_type_for, quantize_map
from ramp_cpp.measure.candidates import searchable
from ramp_cpp.model.ladder import needs_imatrix, tensor_nbytes, type_from_name, written_type
from ramp_cpp.store.atomic import atomic_path, temp_name
from ramp_cpp.store.cache import file_sha256_cached

T = GGMLQuantizationType
FORMAT_VERSION = 2  # 2: embeddings searchable (in the base type's bin, not in fixed.bin)


@dataclass(frozen=True)
class Blob:
    """Where one tensor's bytes live in the cache."""

    file: str  # file name inside the cache directory
    ggml_type: GGMLQuantizationType  # the type the bytes are stored as
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorCache:
    """The cached bytes of one source model for one (imatrix, base), and the header template they fill."""

    directory: Path  # the directory of this key (under the cache root given to build_cache)
    model_sha256: str
    imatrix_digest: str | None  # None: quantized without an importance matrix
    base: GGMLQuantizationType  # type of every non-searched quantizable tensor (quantize_map's `base`)
    types: tuple[GGMLQuantizationType, ...]  # candidate (requested) types cached; `base` always is too
    info: ModelInfo  # inventory of the source model
    template: HeaderTemplate
    searched: Mapping[tuple[str, GGMLQuantizationType], Blob]  # (searchable tensor, written type) -> bytes
    fixed: Mapping[str, Blob]  # every non-searchable tensor, as llama.cpp writes it with `base`
    names: tuple[str, ...] = ()  # the tensors searched through this cache (others only at `base`)
    in_memory: bool = False  # (name, type) pairs not in `searched` are quantized when asked (module doc)
    src: str = ""  # the source model, read by the in-memory quantizer
    imatrix: Mapping[str, np.ndarray] | None = None  # the importance matrix the cache was quantized with
    n_threads: int = 1  # the in-memory quantizer's threads


@dataclass(frozen=True)
class AssembleResult:
    path: str
    file_size: int
    seconds: float


def imatrix_digest(imatrix: Mapping[str, np.ndarray] | None) -> str | None:
    """sha256 over the (name, float32 values) pairs in name order; None for no (or an empty) imatrix,
    which llama.cpp treats alike."""
    if not imatrix:
        return None
    h = hashlib.sha256()
    for name in sorted(imatrix):
        v = np.ascontiguousarray(imatrix[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + v.size.to_bytes(8, "little") + v.tobytes())
    return h.hexdigest()


def _key(sha: str, digest: str | None, base: GGMLQuantizationType) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "model_sha256": sha, "imatrix_digest": digest, "base": base.name}


def _as_type(t: str | GGMLQuantizationType) -> GGMLQuantizationType:
    return t if isinstance(t, GGMLQuantizationType) else type_from_name(t)


def directory_for(
    cache_dir: str | os.PathLike[str], model_sha256: str, digest: str | None, base: GGMLQuantizationType
) -> Path:
    """The directory of one key under the cache root `cache_dir`."""
    return Path(cache_dir) / f"{model_sha256[:16]}-{(digest or 'none')[:16]}-{base.name}"


def cacheable(
    names: Iterable[str], t: GGMLQuantizationType, imatrix: Mapping[str, np.ndarray] | None
) -> list[str]:
    """The tensors of `names` that can be cached as `t`: all, or for a type that needs an importance matrix
    only those the imatrix covers (llama.cpp refuses the others, ggml may abort on them)."""
    have = imatrix or {}
    return [n for n in names if not needs_imatrix(t) or n in have]


#: Open read-only maps of the cache's .bin files, by (path, inode, mtime): an episode then copies from
#: already-mapped pages instead of faulting them in again (a rebuilt file has a new inode).
_MAPS: dict[tuple[str, int, int], mmap.mmap] = {}
_MAX_MAPS = 64


def _mapped(path: Path) -> mmap.mmap:
    """A shared read-only map of `path`, least recently used ones closed beyond _MAX_MAPS."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_mtime_ns)
    m = _MAPS.pop(key, None)
    if m is None:
        stale = [k for k in _MAPS if k[0] == key[0]]  # the file was rebuilt
        stale += list(_MAPS)[: max(0, len(_MAPS) - len(stale) - _MAX_MAPS + 1)]
        for k in dict.fromkeys(stale):
            _MAPS.pop(k).close()
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    _MAPS[key] = m  # (re)inserted last: dict order is recency order
    return m


def remove_cache(cache: TensorCache) -> None:
    """Delete `cache`'s directory, its open maps closed first (their pages would keep the space held): for a
    run that no longer needs it (`--fold check` kept the other model)."""
    import shutil

    inside = str(cache.directory) + os.sep
    for k in [k for k in _MAPS if k[0].startswith(inside)]:
        _MAPS.pop(k).close()
    shutil.rmtree(cache.directory, ignore_errors=True)


def _read_json(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """A cache index, or None when absent, unreadable or written for another key."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("key") == dict(key) else None


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
    base_t = _as_type(base)
    wanted = list(dict.fromkeys(_as_type(t) for t in types))
    if not wanted:
        raise RampError("no candidate types to cache")
    key = _key(file_sha256_cached(src), imatrix_digest(imatrix), base_t)
    directory = directory_for(cache_dir, key["model_sha256"], key["imatrix_digest"], base_t)
    directory.mkdir(parents=True, exist_ok=True)
    layout = _read_layout(directory, key, src)
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
        have = _read_json(directory / f"{t.name}.json", key)
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
    cache = _load(directory, key, src, wanted, base_t, names, lenient=in_memory)
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
        if _read_layout(d, key, job.src) is None:
            _write_layout(d, key, ref, job.info, set(job.universe))
        index = extract_tensors(ref, list(job.cover), d / f"{t.name}.bin", force=True)
        _write_json(
            d / f"{t.name}.json",
            {"key": key, "tensors": {n: [T(ty).name, off, nb] for n, (ty, off, nb) in index.items()}},
        )
        try:
            _check_identical(
                _load(d, key, job.src, [t], job.base, list(job.cover)), {n: t for n in job.cover}, ref
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


def _read_layout(
    directory: Path, key: Mapping[str, Any], src: str | os.PathLike[str]
) -> dict[str, Any] | None:
    """layout.json with its inventory as a ModelInfo of `src` under "info"; None if absent or stale."""
    layout = _read_json(directory / "layout.json", key)
    if layout is None or not (directory / "header.bin").is_file():
        return None
    try:
        d = dict(layout["info"])
        tensors = tuple(TensorInfo(**t) for t in d.pop("tensors"))
        d.update(path=str(src), tensors=tensors)
        layout["info"] = ModelInfo(**d)
    except (KeyError, TypeError):  # written by an older ModelInfo
        return None
    return layout


def _load(
    directory: Path,
    key: Mapping[str, Any],
    src: str | os.PathLike[str],
    types: list[GGMLQuantizationType],
    base: GGMLQuantizationType,
    names: list[str],
    lenient: bool = False,
) -> TensorCache:
    """The cache artifact of `directory` for searching `names` as `types`: their bytes of each type, and the
    base type's bytes of every searchable tensor. `lenient`: a type without bytes on disk is no error (the
    in-memory cache makes them when asked)."""
    layout = _read_layout(directory, key, src)
    if layout is None:
        raise RampError(f"{directory}: tensor cache has no usable layout.json (rerun build_cache)")
    meta = (directory / "header.bin").read_bytes()
    template = HeaderTemplate(
        meta=meta,
        alignment=int(layout["alignment"]),
        file_type_pos=int(layout["file_type_pos"]),
        tensors=tuple(
            TensorSlot(n, int(ne), int(ty), int(tp), int(op)) for n, ne, ty, tp, op in layout["tensors"]
        ),
    )
    fixed = {
        n: Blob("fixed.bin", T.__members__[ty], int(off), int(nb))
        for n, (ty, off, nb) in layout["fixed"].items()
    }
    searched: dict[tuple[str, GGMLQuantizationType], Blob] = {}
    wanted = set(names)
    for t in dict.fromkeys([base, *types]):
        index = _read_json(directory / f"{t.name}.json", key)
        if index is None and lenient and t != base:
            continue
        if index is None:
            raise RampError(f"{directory}: tensor cache lacks type {t.name} (rerun build_cache)")
        for n, (ty, off, nb) in index["tensors"].items():
            if t == base or n in wanted:
                searched[(n, T.__members__[ty])] = Blob(f"{t.name}.bin", T.__members__[ty], int(off), int(nb))
    return TensorCache(
        directory=directory,
        model_sha256=str(key["model_sha256"]),
        imatrix_digest=key["imatrix_digest"],
        base=base,
        types=tuple(types),
        info=layout["info"],
        template=template,
        searched=searched,
        fixed=fixed,
        names=tuple(names),
    )


def _check_identical(cache: TensorCache, types: Mapping[str, GGMLQuantizationType], ref: Path) -> None:
    """The assembled file for `types` must equal llama.cpp's own (`ref`), header and padding included;
    compared piece by piece, so the check writes nothing (at 7B a second copy would be gigabytes)."""
    with _pieces(cache, types) as (size, pieces):
        same = file_equals(ref, size, pieces)
    if not same:
        raise RampError(
            f"assembled file differs from llama.cpp's quantization of {cache.info.path}: "
            "this GGUF layout is not supported by the tensor cache"
        )


#: In-memory quantizations, (cache directory, tensor, written type) -> bytes, least recently used last
#: dropped beyond MEMO_BYTES: a pair probes or an episode ask again costs nothing the second time.
_MEMO: dict[tuple[str, str, GGMLQuantizationType], bytes] = {}
MEMO_BYTES = 1 << 30


def _source_rows(src: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of `name` in the (F16/BF16/F32) source, as float32: what llama.cpp's quantizer
    converts a tensor to before quantizing it."""
    from gguf.quants import dequantize

    t = source_tensors(src)[name]
    return np.asarray(dequantize(np.asarray(t.data)[start:stop], t.tensor_type), dtype=np.float32)


#: The source's tensors by name, its header parsed once per file version (a 7B's vocabulary takes seconds).
_READERS: dict[tuple[str, int, int], dict[str, Any]] = {}


def source_tensors(src: str | os.PathLike[str]) -> dict[str, Any]:
    """gguf-py's tensors of `src` by name, its header parsed once for the proxy and the in-memory cache."""
    src = str(src)
    st = Path(src).stat()
    key = (src, st.st_ino, st.st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = {t.name: t for t in open_reader(src).tensors}
    return _READERS[key]


def _quantize(cache: TensorCache, name: str, wt: GGMLQuantizationType, rows: np.ndarray) -> bytes:
    """`rows` of `name` (the source's, as float32: `_source_rows`) as llama.cpp writes them in type `wt`, made
    in memory."""
    from ramp_cpp.llama.native import quantize_rows

    if needs_imatrix(wt) and name not in (cache.imatrix or {}):
        raise RampError(f"{name}: {wt.name} needs an importance matrix entry for it")
    im = (cache.imatrix or {}).get(name)
    COUNTERS.quant_weights += rows.size
    return quantize_rows(int(wt), rows, im, cache.n_threads)


def blob_bytes(cache: TensorCache, name: str, wt: GGMLQuantizationType) -> bytes:
    """The whole of `name` in written type `wt`, made in memory (`_MEMO` keeps recent ones)."""
    key = (str(cache.directory), name, wt)
    got = _MEMO.pop(key, None)
    if got is None:
        got = _quantize(cache, name, wt, _source_rows(cache.src, name, 0, cache.info.tensor(name).n_rows))
    _MEMO[key] = got
    total = sum(len(b) for b in _MEMO.values())
    for k in list(_MEMO):
        if total <= MEMO_BYTES or k == key:
            break
        total -= len(_MEMO.pop(k))
    return got


def has_bytes(cache: TensorCache, name: str, wt: GGMLQuantizationType) -> bool:
    """Whether the cache can give `name` in written type `wt` (on disk, or made when asked)."""
    if (name, wt) in cache.searched:
        return True
    covered = not needs_imatrix(wt) or name in (cache.imatrix or {})
    return cache.in_memory and name in cache.names and covered


def blob_nbytes(cache: TensorCache, name: str, wt: GGMLQuantizationType) -> int:
    """The bytes of `name` in written type `wt` (unpadded), whether on disk or made when asked."""
    blob = cache.searched.get((name, wt))
    if blob is not None:
        return blob.nbytes
    if not has_bytes(cache, name, wt):
        raise RampError(f"{name}: no cached bytes for {wt.name}")
    return tensor_nbytes(wt, cache.info.tensor(name).n_params)


@contextmanager
def _pieces(
    cache: TensorCache, types: Mapping[str, str | GGMLQuantizationType]
) -> Iterator[tuple[int, list[bytes | bytearray | memoryview]]]:
    """The file `assemble` writes for `types`, as its size and buffers (views of the cache's maps, valid
    inside the block only)."""
    info = cache.info
    full = complete_map(info, {n: _as_type(t) for n, t in types.items()}, cache.base)
    row = {t.name: t.n_per_row for t in info.tensors}
    chosen: list[Blob | tuple[str, GGMLQuantizationType]] = []
    searched = set(cache.names)
    for slot in cache.template.tensors:
        asked = full.get(slot.name)
        if slot.name not in searched and asked is not None and asked != cache.base:
            raise RampError(
                f"{slot.name} is not a searched tensor: the cache holds it only as {cache.base.name}"
            )
        if slot.name in cache.fixed:
            chosen.append(cache.fixed[slot.name])
            continue
        wt = written_type(full[slot.name], row[slot.name])
        blob = cache.searched.get((slot.name, wt))
        if blob is None and has_bytes(cache, slot.name, wt):
            chosen.append((slot.name, wt))
            continue
        if blob is None:
            have = sorted({t.name for (n, t) in cache.searched if n == slot.name})
            raise RampError(
                f"{slot.name}: no cached bytes for {wt.name} "
                f"(asked {full[slot.name].name}; cached: {', '.join(have)})"
            )
        chosen.append(blob)
    files = {b.file for b in chosen if isinstance(b, Blob)}
    maps = {f: memoryview(_mapped(cache.directory / f)) for f in files}
    views: list[memoryview] = []
    try:
        for b in chosen:
            if isinstance(b, Blob):
                views.append(maps[b.file][b.offset : b.offset + b.nbytes])
            else:
                views.append(memoryview(blob_bytes(cache, *b)))
        kinds = [int(b.ggml_type) if isinstance(b, Blob) else int(b[1]) for b in chosen]
        yield template_pieces(cache.template, file_type_for(full), kinds, views)
    finally:
        # no view may outlive this block: _mapped closes maps it evicts
        for v in [*views, *maps.values()]:
            v.release()


def assemble(
    cache: TensorCache,
    types: Mapping[str, str | GGMLQuantizationType],
    dst: str | os.PathLike[str],
    force: bool = False,
    recycle: bool = False,
) -> AssembleResult:
    """Write the GGUF `quantize_map(src, dst, types, base=cache.base, opts=<same imatrix>)` would write, from
    cached bytes. `types` names searched tensors (others get `base`, as in quantize_map) with the type asked
    for; llama.cpp's row-length fallback (ladder.written_type) picks the bytes. `recycle`: overwrite an
    existing `dst` in place (see ggufio.write_from_template; only once nothing maps it)."""
    t0 = time.perf_counter()
    with _pieces(cache, types) as (size, pieces):
        write_pieces(dst, size, pieces, force, recycle)
    return AssembleResult(str(dst), size, time.perf_counter() - t0)


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
            source = np.concatenate([_source_rows(cache.src, name, a, b) for a, b in spans])
        raw = np.frombuffer(_quantize(cache, name, written, source), dtype=np.uint8)
        return np.asarray(dequantize(raw.reshape(n, -1), written), dtype=np.float32)
    row_bytes = blob.nbytes // n_rows
    raw = np.empty((n, row_bytes), dtype=np.uint8)
    view = memoryview(_mapped(cache.directory / blob.file))
    try:
        at = 0
        for a, b in spans:
            part = view[blob.offset + a * row_bytes : blob.offset + b * row_bytes]
            # copied out: no array may keep the map exported (_mapped closes maps it evicts)
            raw[at : at + b - a] = np.frombuffer(part, dtype=np.uint8).reshape(b - a, row_bytes)
            part.release()
            at += b - a
    finally:
        view.release()
    return np.asarray(dequantize(raw, written), dtype=np.float32)
