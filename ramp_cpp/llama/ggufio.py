"""The one module that reads and writes GGUF files (through gguf-py): the model inventory, tensor data,
and modified copies of a model."""

from __future__ import annotations

import functools
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_reader import ReaderField

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.shards import SplitReader, iter_shard_stats, join_shards, merged_header_bytes, split_count
from ramp_cpp.model.arch import classify
from ramp_cpp.model.archnames import LLAMA_ARCHS
from ramp_cpp.model.ladder import tensor_nbytes
from ramp_cpp.store.atomic import atomic_path


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor. `n_per_row` is ggml's ne[0] (input features of a linear), `n_rows` its ne[1], times
    ne[2] for an expert tensor (3-D, `n_expert` slices of n_rows / n_expert rows each, one after another:
    the rows llama.cpp's quantizer walks, expert e's with its own imatrix slice)."""

    name: str
    role: str
    block: int | None
    n_per_row: int
    n_rows: int
    n_params: int
    ggml_type: str
    nbytes: int
    searched: bool
    order: int  # visiting order within the block (arch.Role.order)
    n_expert: int = 1  # ne[2] of an expert tensor; 1 for a 2-D weight

    @property
    def rows_per_expert(self) -> int:
        return self.n_rows // self.n_expert

    @property
    def shape(self) -> tuple[int, ...]:
        """ggml's ne: (n_per_row, rows) or, for an expert tensor, (n_per_row, rows per expert, n_expert)."""
        if self.n_expert > 1:
            return (self.n_per_row, self.rows_per_expert, self.n_expert)
        return (self.n_per_row, self.n_rows)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    arch: str
    n_blocks: int
    context_length: int
    file_size: int
    data_offset: int
    alignment: int
    tied_output: bool
    tensors: tuple[TensorInfo, ...]  # 2-D weights and 3-D expert weights, in file order
    n_params_total: int  # every tensor, norms included
    other_bytes: int  # bytes of the tensors that are not in `tensors` (norms, biases), copied as they are
    file_type: int | None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    n_expert: int = 0  # `{arch}.expert_count`: experts per MoE block (0 for a dense model)
    n_expert_used: int = 0  # `{arch}.expert_used_count`: experts each token is routed to

    @property
    def searched(self) -> tuple[TensorInfo, ...]:
        """The tensors the policy visits, in model order: block by block, q k v o gate up down."""
        ts = [t for t in self.tensors if t.searched]
        return tuple(sorted(ts, key=lambda t: (t.block if t.block is not None else -1, t.order)))

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise RampError(f"{self.path}: no tensor named {name!r}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("metadata")
        return d


#: metadata arrays that only the tokenizer reads (ModelInfo.metadata leaves them out). gguf-py parses an array
#: element by element into numpy views: a 151,936-token vocabulary with its types and merges is ~450k
#: elements, 40 s of a loaded machine's time for every reader of a Qwen model's header.
TOKENIZER_ARRAYS = "tokenizer.ggml."


class HeaderReader(GGUFReader):
    """gguf-py's reader with the tokenizer's arrays (keys under TOKENIZER_ARRAYS) stepped over, not parsed:
    each such field keeps its key and the bytes of its value (one uint8 view, so that header sizes still add
    up: shards.merged_header_bytes) but no types, so its `contents()` is None. Everything else is gguf-py's
    own parse."""

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            klen, kdata = self._get_str(offs)
            key = str(bytes(kdata), encoding="utf-8")
            at = offs + int(klen.nbytes + kdata.nbytes)
            ktype = self._get(at, np.uint32)
            end = None
            if key.startswith(TOKENIZER_ARRAYS) and int(ktype[0]) == GGUFValueType.ARRAY:
                end = self._array_end(at + 4)
            if end is None:
                offs = super()._build_fields(offs, 1)
                continue
            itype, alen = self._get(at + 4, np.uint32), self._get(at + 8, np.uint64)
            body = self._get(at + 16, np.uint8, end - at - 16)
            self._push_field(ReaderField(offs, key, [klen, kdata, ktype, itype, alen, body], [], []), True)
            offs = end
        return offs

    def _array_end(self, offs: int) -> int | None:
        """Where the array value at `offs` (u32 element type, u64 count, elements) ends; None for an array of
        arrays, left to gguf-py."""
        itype = GGUFValueType(int(self._get(offs, np.uint32)[0]))
        n = int(self._get(offs + 4, np.uint64)[0])
        start = offs = offs + 12
        scalar = self.gguf_scalar_to_np.get(itype)
        if scalar is not None:
            end = offs + n * np.dtype(scalar).itemsize
        elif itype == GGUFValueType.STRING:  # u64 length, bytes: only the lengths are read
            little = (sys.byteorder == "little") == (self.byte_order == "I")
            length = struct.Struct("<Q" if little else ">Q").unpack_from
            buf = self.data.data  # the memmap's buffer: struct reads it without a numpy view per string
            for _ in range(n):
                offs += 8 + length(buf, offs)[0]
            end = offs
        else:
            return None
        if end > len(self.data):
            raise ValueError(f"the array at offset {start} runs past the end of the file")
        return end


def open_reader(path: str | os.PathLike[str], tokenizer: bool = True) -> GGUFReader | SplitReader:
    """The model's reader: a GGUFReader, or for the first shard of a split set (shards.py) the shards joined
    as one; one RampError line for a missing, foreign or truncated file, a missing or foreign shard.
    `tokenizer=False`: a HeaderReader, for what needs no tokenizer array (seconds less on a big vocab)."""
    reader = open_file_reader(path, tokenizer)
    if split_count(reader) > 1:
        return join_shards(Path(path), reader, functools.partial(open_file_reader, tokenizer=tokenizer))
    return reader


def open_file_reader(path: str | os.PathLike[str], tokenizer: bool = True) -> GGUFReader:
    """A GGUFReader of this one file (a HeaderReader without `tokenizer`), or one RampError line for a
    missing, foreign or truncated file."""
    p = Path(path)
    if not p.is_file():
        raise RampError(f"{p}: no such file")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RampError(f"{p}: not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(p) if tokenizer else HeaderReader(p)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged headers
        raise RampError(f"{p}: damaged or truncated GGUF header ({type(e).__name__}: {e})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise RampError(f"{p}: truncated GGUF: tensor {t.name} ends past the end of the file")
    return reader


def field_value(reader: GGUFReader | SplitReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_inventory(path: str | os.PathLike[str]) -> ModelInfo:
    """The model's inventory; parsed once per file version (path, size, mtime) in a process, since one run
    asks for it from every stage."""
    p = Path(path)
    try:
        p.stat()
    except OSError:
        return _read_inventory(path)  # open_reader's one-line error for a missing file
    # keyed by every shard's (path, size, mtime) for a split set
    info = _inventory_of(str(p.resolve()), tuple(iter_shard_stats(p)))
    return info if info.path == str(path) else replace(info, path=str(path))


@functools.lru_cache(maxsize=32)
def _inventory_of(path: str, versions: tuple[tuple[str, int, int], ...]) -> ModelInfo:
    return _read_inventory(path)


def _read_inventory(path: str | os.PathLike[str], tokenizer: bool = False) -> ModelInfo:
    """`tokenizer`: parse the tokenizer's arrays too (gguf-py's reader); the inventory never reads them."""
    reader = open_reader(path, tokenizer)
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise RampError(f"{path}: no general.architecture in the GGUF metadata: not a model file")
    if arch not in LLAMA_ARCHS:
        raise RampError(
            f"{path}: architecture {arch!r} is not one the llama.cpp of llama-cpp-python 0.3.36 can load"
        )
    n_blocks = field_value(reader, f"{arch}.block_count")
    if n_blocks is None:
        raise RampError(
            f"{path}: architecture {arch!r} has no {arch}.block_count: not a transformer llama.cpp runs"
        )
    ctx = int(field_value(reader, f"{arch}.context_length", 0) or 0)
    n_expert = int(field_value(reader, f"{arch}.expert_count", 0) or 0)
    # the multi-token-prediction blocks some checkpoints carry last: llama.cpp's evaluation never runs them
    n_run = int(n_blocks) - int(field_value(reader, f"{arch}.nextn_predict_layers", 0) or 0)
    names = {t.name for t in reader.tensors}
    tensors = [_weight(path, arch, t, n_expert, n_run) for t in reader.tensors if len(t.shape) in (2, 3)]
    if not any(t.searched for t in tensors):
        raise RampError(
            f"{path}: no blk.N.* linear weights found (architecture {arch!r}): nothing ramp-cpp can search"
        )
    alignment = int(field_value(reader, "general.alignment", 32))
    if isinstance(reader, SplitReader):  # sizes as the one-file model has them: what a budget counts
        data_offset = merged_header_bytes(reader, alignment)
        file_size = data_offset + sum(int(t.n_bytes) + (-int(t.n_bytes) % alignment) for t in reader.tensors)
    else:
        data_offset = min((int(t.data_offset) for t in reader.tensors), default=0)
        file_size = Path(path).stat().st_size
    meta = {
        k: _plain(f.contents())
        for k, f in reader.fields.items()
        if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")
    }
    return ModelInfo(
        path=str(path),
        arch=str(arch),
        n_blocks=int(n_blocks),
        context_length=ctx,
        file_size=file_size,
        data_offset=data_offset,
        alignment=alignment,
        tied_output="output.weight" not in names,
        tensors=tuple(tensors),
        n_params_total=sum(int(t.n_elements) for t in reader.tensors),
        other_bytes=sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) not in (2, 3)),
        file_type=field_value(reader, "general.file_type"),
        metadata=meta,
        n_expert=n_expert,
        n_expert_used=int(field_value(reader, f"{arch}.expert_used_count", 0) or 0),
    )


def _weight(path: str | os.PathLike[str], arch: str, t: Any, n_expert: int, n_run: int) -> TensorInfo:
    """The inventory record of one 2-D or 3-D tensor; one line for a 3-D tensor that is not the experts of
    `n_expert` the metadata declares (llama.cpp would refuse to load it)."""
    shape = [int(x) for x in t.shape]
    role, block = classify(t.name)
    if len(shape) == 3 and not (role.experts and shape[2] == n_expert):
        have = f"{arch}.expert_count = {n_expert}" if n_expert else f"no {arch}.expert_count"
        what = f"{shape[2]} experts" if role.experts else f"a 3-D tensor of role {role.name!r}"
        raise RampError(f"{path}: {t.name} holds {what}, the metadata has {have}")
    qtype = GGMLQuantizationType(int(t.tensor_type))
    return TensorInfo(
        name=t.name,
        role=role.name,
        block=block,
        n_per_row=shape[0],
        n_rows=shape[1] * (shape[2] if len(shape) == 3 else 1),
        n_params=int(t.n_elements),
        ggml_type=qtype.name,
        nbytes=tensor_nbytes(qtype, int(t.n_elements)),
        searched=role.searched and block is not None and block < n_run,
        order=role.order,
        n_expert=shape[2] if len(shape) == 3 else 1,
    )


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list) and len(v) > 16:
        return f"[{len(v)} items]"
    return v



def tensor_types(path: str | os.PathLike[str]) -> dict[str, tuple[str, int, int]]:
    """name -> (ggml type name, bytes in file, elements) for every tensor of a GGUF, in file order."""
    reader = open_reader(path, tokenizer=False)
    return {
        t.name: (GGMLQuantizationType(int(t.tensor_type)).name, int(t.n_bytes), int(t.n_elements))
        for t in reader.tensors
    }


def weight_moments(path: str | os.PathLike[str], names: list[str]) -> dict[str, tuple[float, float]]:
    """name -> (std(W), mean |W|) over every element, for layer-embedding dims 4-5 (paper Table 24).
    Quantized tensors are dequantized through gguf-py first."""
    from gguf.quants import dequantize

    reader = open_reader(path, tokenizer=False)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for n in names:
        t = by_name.get(n)
        if t is None:
            raise RampError(f"{path}: no tensor named {n!r}")
        qtype = GGMLQuantizationType(int(t.tensor_type))
        w = np.asarray(t.data)
        w = w.astype(np.float32) if qtype in _FLOAT_TYPES else dequantize(w, qtype)
        w64 = w.astype(np.float64).reshape(-1)
        out[n] = (float(w64.std()), float(np.abs(w64).mean()))
    return out


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def read_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A llama.cpp importance matrix in its GGUF format (`<tensor>.in_sum2`, `<tensor>.counts`) as the
    per-column mean of x^2 that llama_model_quantize takes (sum / count; 1 where nothing was counted),
    the normalisation llama-quantize's load_imatrix applies."""
    reader = open_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in by_name.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = by_name.get(base + ".counts")
        if c is None:
            raise RampError(f"{path}: imatrix entry {base} has sums but no counts")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
        counts = np.asarray(c.data, dtype=np.float32).reshape(-1)
        ne0 = sums.size // counts.size
        v = sums.reshape(counts.size, ne0) / np.where(counts > 0, counts, 1.0)[:, None]
        v[counts <= 0] = 1.0
        out[base] = v.reshape(-1)
    if not out:
        raise RampError(f"{path}: no imatrix entries (*.in_sum2) in this GGUF")
    return out


# -- writing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRewrite:
    """New values for one tensor of a copied GGUF. `fn` takes the tensor's values as float32 in numpy order
    (shape (ne1, ne0) for a matrix: one row per output, one column per input) and returns the values
    to store, same shape, written as `ggml_type` (F32, F16 or BF16)."""

    ggml_type: GGMLQuantizationType
    fn: Callable[[np.ndarray], np.ndarray]


#: Tensor types a rewrite reads and writes: plain floats, converted exactly by gguf.quants.
REWRITABLE = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

#: GGUF value type of a new metadata value, by its Python type (bool first: bool is an int); ints are
#: UINT32 when they fit, else INT64.
_KV_TYPES: tuple[tuple[type, GGUFValueType], ...] = (
    (bool, GGUFValueType.BOOL),
    (int, GGUFValueType.UINT32),
    (float, GGUFValueType.FLOAT32),
    (str, GGUFValueType.STRING),
)

def _scalar_type(key: str, values: list[Any]) -> GGUFValueType:
    for py, vt in _KV_TYPES:
        if values and all(isinstance(v, py) for v in values):
            if vt == GGUFValueType.UINT32 and not all(0 <= v < 2**32 for v in values):
                return GGUFValueType.INT64
            return vt
    raise RampError(f"metadata {key}: values must all be bool, int, float or str")


def _kv_item(key: str, value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array element type) of a new metadata value; numpy scalars become Python ones."""
    if isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        sub = _scalar_type(key, items) if items else GGUFValueType.STRING
        return items, GGUFValueType.ARRAY, sub
    v = value.item() if isinstance(value, np.generic) else value
    return v, _scalar_type(key, [v]), None


def rewrite_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    rewrites: Mapping[str, TensorRewrite],
    set_kv: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> Path:
    """Copy `src` to `dst` (temp file, then rename) with `rewrites` applied to the named tensors and the
    metadata keys `set_kv` (bool, int, float, str, or lists of one of them) added or replaced. Every
    other key keeps its GGUF type and
    value, every other tensor its type and bytes, all in the source's order. Tensors are streamed one at a
    time, so memory stays at one tensor. `progress(done, total)` counts tensors written. `keep(name)`: the
    tensors copied (default all; the others are left out, e.g. a model's last blocks with block_count cut)."""
    reader = open_reader(src)
    tensors = [t for t in reader.tensors if keep is None or keep(t.name)]
    if reader.endianess != GGUFEndian.LITTLE and rewrites:
        raise RampError(f"{src}: a big-endian GGUF cannot be rewritten")
    by_name = {t.name: t for t in reader.tensors}
    for name, want in rewrites.items():
        t = by_name.get(name)
        if t is None:
            raise RampError(f"{src}: no tensor named {name!r}")
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if qtype not in REWRITABLE or want.ggml_type not in REWRITABLE:
            raise RampError(f"{src}: {name} is {qtype.name}; only F32/F16/BF16 tensors can be rewritten")
    new_kv = dict(set_kv or {})
    arch = str(field_value(reader, "general.architecture", ""))
    with atomic_path(dst, force) as tmp:
        w = GGUFWriter(tmp, arch)
        w.data_alignment = int(field_value(reader, "general.alignment", w.data_alignment))
        for f in reader.fields.values():
            # GGUF.* are the reader's view of the header; the writer adds general.architecture itself
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            if f.name in new_kv:
                w.add_key_value(f.name, *_kv_item(f.name, new_kv.pop(f.name)))
                continue
            vtype = f.types[0]
            if vtype == GGUFValueType.ARRAY and len(f.types) > 2:
                raise RampError(f"{src}: metadata {f.name} is a nested array, which this copy cannot keep")
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for k, v in new_kv.items():
            w.add_key_value(k, *_kv_item(k, v))
        for t in tensors:
            rw = rewrites.get(t.name)
            if rw is None:
                w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            else:
                shape = tuple(int(x) for x in reversed(t.shape))  # numpy order of ggml's ne
                nbytes = tensor_nbytes(rw.ggml_type, int(t.n_elements))
                w.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, rw.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            rw = rewrites.get(t.name)
            if rw is None:
                w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            else:
                w.write_tensor_data(_rewritten(t, rw))
            if progress:
                progress(i + 1, len(tensors))
        w.close()
    return Path(dst)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a derived GGUF (`derive_gguf`). `make(get)` returns its values in numpy order `shape`
    (float32), written as `ggml_type` (F32, F16 or BF16); `get(name)` reads a tensor of the source as float32
    in numpy order. Without `make`, the source's tensor `name` is copied as it is (type and bytes)."""

    name: str
    make: Callable[[Callable[[str], np.ndarray]], np.ndarray] | None = None
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32
    shape: tuple[int, ...] = ()


def derive_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    tensors: Sequence[OutTensor],
    set_kv: Mapping[str, Any] | None = None,
    arch: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `dst` (temp file, then rename): the metadata of `src` with `set_kv` added or replaced, and the
    tensors `tensors` in that order, each made or copied. Unlike `rewrite_gguf` a tensor may be new, change
    shape or go away (one not named is left out), which is what padding a model or turning its FFN into
    experts needs. `arch`: the copy's general.architecture; every `<old arch>.*` key is renamed with it. Each
    tensor is made only when it is written, so memory stays at about one tensor."""
    reader = open_reader(src)
    if reader.endianess != GGUFEndian.LITTLE:
        raise RampError(f"{src}: a big-endian GGUF cannot be rewritten")
    by_name = {t.name: t for t in reader.tensors}
    for o in tensors:
        if o.make is None and o.name not in by_name:
            raise RampError(f"{src}: no tensor named {o.name!r} to copy")
        if o.make is not None and o.ggml_type not in REWRITABLE:
            raise RampError(f"{o.name}: a made tensor is written as F32, F16 or BF16, not {o.ggml_type.name}")
    old_arch = str(field_value(reader, "general.architecture", ""))
    new_arch = arch or old_arch

    def renamed(key: str) -> str:
        return new_arch + key[len(old_arch):] if key.startswith(old_arch + ".") else key

    def get(name: str) -> np.ndarray:
        t = by_name.get(name)
        if t is None:
            raise RampError(f"{src}: no tensor named {name!r}")
        from gguf.quants import dequantize

        shape = tuple(int(x) for x in reversed(t.shape))
        return dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type))).reshape(shape)

    new_kv = dict(set_kv or {})
    with atomic_path(dst, force) as tmp:
        w = GGUFWriter(tmp, new_arch)
        w.data_alignment = int(field_value(reader, "general.alignment", w.data_alignment))
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            key = renamed(f.name)
            if key in new_kv:
                w.add_key_value(key, *_kv_item(key, new_kv.pop(key)))
                continue
            vtype = f.types[0]
            if vtype == GGUFValueType.ARRAY and len(f.types) > 2:
                raise RampError(f"{src}: metadata {f.name} is a nested array, which this copy cannot keep")
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)
        for k, v in new_kv.items():
            w.add_key_value(k, *_kv_item(k, v))
        for o in tensors:
            if o.make is None:
                t = by_name[o.name]
                w.add_tensor_info(o.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            else:
                n = int(np.prod(o.shape))
                nbytes = tensor_nbytes(o.ggml_type, n)
                w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), nbytes, o.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from gguf.quants import quantize

        for i, o in enumerate(tensors):
            if o.make is None:
                w.write_tensor_data(by_name[o.name].data, tensor_endianess=reader.endianess)
            else:
                y = np.asarray(o.make(get), dtype=np.float32)
                if y.shape != o.shape:
                    raise RampError(f"{o.name}: made with shape {y.shape}, declared {o.shape}")
                w.write_tensor_data(quantize(y, o.ggml_type))
            if progress:
                progress(i + 1, len(tensors))
        w.close()
    return Path(dst)


def add_metadata(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    meta: Mapping[str, Any],
    force: bool = False,
) -> Path:
    """Copy any GGUF (quantized or not) to `dst` with the metadata keys `meta` added or replaced; tensors and
    other keys are copied as they are (`rewrite_gguf` without rewrites)."""
    return rewrite_gguf(src, dst, {}, meta, force=force)


def _rewritten(t: Any, rw: TensorRewrite) -> np.ndarray:
    from gguf.quants import dequantize, quantize

    shape = tuple(int(x) for x in reversed(t.shape))
    x = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type))).reshape(shape)
    y = np.asarray(rw.fn(x.astype(np.float32, copy=False)), dtype=np.float32)
    if y.shape != shape:
        raise RampError(f"rewrite of {t.name} returned shape {y.shape}, the tensor is {shape}")
    return quantize(y, rw.ggml_type)


# -- assembly ---------------------------------------------------------------------------------------------
# Two GGUFs that llama.cpp's quantizer writes from one source differ only in general.file_type, in each
# tensor's type and in each tensor's data offset: fixed-width fields of the metadata. So the metadata of one
# such file is a template that any other type assignment patches in place (write/assemble.py).


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a header template: where its u32 ggml type and its u64 data offset (relative to the
    data section) sit in the template's bytes."""

    name: str
    n_elements: int
    ggml_type: int  # its type in the template file
    type_pos: int
    offset_pos: int


@dataclass(frozen=True)
class HeaderTemplate:
    meta: bytes  # every byte before the data section: header, KVs, tensor infos, padding to the alignment
    alignment: int
    file_type_pos: int  # position of general.file_type's u32 value in `meta`
    tensors: tuple[TensorSlot, ...]  # in file order


def read_header_template(path: str | os.PathLike[str]) -> HeaderTemplate:
    """The metadata of a GGUF written by llama.cpp's quantizer, with the positions of its patchable fields."""
    reader = _one_file(path)
    if reader.endianess != GGUFEndian.LITTLE:
        raise RampError(f"{path}: a big-endian GGUF cannot serve as a header template")
    ft = reader.get_field("general.file_type")
    if ft is None or ft.types != [GGUFValueType.UINT32]:
        raise RampError(f"{path}: no u32 general.file_type: not written by llama.cpp's quantizer")
    slots = []
    for t in reader.tensors:
        # a tensor info is: name length, name, n_dims, dims, type (u32), offset (u64)
        type_pos = int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:-2])
        slots.append(TensorSlot(t.name, int(t.n_elements), int(t.tensor_type), type_pos, type_pos + 4))
    return HeaderTemplate(
        meta=bytes(reader.data[: reader.data_offset]),
        alignment=int(reader.alignment),
        file_type_pos=int(ft.offset) + sum(int(p.nbytes) for p in ft.parts[:-1]),
        tensors=tuple(slots),
    )


