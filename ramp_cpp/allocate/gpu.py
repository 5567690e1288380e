"""The second budget of a sized run (`--gpu-size`): what must sit in GPU memory when llama.cpp offloads the
experts to the CPU (`llama-server -ngl 99 -ot exps=CPU`).

`-ot exps=CPU` keeps on the CPU every tensor whose name the regular expression `exps` matches: the 3-D expert
tensors `blk.N.ffn_{gate,up,down,gate_up}_exps.*` (arch.ROLES' `experts=True` roles, their biases too).
Everything else is GPU-resident: attention, shared experts `*_shexp`, the router `ffn_gate_inp`, norms,
embeddings and output. Its bytes, plus the KV cache the user names, must fit the cap:

    Σ padded bytes of every GPU-resident tensor  +  KV bytes  ≤  --gpu-size

A tensor's bytes are its data padded to the file's alignment, as the GGUF holds them (the same unit as the
whole-file `--size`), so the bytes the plan predicts are the bytes the written file holds (`resident_bytes`
reads them back). The KV figure is `--kv-size` as given, or from `--kv-ctx` tokens and the model's metadata at
llama.cpp's default F16 cache (`kv_cache_bytes`), or 0 when neither is named.

`GpuCap` is the cap as the plan resolves it (refusing one that even the smallest types cannot meet);
`GpuBudget` is what an allocator reads: the bytes the searched GPU-resident tensors may take together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.measure.sensitivity import Sensitivity

#: the pattern of `-ot exps=CPU`: a tensor whose name it matches (re.search) is offloaded to the CPU
OFFLOAD_PATTERN = "exps"
#: bytes per cached element: llama.cpp's default cache type, F16, for K and V alike
KV_ELEMENT_BYTES = 2
_MIB = 2**20


def offloaded(name: str) -> bool:
    """True for a tensor `-ot exps=CPU` keeps on the CPU."""
    return re.search(OFFLOAD_PATTERN, name) is not None


def _padded(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class GpuBudget:
    """What an allocator honours besides the whole-file budget: Σ nbytes of the searched tensors named in
    `resident` ≤ `weights_bytes` (the cap less the KV cache and the GPU-resident tensors no allocation
    changes)."""

    weights_bytes: int
    resident: frozenset[str]

    def used(self, sens: Sensitivity, choice: Mapping[str, GGMLQuantizationType]) -> int:
        return sum(t.option(choice[t.name]).nbytes for t in sens.tensors if t.name in self.resident)

    def minimum(self, sens: Sensitivity) -> int:
        return sum(t.options[0].nbytes for t in sens.tensors if t.name in self.resident)

    def check(self, sens: Sensitivity) -> None:
        """Refuse a cap that even every GPU-resident tensor's smallest option exceeds."""
        lo = self.minimum(sens)
        if lo > self.weights_bytes:
            raise RampError(
                f"the GPU-resident searched tensors take at least {lo / _MIB:.3f} MiB at their smallest "
                f"types, over the {self.weights_bytes / _MIB:.3f} MiB --gpu-size leaves them"
            )


@dataclass(frozen=True)
class GpuCap:
    """`--gpu-size` resolved against one model: `cap_bytes` for the GPU-resident tensors and the KV cache
    (`kv_bytes`, said by `kv_from`); `unsearched`: each GPU-resident tensor's bytes when it is not searched
    (its base type, or its own type when llama.cpp never quantizes it), so that `budget` holds for any
    searched set."""

    cap_bytes: int
    kv_bytes: int
    kv_from: str
    unsearched: tuple[tuple[str, int], ...]
    least: int = 0  # the fewest GPU-resident bytes of any allocation (`smallest_resident`)

    def budget(self, sens: Sensitivity) -> GpuBudget:
        names = {t.name for t in sens.tensors}
        fixed = sum(b for n, b in self.unsearched if n not in names)
        resident = frozenset(n for n in names if not offloaded(n))
        return GpuBudget(self.cap_bytes - self.kv_bytes - fixed, resident)

    def settings(self) -> dict[str, Any]:
        """run.json's "gpu": what the run was asked for."""
        return {"cap_bytes": self.cap_bytes, "kv_bytes": self.kv_bytes, "kv_from": self.kv_from}

    def summary(self, resident: int) -> dict[str, Any]:
        """report.json's summary "gpu", with `resident` the written file's GPU-resident bytes."""
        return {
            **self.settings(),
            "offload": f"-ot {OFFLOAD_PATTERN}=CPU",
            "resident_bytes": resident,
            "resident_plus_kv": resident + self.kv_bytes,
        }


