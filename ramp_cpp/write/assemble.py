"""A GGUF assembled from the tensor cache's bytes: the file `quantize_map(src, dst, types, base=cache.base)`
writes, header included, put together in a fraction of a second instead of re-running llama.cpp's quantizer.

Two GGUFs llama.cpp's quantizer writes from one source differ only in general.file_type and in each tensor's
type and data offset (ggufio's header template), so a type map is assembled by patching those fields and
laying the chosen bytes out at the alignment. `same_file` compares an assembly with a file llama.cpp wrote
without writing it: the tensor cache checks every type it adds this way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import file_equals, template_pieces, write_pieces
from ramp_cpp.llama.quantize import complete_map, file_type_for
from ramp_cpp.model.ladder import written_type
from ramp_cpp.write.cachefiles import Blob, TensorCache, as_type, blob_bytes, has_bytes, mapped


@dataclass(frozen=True)
class AssembleResult:
    path: str
    file_size: int
    seconds: float


@contextmanager
def pieces(
    cache: TensorCache, types: Mapping[str, str | GGMLQuantizationType]
) -> Iterator[tuple[int, list[bytes | bytearray | memoryview]]]:
    """The file `assemble` writes for `types`, as its size and buffers (views of the cache's maps, valid
    inside the block only)."""
    info = cache.info
    full = complete_map(info, {n: as_type(t) for n, t in types.items()}, cache.base)
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
    maps = {f: memoryview(mapped(cache.directory / f)) for f in files}
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
        # no view may outlive this block: `mapped` closes maps it evicts
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
    with pieces(cache, types) as (size, iov):
        write_pieces(dst, size, iov, force, recycle)
    return AssembleResult(str(dst), size, time.perf_counter() - t0)


def same_file(cache: TensorCache, types: Mapping[str, GGMLQuantizationType], ref: Path) -> None:
    """The assembled file for `types` must equal llama.cpp's own (`ref`), header and padding included;
    compared piece by piece, so the check writes nothing (at 7B a second copy would be gigabytes)."""
    with pieces(cache, types) as (size, iov):
        same = file_equals(ref, size, iov)
    if not same:
        raise RampError(
            f"assembled file differs from llama.cpp's quantization of {cache.info.path}: "
            "this GGUF layout is not supported by the tensor cache"
        )
