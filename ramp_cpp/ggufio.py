"""The one module that reads GGUF files (through gguf-py): the model inventory and tensor data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from .arch import classify
from .errors import RampError
from .ladder import tensor_nbytes


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor. `n_per_row` is ggml's ne[0] (input features of a linear), `n_rows` its ne[1]."""

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
    tensors: tuple[TensorInfo, ...]  # 2-D weights only, in file order
    n_params_total: int  # every tensor, norms included
    other_bytes: int  # bytes of the tensors that are not 2-D weights (norms, biases), copied as they are
    file_type: int | None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

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


def open_reader(path: str | os.PathLike[str]) -> GGUFReader:
    """A GGUFReader, or one RampError line for a missing, foreign or truncated file."""
    p = Path(path)
    if not p.is_file():
        raise RampError(f"{p}: no such file")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RampError(f"{p}: not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged headers
        raise RampError(f"{p}: damaged or truncated GGUF header ({type(e).__name__}: {e})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise RampError(f"{p}: truncated GGUF: tensor {t.name} ends past the end of the file")
    return reader


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_inventory(path: str | os.PathLike[str]) -> ModelInfo:
    reader = open_reader(path)
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise RampError(f"{path}: no general.architecture in the GGUF metadata: not a model file")
    n_blocks = field_value(reader, f"{arch}.block_count")
    if n_blocks is None:
        raise RampError(
            f"{path}: architecture {arch!r} has no {arch}.block_count: not a transformer llama.cpp runs"
        )
    ctx = int(field_value(reader, f"{arch}.context_length", 0) or 0)
    names = {t.name for t in reader.tensors}
    tensors = []
    for t in reader.tensors:
        shape = [int(x) for x in t.shape]
        if len(shape) != 2:
            continue
        role, block = classify(t.name)
        qtype = GGMLQuantizationType(int(t.tensor_type))
        tensors.append(
            TensorInfo(
                name=t.name,
                role=role.name,
                block=block,
                n_per_row=shape[0],
                n_rows=shape[1],
                n_params=int(t.n_elements),
                ggml_type=qtype.name,
                nbytes=tensor_nbytes(qtype, int(t.n_elements)),
                searched=role.searched and block is not None,
                order=role.order,
            )
        )
    if not any(t.searched for t in tensors):
        raise RampError(
            f"{path}: no blk.N.* linear weights found (architecture {arch!r}): nothing ramp-cpp can search"
        )
    data_offset = min((int(t.data_offset) for t in reader.tensors), default=0)
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
        file_size=Path(path).stat().st_size,
        data_offset=data_offset,
        alignment=int(field_value(reader, "general.alignment", 32)),
        tied_output="output.weight" not in names,
        tensors=tuple(tensors),
        n_params_total=sum(int(t.n_elements) for t in reader.tensors),
        other_bytes=sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) != 2),
        file_type=field_value(reader, "general.file_type"),
        metadata=meta,
    )


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list) and len(v) > 16:
        return f"[{len(v)} items]"
    return v


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file; used to key caches (base log-probs, tensor cache) to the exact bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tensor_types(path: str | os.PathLike[str]) -> dict[str, tuple[str, int, int]]:
    """name -> (ggml type name, bytes in file, elements) for every tensor of a GGUF, in file order."""
    reader = open_reader(path)
    return {
        t.name: (GGMLQuantizationType(int(t.tensor_type)).name, int(t.n_bytes), int(t.n_elements))
        for t in reader.tensors
    }


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
