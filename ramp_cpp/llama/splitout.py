"""A finished one-file GGUF written again as a split set, for `--split-max-size`: llama.cpp's gguf-split
convention as its loader reads it (tools/gguf-split and `llama_split_path` of the vendored llama.cpp).

- Shard i of N is `PREFIX-0000i-of-0000N.gguf`, PREFIX the output's path less `.gguf`; a set of one is
  still named so, as gguf-split names it (llama.cpp loads it as one file: split.count 1).
- The first shard holds every key of the file, in its order, then `split.no` (u16), `split.count` (u16) and
  `split.tensors.count` (i32); the others hold only those three (and `general.alignment` where the file
  has one, which each shard's own header must give).
- Tensors stay in the file's order, each shard a run of whole tensors, their data copied byte for byte, each
  padded to the alignment; a tensor's offset is relative to its own shard's data.

The size rule is gguf-split's `--split-max-size` (start a new shard when the next tensor would pass the
max; a shard holds at least one tensor, so a tensor larger than the max is alone in a shard over it) with
one difference: gguf-split counts tensor data only, here a shard's whole file (header, tensor infos and
padding included) is kept within the max, so a set made for an upload limit meets it. The first shard's
header (the whole vocabulary) counts against its max too.

Written atomically: every shard under a temp name first, then renamed, the first shard last (a loader
opens the set by its first shard, which appears only once the others are there); then the one file is
removed. Reading the set back is shards.py's.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gguf import GGUFEndian, GGUFValueType, Keys

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import open_file_reader, write_pieces
from ramp_cpp.llama.shards import SPLIT_KEYS, split_count
from ramp_cpp.store.atomic import temp_name
from ramp_cpp.store.cache import SHARD_NAME

#: split.count is a u16 in llama.cpp's loader.
MAX_SHARDS = 65535
_FIXED = 4 + 4 + 8 + 8  # magic, version, tensor count, key count


def shard_path(dst: str | os.PathLike[str], no: int, count: int) -> Path:
    """Shard `no` (from 1) of `count` of the output `dst` (`X.gguf` -> `X-0000no-of-0000count.gguf`)."""
    p = Path(dst)
    return p.with_name(f"{p.name.removesuffix('.gguf')}-{no:05d}-of-{count:05d}.gguf")


def existing_shards(dst: str | os.PathLike[str]) -> list[Path]:
    """Files beside `dst` named as shards of it, of any count."""
    p = Path(dst)
    prefix = p.name.removesuffix(".gguf")
    if not p.parent.is_dir():
        return []
    return sorted(q for q in p.parent.iterdir() if (m := SHARD_NAME.match(q.name)) and m["prefix"] == prefix)


def check_split_output(dst: str | os.PathLike[str], force: bool) -> Path:
    """Refuse, before any work, an output whose shards (of any count) are there without `force`."""
    p = Path(dst)
    if not p.parent.is_dir():
        raise RampError(f"{p.parent}: no such directory")
    there = existing_shards(p)
    if there and not force:
        raise RampError(f"{there[0]} exists (use --force to overwrite)")
    return p


def whole_path(dst: str | os.PathLike[str]) -> Path:
    """Where the one file to be split into `dst`'s shards is written first: a temp name beside `dst`, which
    a killed run's sweep removes."""
    p = Path(dst)
    return p.with_name(temp_name(p.name) + ".whole.gguf")


def plan_shards(infos: Sequence[int], data: Sequence[int], first_header: int, header: int, max_bytes: int,
                alignment: int) -> list[list[int]]:  # fmt: skip
    """Tensor indices per shard: tensor i has `infos[i]` bytes of tensor info and `data[i]` bytes of data
    (padded); a shard's header is `first_header` (the first) or `header` bytes before its infos. A new
    shard starts when the next tensor would take the file past `max_bytes`, never on an empty shard."""
    groups: list[list[int]] = [[]]
    head, body = first_header, 0
    for i, (ni, nd) in enumerate(zip(infos, data, strict=True)):
        size = _pad(head + ni, alignment) + body + nd
        if groups[-1] and size > max_bytes:
            groups.append([])
            head, body = header, 0
        groups[-1].append(i)
        head += ni
        body += nd
    return groups


@dataclass(frozen=True)
class SplitOutput:
    """A written split set: its shards in order, each one's file size, the max asked, the one file's size
    (what a `--size` budget counted) and the tensors alone in a shard over the max."""

    paths: tuple[Path, ...]
    shard_bytes: tuple[int, ...]
    max_bytes: int
    whole_bytes: int
    oversized: tuple[tuple[str, int], ...]  # (tensor, its shard's bytes)

    @property
    def first(self) -> Path:
        return self.paths[0]

    @property
    def one_file_name(self) -> str:
        """The name the set is split from (`X.gguf` for `X-00001-of-0000N.gguf`)."""
        m = SHARD_NAME.match(self.first.name)
        assert m is not None
        return f"{m['prefix']}.gguf"

    def describe(self) -> str:
        """One line: the shards, what they add to the one file, and any shard over the max."""
        extra = sum(self.shard_bytes) - self.whole_bytes
        line = (f"split into {len(self.paths)} shard(s) of at most {self.max_bytes} bytes (load "
                f"{self.first.name}); {sum(self.shard_bytes)} bytes in all, {extra:+d} against one file "
                "(each shard's header)")  # fmt: skip
        if self.oversized:
            name, n = max(self.oversized, key=lambda x: x[1])
            line += (f"; {len(self.oversized)} shard(s) over the max: each holds a tensor that does not fit "
                     f"it alone, as llama.cpp's gguf-split does (largest: {name}, {n} bytes)")  # fmt: skip
        return line

    def to_json(self) -> dict[str, object]:
        return {
            "shards": [p.name for p in self.paths],
            "shard_bytes": list(self.shard_bytes),
            "max_bytes": self.max_bytes,
            "one_file_bytes": self.whole_bytes,
            "oversized": [list(x) for x in self.oversized],
        }