def _one_file(path: str | os.PathLike[str]) -> GGUFReader:
    """A reader of an unsplit GGUF (byte offsets are read from it), or one RampError line. Its tokenizer
    arrays are stepped over (HeaderReader): the header template copies the header's bytes as they are, and
    the tensors' places are the full parse's."""
    reader = open_file_reader(path, tokenizer=False)
    if split_count(reader) > 1:
        raise RampError(f"{path}: a split GGUF, where one file is needed here")
    return reader


def extract_tensors(
    src: str | os.PathLike[str], names: list[str], dst: str | os.PathLike[str], force: bool = False
) -> dict[str, tuple[int, int, int]]:
    """Copy the data of the named tensors of GGUF `src` back to back into the flat file `dst`;
    return name -> (ggml type, offset in `dst`, bytes)."""
    reader = _one_file(src)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    offset = 0
    with atomic_path(dst, force) as tmp, open(tmp, "wb") as f:
        for name in names:
            t = by_name.get(name)
            if t is None:
                raise RampError(f"{src}: no tensor named {name!r}")
            start = int(t.data_offset)
            f.write(reader.data[start : start + int(t.n_bytes)].data)
            out[name] = (int(t.tensor_type), offset, int(t.n_bytes))
            offset += int(t.n_bytes)
    return out


