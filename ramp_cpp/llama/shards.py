"""Split GGUFs (llama.cpp's gguf-split convention: `NAME-00001-of-0000N.gguf`, each shard carrying
`split.no`, `split.count` and, in every shard, `split.tensors.count`) read as one model. llama.cpp loads such
a set from its first shard and so does its quantizer; here the shards' gguf-py readers are joined into one
that holds the first shard's metadata (less the split.* keys) and every shard's tensors in order, each
tensor's data a view of its own shard's file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from ramp_cpp.errors import RampError
from ramp_cpp.store.cache import SHARD_NAME

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def shard_paths(first: Path, count: int) -> list[Path]:
    m = SHARD_NAME.match(first.name)
    if m is None:
        raise RampError(f"{first}: split.count is {count}, its name is not NAME-00001-of-{count:05d}.gguf")
    return [first.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _value(reader: GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def split_count(reader: GGUFReader) -> int:
    return int(_value(reader, "split.count") or 1)


@dataclass
class SplitReader:
    """The shards of one model as one gguf-py reader: `fields`, `tensors`, `endianess`, `get_field`, as
    GGUFReader has them. It has no `data` or `data_offset`: byte offsets belong to one shard's file."""

    path: Path
    shards: list[GGUFReader]
    fields: dict[str, Any]
    tensors: list[Any]

    @property
    def endianess(self) -> Any:
        return self.shards[0].endianess

    def get_field(self, key: str) -> Any:
        return self.fields.get(key)

    @property
    def paths(self) -> list[Path]:
        return shard_paths(self.path, len(self.shards))


def join_shards(first: Path, reader: GGUFReader, open_one: Any) -> SplitReader:
    """The split set whose first shard is `first` (already opened as `reader`), each other shard opened by
    `open_one(path)`; one RampError line for a later shard given, a missing shard, or shards of two models."""
    count = split_count(reader)
    no = int(_value(reader, "split.no") or 0)
    paths = shard_paths(first, count)
    if no != 0:
        raise RampError(f"{first} is shard {no + 1} of {count}: give the first one, {paths[0].name}")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RampError(f"{first}: split set of {count} is missing {', '.join(missing)}")
    want_tensors = _value(reader, "split.tensors.count")
    arch = _value(reader, "general.architecture")
    readers = [reader]
    for i, p in enumerate(paths[1:], start=1):
        r = open_one(p)
        got = (split_count(r), int(_value(r, "split.no") or 0), _value(r, "split.tensors.count"))
        if got != (count, i, want_tensors):
            raise RampError(
                f"{p.name} is not shard {i + 1} of {first.name}'s set (its split.count/no/tensors.count are "
                f"{got[0]}/{got[1]}/{got[2]}, expected {count}/{i}/{want_tensors}): shards of two models?"
            )
        other = _value(r, "general.architecture")
        if other is not None and other != arch:
            raise RampError(f"{p.name} is a {other} shard, {first.name} a {arch} one: shards of two models")
        readers.append(r)
    tensors = [t for r in readers for t in r.tensors]
    names = [t.name for t in tensors]
    if want_tensors is not None and len(tensors) != int(want_tensors):
        raise RampError(f"{first.name}'s set holds {len(tensors)} tensors, its split.tensors.count says "
                        f"{want_tensors}: shards of two models?")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RampError(f"{first.name}'s set holds tensor {dup} twice: shards of two models?")
    fields = {k: f for k, f in reader.fields.items() if k not in SPLIT_KEYS}
    return SplitReader(first, readers, fields, tensors)


def merged_header_bytes(reader: SplitReader | GGUFReader, alignment: int) -> int:
    """Where tensor data would start in the one-file model: the header (GGUF.* fields), every key but the
    split ones and every tensor's info, padded to `alignment`. For an unsplit file it is its data_offset."""
    n = sum(int(p.nbytes) for f in reader.fields.values() for p in f.parts)
    n += sum(int(p.nbytes) for t in reader.tensors for p in t.field.parts)
    n += 4  # the magic, which gguf-py keeps out of its fields
    return n + (-n % alignment)


def iter_shard_stats(path: str | os.PathLike[str]) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of `path` and, for a first shard by name, of its siblings that exist: what a
    cache of the parsed set must be keyed by."""
    p = Path(path)
    m = SHARD_NAME.match(p.name)
    paths = [p] if m is None or int(m["no"]) != 1 else shard_paths(p, int(m["count"]))
    for q in paths:
        try:
            st = q.stat()
        except OSError:
            continue
        yield str(q.resolve()), st.st_size, st.st_mtime_ns