def _pad(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _kv(key: str, vtype: GGUFValueType, fmt: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", int(vtype)) + struct.pack("<" + fmt, value)


def _split_kvs(no: int, count: int, n_tensors: int) -> bytes:
    return (_kv(Keys.Split.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, "H", no)
            + _kv(Keys.Split.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, "H", count)
            + _kv(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, "i", n_tensors))  # fmt: skip


def split_gguf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], max_bytes: int, force: bool = False,
    keep_src: bool = False,
) -> SplitOutput:
    """Write the one-file GGUF `src` as `dst`'s split set (module docstring) with every shard's file within
    `max_bytes` where a single tensor allows; remove `src` unless `keep_src`. With `force` a set already
    named after `dst`, of any count, is replaced (the shards of another count removed)."""
    if max_bytes < 1:
        raise RampError(f"--split-max-size must be a positive size, got {max_bytes} bytes")
    check_split_output(dst, force)
    reader = open_file_reader(src)
    if split_count(reader) > 1:
        raise RampError(f"{src}: already a shard of a split set")
    if reader.endianess != GGUFEndian.LITTLE:
        raise RampError(f"{src}: a big-endian GGUF cannot be split here")
    align = int(reader.alignment)
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    kvs = [f for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in SPLIT_KEYS]
    kv_bytes = b"".join(p.tobytes() for f in kvs for p in f.parts)
    align_kv = reader.fields.get(Keys.General.ALIGNMENT)
    later_kv = b"".join(p.tobytes() for p in align_kv.parts) if align_kv is not None else b""
    tensors = list(reader.tensors)
    n = len(tensors)
    split_len = len(_split_kvs(0, 0, 0))
    infos = [sum(int(p.nbytes) for p in t.field.parts) for t in tensors]
    data = [_pad(int(t.n_bytes), align) for t in tensors]
    groups = plan_shards(infos, data, _FIXED + len(kv_bytes) + split_len, _FIXED + len(later_kv) + split_len,
                         max_bytes, align)  # fmt: skip
    count = len(groups)
    if count > MAX_SHARDS:
        raise RampError(f"--split-max-size {max_bytes} bytes gives {count} shards; llama.cpp reads at most "
                        f"{MAX_SHARDS}")  # fmt: skip
    zeros = bytes(align)
    paths = [shard_path(dst, i + 1, count) for i in range(count)]
    temps = [p.with_name(temp_name(p.name) + ".shard") for p in paths]
    sizes, over = [], []
    try:
        for no, (group, tmp) in enumerate(zip(groups, temps, strict=True)):
            kv = (kv_bytes if no == 0 else later_kv) + _split_kvs(no, count, n)
            n_kv = (len(kvs) if no == 0 else int(align_kv is not None)) + len(SPLIT_KEYS)
            head = [struct.pack("<4sIQQ", b"GGUF", version, len(group), n_kv), kv]
            iov: list[bytes | bytearray | memoryview] = []
            offset = 0
            for i in group:
                t = tensors[i]
                *parts, _ = t.field.parts  # the last part is the offset, relative to this shard's data
                head += [*(p.tobytes() for p in parts), struct.pack("<Q", offset)]
                nb = int(t.n_bytes)
                start = int(t.data_offset)
                iov += [reader.data[start : start + nb].data, zeros[: data[i] - nb]]
                offset += data[i]
            meta = b"".join(head)
            meta += zeros[: -len(meta) % align]
            size = write_pieces(tmp, len(meta) + offset, [meta, *iov], force=True)
            sizes.append(size)
            if size > max_bytes:
                over.append((tensors[group[0]].name, size))
        stale = [q for q in existing_shards(dst) if q not in paths]
        for tmp, p in reversed(list(zip(temps, paths, strict=True))):  # the first shard last
            os.replace(tmp, p)
        for q in stale:  # an earlier set of another count under the same name (force)
            q.unlink(missing_ok=True)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    whole = Path(src).stat().st_size
    del reader
    if not keep_src:
        Path(src).unlink()
    return SplitOutput(tuple(paths), tuple(sizes), max_bytes, whole, tuple(over))


R = TypeVar("R")


def write_split(
    write: Callable[[Path], R], dst: str | os.PathLike[str], max_bytes: int, force: bool = False
) -> tuple[R, SplitOutput]:
    """`write(path)` writes the one file (at a temp name beside `dst`), then it is split into `dst`'s set;
    the one file is gone afterwards, whatever happened. Existing shards are refused before `write` runs."""
    check_split_output(dst, force)
    whole = whole_path(dst)
    try:
        r = write(whole)
        return r, split_gguf(whole, dst, max_bytes, force)
    finally:
        whole.unlink(missing_ok=True)


def move_set(shards: Sequence[Path], dst: str | os.PathLike[str], force: bool = False) -> list[Path]:
    """Rename a written set onto `dst`'s shard names (the names carry no part of the content: llama.cpp
    finds the others from the first's name), the first shard last."""
    check_split_output(dst, force)
    count = len(shards)
    out = [shard_path(dst, i + 1, count) for i in range(count)]
    stale = [q for q in existing_shards(dst) if q not in out]
    for a, b in reversed(list(zip(shards, out, strict=True))):
        os.replace(a, b)
    for q in stale:
        q.unlink(missing_ok=True)
    return out