def write_from_template(
    dst: str | os.PathLike[str],
    template: HeaderTemplate,
    file_type: int,
    types: list[int],
    data: list[memoryview],
    force: bool = False,
    recycle: bool = False,
) -> int:
    """Write (temp file, then rename) the GGUF that is `template` with general.file_type = `file_type` and
    tensor i of type `types[i]` holding the bytes `data[i]`; return its size. The layout is the one
    llama.cpp's quantizer writes: offset_i = sum over j < i of pad(nbytes_j), each tensor followed by
    pad(nbytes_i) - nbytes_i zero bytes, pad(n) = n rounded up to `template.alignment`.

    `recycle` (with `force`) moves an existing `dst` to the temp name and overwrites its pages in place,
    which on tmpfs saves allocating and freeing them (about 2x faster); only for a `dst` that nothing maps
    any more (a llama.cpp model loaded from it must be closed), as its old bytes change under a mapping."""
    size, iov = template_pieces(template, file_type, types, data)
    return write_pieces(dst, size, iov, force, recycle)


def write_pieces(
    dst: str | os.PathLike[str], size: int, iov: list[bytes | bytearray | memoryview], force: bool = False,
    recycle: bool = False,
) -> int:
    """Write the buffers `iov` (`size` bytes in all) as the file `dst` (temp file, then rename; `recycle`:
    see write_from_template); return `size`."""
    with atomic_path(dst, force) as tmp:
        reuse = recycle and force and Path(dst).is_file() and not Path(dst).is_symlink()
        if reuse:
            os.replace(dst, tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (0 if reuse else os.O_TRUNC), 0o644)
        try:
            _writev_all(fd, iov)
            if reuse:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return size


