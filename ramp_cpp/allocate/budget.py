"""Allocations (tensor -> bits -> ggml type) and their cost: the action space and the budget of the search.

The policy's action a in [-1, 1] (tanh-squashed) maps to u = (a + 1) / 2 in [0, 1], the paper's sigmoid
squashing, and u to the nearest rung of the ladder: rung = floor(u * (K - 1) + 1/2) of the sorted bits.
Every rung is then the type llama.cpp really writes for that tensor's row length (ladder.written_type), so
the bytes of an allocation are known before anything is quantized.

Three ways to count bits against the budget (`mode`):
- `weighted` (default): sum(bytes * 8) / sum(params) over the visited tensors, with the written types:
  what memory really costs, fallbacks included;
- `nominal`: the paper's unweighted mean of the nominal bit-widths b_i;
- `size`: whole-file bits per weight, file_bytes * 8 / all parameters (from a `--size` target in bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.model.ladder import NOMINAL_TYPES, tensor_nbytes, type_from_name, written_type

MODES = ("weighted", "nominal", "size")


@dataclass(frozen=True)
class Budget:
    """Eq. 20's ceiling (`--budget`, paper 4.25) and target = ceiling - margin (paper 4.0), in `mode` bits."""

    ceiling: float = 4.25
    margin: float = 0.25
    mode: str = "weighted"

    @property
    def target(self) -> float:
        return self.ceiling - self.margin

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RampError(f"unknown budget mode {self.mode!r} (choose from {', '.join(MODES)})")


@dataclass(frozen=True)
class Measures:
    bpw: float  # weighted: real bits per weight of the visited tensors
    bpw_nominal: float  # mean nominal bits
    file_bytes: int  # predicted size of the whole GGUF
    bpw_file: float  # file_bytes * 8 / all parameters

    def value(self, mode: str) -> float:
        return {"weighted": self.bpw, "nominal": self.bpw_nominal, "size": self.bpw_file}[mode]


@dataclass
class Costs:
    """Per visited tensor and rung: the written type and its bytes; plus what the rest of the file costs."""

    names: list[str]
    bits: tuple[int, ...]  # the ladder, ascending
    n_params: np.ndarray  # (L,)
    nbytes: np.ndarray  # (L, K) bytes of the written type
    types: list[list[str]]  # (L, K) written type names
    fixed_bytes: int  # header + every tensor not visited (base type or copied) + alignment padding
    n_params_total: int

    def measures(self, rungs: Sequence[int]) -> Measures:
        r = np.asarray(rungs)
        idx = np.arange(len(r))
        b = self.nbytes[idx, r]
        file_bytes = int(self.fixed_bytes + b.sum())
        return Measures(
            bpw=float(b.sum() * 8 / self.n_params.sum()),
            bpw_nominal=float(np.mean([self.bits[i] for i in r])),
            file_bytes=file_bytes,
            bpw_file=file_bytes * 8 / self.n_params_total,
        )

    def feasible(self, mode: str) -> tuple[float, float]:
        """(lowest, highest) bits this ladder can reach on this model in `mode`."""
        lo = self.measures([0] * len(self.names)).value(mode)
        hi = self.measures([len(self.bits) - 1] * len(self.names)).value(mode)
        return lo, hi

    def check_budget(self, budget: Budget) -> None:
        lo, hi = self.feasible(budget.mode)
        if budget.ceiling < lo or budget.ceiling > hi:
            rng = f"{lo:.3f}-{hi:.3f}"
            raise RampError(
                f"budget {budget.ceiling:g} ({budget.mode} bits) is outside what the ladder "
                f"{'/'.join(map(str, self.bits))} can reach on this model: feasible range {rng}"
            )

    def types_of(self, rungs: Sequence[int]) -> dict[str, str]:
        """name -> written ggml type name."""
        return {n: self.types[i][r] for i, (n, r) in enumerate(zip(self.names, rungs, strict=True))}


def ladder_types(bits: Sequence[int]) -> list[GGMLQuantizationType]:
    bad = [b for b in bits if b not in NOMINAL_TYPES]
    if bad or not bits:
        raise RampError(f"bit-widths must be among {sorted(NOMINAL_TYPES)}, got {list(bits)}")
    return [NOMINAL_TYPES[b] for b in sorted(set(bits))]