def _unsearched(info: Any, cc: Any) -> tuple[tuple[str, int], ...]:
    """Each GPU-resident tensor's padded bytes when it is not searched: the base type where llama.cpp
    quantizes it (the tensor cache's rule), else its own."""
    from ramp_cpp.llama.ggufio import tensor_types
    from ramp_cpp.model.arch import quantizable
    from ramp_cpp.model.ladder import tensor_nbytes, written_type

    weights = {t.name: t for t in info.tensors}
    out = []
    for name, (_, nbytes, _) in tensor_types(info.path).items():
        if offloaded(name):
            continue
        t = weights.get(name)
        if t is not None and quantizable(name, 2):
            nbytes = tensor_nbytes(written_type(cc.base, t.n_per_row), t.n_params)
        out.append((name, _padded(nbytes, info.alignment)))
    return tuple(out)


def smallest_resident(info: Any, cc: Any, have_imatrix: bool = True) -> int:
    """The fewest GPU-resident bytes any allocation of the model of inventory `info` (llama.ggufio.ModelInfo)
    over candidates `cc` can have: every searched resident tensor at its smallest candidate (`have_imatrix`:
    the types that need one count), from the inventory alone."""
    from ramp_cpp.measure.candidates import searched_tensors, tensor_candidates
    from ramp_cpp.model.ladder import tensor_nbytes

    searched = {t.name: t for t in searched_tensors(info, cc.embeddings) if not offloaded(t.name)}
    lo = sum(b for n, b in _unsearched(info, cc) if n not in searched)
    for t in searched.values():
        sizes = [tensor_nbytes(w, t.n_params) for _, w in tensor_candidates(cc, t, have_imatrix)]
        lo += _padded(min(sizes), info.alignment)
    return lo


def gpu_cap(
    info: Any, cc: Any, cap_bytes: int, kv_bytes: int, kv_from: str, have_imatrix: bool = True
) -> GpuCap:
    """The cap for the model of inventory `info` and candidates `cc`; one RampError when the GPU-resident
    tensors at their smallest candidate types plus the KV cache exceed it (before any work)."""
    least = smallest_resident(info, cc, have_imatrix)
    cap = GpuCap(cap_bytes, kv_bytes, kv_from, _unsearched(info, cc), least)
    lo = kv_bytes + least
    if lo > cap_bytes:
        raise RampError(
            f"--gpu-size {cap_bytes / _MIB:.2f} MiB cannot hold this model's GPU-resident tensors (all but "
            f"the experts -ot {OFFLOAD_PATTERN}=CPU offloads) at their smallest types plus the KV cache: "
            f"{lo / _MIB:.2f} MiB at least ({kv_bytes / _MIB:.2f} MiB of it KV, {kv_from})"
        )
    return cap


def kv_cache_bytes(path: str | os.PathLike[str], n_ctx: int) -> int:
    """Bytes of llama.cpp's F16 KV cache for `n_ctx` tokens: Σ over layers of n_ctx · n_head_kv ·
    (key_length + value_length) · 2, with key/value_length defaulting to n_embd / n_head as llama.cpp's loader
    does. Refused (name --kv-size instead) where that formula is not the model's cache: MLA's compressed
    cache (`attention.kv_lora_rank`) and the recurrent state of hybrid models (`ssm.*`)."""
    from ramp_cpp.llama.ggufio import field_value, open_reader

    if n_ctx < 1:
        raise RampError(f"--kv-ctx must be at least 1 token, got {n_ctx}")
    r = open_reader(path, tokenizer=False)  # the attention keys; no tokenizer array
    arch = field_value(r, "general.architecture")

    def get(key: str) -> Any:
        return field_value(r, f"{arch}.{key}")

    if get("attention.kv_lora_rank") is not None or any(
        k.startswith(f"{arch}.ssm.") or k.startswith(f"{arch}.shortconv.") for k in r.fields
    ):
        raise RampError(
            f"{path}: the KV cache of a {arch} model is not n_head_kv x head_dim per layer: "
            "name it with --kv-size instead of --kv-ctx"
        )
    n_layer, n_embd, n_head = get("block_count"), get("embedding_length"), get("attention.head_count")
    if n_layer is None or n_embd is None or not n_head:
        raise RampError(
            f"{path}: no {arch}.block_count / embedding_length / attention.head_count: name --kv-size"
        )
    kv = get("attention.head_count_kv")
    kv = n_head if kv is None else kv
    per_layer = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * int(n_layer)
    head_k = get("attention.key_length") or int(n_embd) // _first(n_head)
    head_v = get("attention.value_length") or int(n_embd) // _first(n_head)
    return sum(n_ctx * h * (int(head_k) + int(head_v)) * KV_ELEMENT_BYTES for h in per_layer)


def _first(v: Any) -> int:
    """A per-layer array's first nonzero entry, or the scalar (head_count may be per layer)."""
    if isinstance(v, list):
        return next((int(x) for x in v if int(x)), 1)
    return int(v)


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """The GPU-resident bytes of a GGUF: every tensor `-ot exps=CPU` leaves on the GPU, its data padded to
    the file's alignment."""
    from ramp_cpp.llama.ggufio import field_value, open_reader, tensor_types

    align = int(field_value(open_reader(path, tokenizer=False), "general.alignment", 32))
    return sum(_padded(nb, align) for n, (_, nb, _) in tensor_types(path).items() if not offloaded(n))