def template_pieces(
    template: HeaderTemplate, file_type: int, types: list[int], data: list[memoryview]
) -> tuple[int, list[bytes | bytearray | memoryview]]:
    """The file `write_from_template` writes, as its size and the buffers that make it up in order."""
    n = len(template.tensors)
    if len(types) != n or len(data) != n:
        raise RampError(f"template has {n} tensors, got {len(types)} types and {len(data)} blobs")
    zeros = bytes(template.alignment)
    meta = bytearray(template.meta)
    meta[template.file_type_pos : template.file_type_pos + 4] = int(file_type).to_bytes(4, "little")
    iov: list[bytes | bytearray | memoryview] = [meta]
    offset = 0
    for slot, t, blob in zip(template.tensors, types, data, strict=True):
        nbytes = tensor_nbytes(GGMLQuantizationType(t), slot.n_elements)
        if blob.nbytes != nbytes:
            raise RampError(
                f"{slot.name}: {blob.nbytes} bytes given, {GGMLQuantizationType(t).name} needs {nbytes}"
            )
        meta[slot.type_pos : slot.type_pos + 4] = int(t).to_bytes(4, "little")
        meta[slot.offset_pos : slot.offset_pos + 8] = offset.to_bytes(8, "little")
        pad = -nbytes % template.alignment
        iov.append(blob)
        if pad:
            iov.append(zeros[:pad])
        offset += nbytes + pad
    return len(meta) + offset, iov