def costs(model: Any, visited: Sequence[Any], bits: Sequence[int], base: str = "Q8_0") -> Costs:
    """Costs of `visited` (TensorInfo list of `model`) on the ladder `bits`; every other quantizable tensor
    at `base`, the rest copied. fixed_bytes counts the source header and per-tensor alignment padding."""
    from ramp_cpp.model.arch import quantizable

    rungs = ladder_types(bits)
    align = model.alignment
    names = {t.name for t in visited}

    def padded(n: int) -> int:
        return -(-n // align) * align

    fixed = model.data_offset + model.other_bytes
    base_t = type_from_name(base)
    for t in model.tensors:
        if t.name in names:
            continue
        tt = written_type(base_t, t.n_per_row) if quantizable(t.name, 2) else type_from_name(t.ggml_type)
        fixed += padded(tensor_nbytes(tt, t.n_params))
    nb = np.zeros((len(visited), len(rungs)), dtype=np.int64)
    types: list[list[str]] = []
    for i, t in enumerate(visited):
        row = []
        for k, r in enumerate(rungs):
            wt = written_type(r, t.n_per_row)
            nb[i, k] = padded(tensor_nbytes(wt, t.n_params))
            row.append(wt.name)
        types.append(row)
    return Costs(
        names=[t.name for t in visited],
        bits=tuple(sorted(set(bits))),
        n_params=np.array([t.n_params for t in visited], dtype=np.int64),
        nbytes=nb,
        types=types,
        fixed_bytes=int(fixed),
        n_params_total=int(model.n_params_total),
    )


def rung_of(action: float, n_rungs: int) -> int:
    """Nearest rung for a tanh-squashed action: u = (a + 1) / 2, rung = round(u * (K - 1))."""
    u = (float(np.clip(action, -1.0, 1.0)) + 1.0) / 2.0
    return min(int(np.floor(u * (n_rungs - 1) + 0.5)), n_rungs - 1)  # half-up, not numpy's half-even


def repair(rungs: Sequence[int], actions: Sequence[float], c: Costs, budget: Budget) -> list[int]:
    """Make an allocation fit (used by `apply`, where no reward steers the policy to the budget).

    Over the ceiling: demote, one rung at a time, the tensor whose action lay closest to the boundary
    below its rung (the decision the policy was least sure of), until the allocation fits. Then, while
    promoting the tensor closest to the boundary above its rung keeps the allocation at or below the
    target, promote it: unused budget buys quality. Distance to a boundary is measured in u = (a + 1) / 2
    scaled by K - 1, so it is comparable across rungs.
    """
    r = list(rungs)
    k = len(c.bits)
    pos = [(float(np.clip(a, -1, 1)) + 1.0) / 2.0 * (k - 1) for a in actions]

    def value(x: list[int]) -> float:
        return c.measures(x).value(budget.mode)

    while value(r) > budget.ceiling:
        cands = [i for i in range(len(r)) if r[i] > 0]
        if not cands:
            break
        i = min(cands, key=lambda j: pos[j] - (r[j] - 0.5))
        r[i] -= 1
    while True:
        cands = [i for i in range(len(r)) if r[i] < k - 1]
        cands.sort(key=lambda j: (r[j] + 0.5) - pos[j])
        for i in cands:
            r[i] += 1
            if value(r) <= budget.target:
                break
            r[i] -= 1
        else:
            break
    return r


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(spec: str, option: str = "--size") -> int:
    """'95MiB', '3.6GB', '120M' -> bytes (k/M/G are powers of 1000, KiB/MiB/GiB of 1024); `option` names the
    option in the error."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", spec)
    if not m or m.group(2).lower() not in _UNITS:
        raise RampError(f"{option} takes a number with an optional unit (MiB, MB, GiB, GB), not {spec!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_budget(model: Any, spec: str) -> float:
    """A whole-file size target as the `size` mode's ceiling: file bytes * 8 / all parameters."""
    return parse_size(spec) * 8 / model.n_params_total
