"""The tensor cache's files, read back: where each (tensor, written type)'s bytes live, and the bytes the
cache does not keep on disk made when asked. `measure/tensorcache.py` builds these files (its docstring
describes the layout); this module is all that reading them needs, so that the write stage assembles a GGUF
from them without the builder.

In memory (`TensorCache.in_memory`): the bytes of any (tensor, written type) that is not on disk are made by
ggml's row quantizer (`native.quantize_rows`: ggml_quantize_chunk, the call llama.cpp's quantizer makes per
tensor) on the source's rows with the tensor's imatrix columns: the same bytes as llama.cpp's file
(tests/test_tensorcache.py checks every type). `_MEMO` keeps recent ones, since probes and episodes ask for
the same pairs again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import HeaderTemplate, ModelInfo, TensorInfo, TensorSlot, open_reader
from ramp_cpp.model.ladder import needs_imatrix, tensor_nbytes, type_from_name

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


def cache_key(sha: str, digest: str | None, base: GGMLQuantizationType) -> dict[str, Any]:
    """What every index file of one cache directory is written for."""
    return {"format": FORMAT_VERSION, "model_sha256": sha, "imatrix_digest": digest, "base": base.name}


def as_type(t: str | GGMLQuantizationType) -> GGMLQuantizationType:
    return t if isinstance(t, GGMLQuantizationType) else type_from_name(t)


def directory_for(
    cache_dir: str | os.PathLike[str], model_sha256: str, digest: str | None, base: GGMLQuantizationType
) -> Path:
    """The directory of one key under the cache root `cache_dir`."""
    return Path(cache_dir) / f"{model_sha256[:16]}-{(digest or 'none')[:16]}-{base.name}"


#: Open read-only maps of the cache's .bin files, by (path, inode, mtime): an episode then copies from
#: already-mapped pages instead of faulting them in again (a rebuilt file has a new inode).
_MAPS: dict[tuple[str, int, int], mmap.mmap] = {}
_MAX_MAPS = 64


def mapped(path: Path) -> mmap.mmap:
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


def close_maps(directory: Path) -> None:
    """Close every open map of a file under `directory` (before it is deleted: their pages would keep the
    space held)."""
    inside = str(directory) + os.sep
    for k in [k for k in _MAPS if k[0].startswith(inside)]:
        _MAPS.pop(k).close()


def read_json(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """A cache index, or None when absent, unreadable or written for another key."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("key") == dict(key) else None


def read_layout(
    directory: Path, key: Mapping[str, Any], src: str | os.PathLike[str]
) -> dict[str, Any] | None:
    """layout.json with its inventory as a ModelInfo of `src` under "info"; None if absent or stale."""
    layout = read_json(directory / "layout.json", key)
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


def load_cache(
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
    layout = read_layout(directory, key, src)
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
        index = read_json(directory / f"{t.name}.json", key)
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


# -- bytes made in memory -----------------------------------------------------------------------------

#: In-memory quantizations, (cache directory, tensor, written type) -> bytes, least recently used last
#: dropped beyond MEMO_BYTES: a pair probes or an episode ask again costs nothing the second time.
_MEMO: dict[tuple[str, str, GGMLQuantizationType], bytes] = {}
MEMO_BYTES = 1 << 30


def source_matrix(t: Any) -> np.ndarray:
    """gguf-py's data of a source tensor with one row per output row: an expert tensor's (n_expert,
    rows, n_per_row) stacked into n_expert · rows rows, expert after expert, as llama.cpp's quantizer walks
    them (the last axis is bytes for BF16, which gguf-py keeps raw)."""
    data = np.asarray(t.data)
    return data.reshape(-1, data.shape[-1]) if data.ndim > 2 else data


def source_rows(src: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of `name` in the (F16/BF16/F32) source, as float32: what llama.cpp's quantizer
    converts a tensor to before quantizing it."""
    from gguf.quants import dequantize

    t = source_tensors(src)[name]
    return np.asarray(dequantize(source_matrix(t)[start:stop], t.tensor_type), dtype=np.float32)


#: The source's tensors by name, its header read once per file version.
_READERS: dict[tuple[str, int, int], dict[str, Any]] = {}


def source_tensors(src: str | os.PathLike[str]) -> dict[str, Any]:
    """gguf-py's tensors of `src` by name, its header read once for the proxy and the in-memory cache. Only
    the tensors are read here: the tokenizer's arrays are stepped over (ggufio.HeaderReader), which on a
    151,936-token vocabulary is 0.2 s instead of ~40 s."""
    src = str(src)
    st = Path(src).stat()
    key = (src, st.st_ino, st.st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = {t.name: t for t in open_reader(src, tokenizer=False).tensors}
    return _READERS[key]


def expert_runs(tensor: TensorInfo, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(expert, first, last + 1) of the runs of `spans`' rows, counted one after another, that belong to one
    expert of `tensor` (spans in ascending order): one run of expert 0 for a 2-D tensor."""
    if tensor.n_expert == 1:
        return [(0, 0, sum(b - a for a, b in spans))]
    per = tensor.rows_per_expert
    ids = np.concatenate([np.arange(a, b) // per for a, b in spans]) if spans else np.zeros(0, dtype=int)
    cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
    return [(int(ids[a]), a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def quantize_in_memory(
    cache: TensorCache,
    name: str,
    wt: GGMLQuantizationType,
    rows: np.ndarray,
    spans: Sequence[tuple[int, int]] | None = None,
) -> bytes:
    """`rows` of `name` (the source's, as float32: `source_rows`), which are the rows of `spans` one after
    another (default: all of them), as llama.cpp writes them in type `wt`, made in memory. An expert
    tensor's rows are quantized expert by expert, each with its slice of the importance matrix, as
    llama.cpp's quantizer does (llama_tensor_quantize_impl: a chunk never crosses an expert)."""
    from ramp_cpp.llama.native import quantize_rows

    if needs_imatrix(wt) and name not in (cache.imatrix or {}):
        raise RampError(f"{name}: {wt.name} needs an importance matrix entry for it")
    t = cache.info.tensor(name)
    im = (cache.imatrix or {}).get(name)
    if im is not None:
        if np.size(im) != t.n_expert * t.n_per_row:
            raise RampError(
                f"{name}: its importance matrix entry has {np.size(im)} values, the tensor needs "
                f"{t.n_expert} × {t.n_per_row}"
            )
        im = np.asarray(im, dtype=np.float32).reshape(t.n_expert, t.n_per_row)
    COUNTERS.quant_weights += rows.size
    runs = expert_runs(t, spans if spans is not None else [(0, rows.shape[0])])
    return b"".join(
        quantize_rows(int(wt), rows[a:b], None if im is None else im[e], cache.n_threads) for e, a, b in runs
    )


def blob_bytes(cache: TensorCache, name: str, wt: GGMLQuantizationType) -> bytes:
    """The whole of `name` in written type `wt`, made in memory (`_MEMO` keeps recent ones)."""
    key = (str(cache.directory), name, wt)
    got = _MEMO.pop(key, None)
    if got is None:
        rows = source_rows(cache.src, name, 0, cache.info.tensor(name).n_rows)
        got = quantize_in_memory(cache, name, wt, rows)
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