def file_equals(
    path: str | os.PathLike[str], size: int, pieces: list[bytes | bytearray | memoryview]
) -> bool:
    """Whether the file at `path` is exactly the concatenation of `pieces` (`size` bytes in all), read in
    step with them: comparing an assembly with llama.cpp's file needs no second copy on disk."""
    if Path(path).stat().st_size != size:
        return False
    with open(path, "rb") as f:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for a in range(0, view.nbytes, 1 << 24):
                part = view[a : a + (1 << 24)]
                if f.read(part.nbytes) != part:
                    return False
    return True


def _writev_all(fd: int, bufs: list[bytes | bytearray | memoryview]) -> None:
    """os.writev over any number of buffers (IOV_MAX per call), resuming after short writes."""
    iov_max = min(os.sysconf("SC_IOV_MAX"), 1024)
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        batch = views[i : i + iov_max]
        done = os.writev(fd, batch)
        for v in batch:
            if done < v.nbytes:
                views[i] = v[done:]
                break
            done -= v.nbytes
            i += 1


def write_imatrix_gguf(
    stats: Mapping[str, InputStats], path: str | os.PathLike[str], *, dataset: str, chunk_count: int,
    chunk_size: int, force: bool = False,
) -> Path:
    """Write `stats` as a llama.cpp importance matrix in llama-imatrix's GGUF format (save_imatrix in
    tools/imatrix/imatrix.cpp): per tensor `<name>.in_sum2` (F32, ne = [n_in, 1]: sum of x^2 per input
    column; [n_in, n_expert] for an expert tensor) and `<name>.counts` (F32, ne = [1, 1]: rows accumulated;
    [1, n_expert], the rows routed to each expert), tensors sorted by name, and the KVs
    general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size.

    Like llama-imatrix, only blk.* weights and output.weight (its --process-output) are written; a tied head
    measured as token_embd.weight is left out, since llama-quantize would apply it to the embedding table.
    llama-quantize then uses in_sum2 / counts."""
    from gguf import Keys

    names = sorted(n for n in stats if n.startswith("blk.") or n == "output.weight")
    if not names:
        raise RampError("the statistics hold no blk.* tensor: no imatrix to write")
    with atomic_path(path, force) as tmp:
        w = GGUFWriter(str(tmp), arch="")
        # llama-imatrix writes no general.architecture; a model-like key would make tools treat it as one
        w.kv_data[0].pop(Keys.General.ARCHITECTURE, None)
        w.add_type("imatrix")
        w.add_array(Keys.IMatrix.DATASETS, [dataset])
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, chunk_count)
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for n in names:
            s = stats[n]
            # an expert tensor's entry is per expert, as llama-imatrix writes it: in_sum2 ne = [n_in,
            # n_expert], counts ne = [1, n_expert] (rows routed to each expert)
            counts = np.array([s.count]) if s.counts is None else s.counts
            w.add_tensor(f"{n}.in_sum2", s.sum_sq.astype(np.float32).reshape(len(counts), -1))
            w.add_tensor(f"{n}.counts", counts.astype(np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
