"""The sensitivity artifact: for every searched tensor, the GGUF types it may take, what each costs in the
file and how much error it adds. `measure` fills it once per (model, calibration, imatrix); every allocator
(uniform, greedy, SAC) and every budget reuses it, as ExLlamaV2 reuses its `measurement.json`.

The error of tensor W stored as type t is the proxy

    error = E_x ‖(W − Ŵ_t) x‖²  ≈  Σ_j E[x_j²] · Σ_i (W_ij − Ŵ_t,ij)²

(per token; W is out × in, Ŵ_t the dequantized bytes llama.cpp writes for t, E[x_j²] the calibration's mean
square of input column j, i.e. the importance matrix). An allocation's predicted damage is the sum over
tensors, which is what the knapsack in `allocate` minimises under the byte budget.

For the embeddings, whose use is not one matmul, `measure.py` states the form the proxy takes (token_embd:
rows weighted by token frequency, plus the head's term when tied).

`save` / `load` keep it as JSON (`to_json`'s form).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.jsonfile import check_header

FORMAT_VERSION = 1
KIND = "ramp.sensitivity"


@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor."""

    ggml_type: GGMLQuantizationType
    nbytes: int  # bytes the tensor's data takes in the file, padded to the GGUF alignment
    error: float  # the proxy above, E‖(W − Ŵ)x‖² per token


@dataclass(frozen=True)
class TensorOptions:
    name: str
    n_params: int
    options: tuple[Option, ...]  # ascending nbytes, strictly descending error: dominated types dropped

    def option(self, t: GGMLQuantizationType) -> Option:
        for o in self.options:
            if o.ggml_type == t:
                return o
        raise KeyError(f"{self.name}: {t.name} is not a candidate")


@dataclass(frozen=True)
class Sensitivity:
    """Everything an allocator needs; file bytes of an allocation = fixed_bytes + Σ chosen option nbytes."""

    model_sha256: str
    imatrix_digest: str | None  # None: measured on bytes quantized without an importance matrix
    fixed_bytes: int  # header + every non-searched tensor + their padding: the part no allocation changes
    n_params_total: int  # every weight in the file, for bpw over the whole file
    tensors: tuple[TensorOptions, ...]  # in model (visiting) order
    # what the measurement is keyed by besides the model and imatrix (measure.py fills them)
    calibration_digest: str | None = None  # measure.calibration_digest of the calibration used
    ladder: str = "types"  # candidates.CandidateConfig.ladder
    candidate_types: tuple[GGMLQuantizationType, ...] = ()  # the types asked of llama.cpp
    base: GGMLQuantizationType = GGMLQuantizationType.Q8_0  # every quantizable tensor not searched

    def file_bytes(self, choice: Mapping[str, GGMLQuantizationType]) -> int:
        return self.fixed_bytes + sum(t.option(choice[t.name]).nbytes for t in self.tensors)

    def error(self, choice: Mapping[str, GGMLQuantizationType]) -> float:
        return sum(t.option(choice[t.name]).error for t in self.tensors)

    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(t.options[0].nbytes for t in self.tensors)

    def max_bytes(self) -> int:
        return self.fixed_bytes + sum(t.options[-1].nbytes for t in self.tensors)

    def scaled(self, factors: Mapping[str, float]) -> Sensitivity:
        """A copy with every option error of tensor n multiplied by factors[n] (tensors not named keep
        theirs). A positive factor keeps the order of a tensor's errors, so its options stay undominated;
        `undominated` re-checks it all the same (a product may tie only where it underflows)."""
        bad = [n for n, f in factors.items() if not (math.isfinite(f) and f > 0)]
        if bad:
            raise RampError(f"{bad[0]}: error scale {factors[bad[0]]} is not a positive finite number")
        out = []
        for t in self.tensors:
            f = factors.get(t.name)
            if f is None:
                out.append(t)
                continue
            opts = undominated(Option(o.ggml_type, o.nbytes, o.error * f) for o in t.options)
            out.append(TensorOptions(t.name, t.n_params, opts))
        return replace(self, tensors=tuple(out))


def undominated(options: Iterable[Option]) -> tuple[Option, ...]:
    """The options no other option beats: sorted by (nbytes, error), an option is kept only when its error is
    strictly below that of every cheaper (or equally cheap, earlier) one. The result has strictly ascending
    nbytes and strictly descending error, as TensorOptions requires."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if not out or o.error < out[-1].error:
            out.append(o)
    return tuple(out)


def to_json(sens: Sensitivity) -> dict[str, Any]:
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "model_sha256": sens.model_sha256,
        "calibration_digest": sens.calibration_digest,
        "imatrix_digest": sens.imatrix_digest,
        "ladder": sens.ladder,
        "candidate_types": [t.name for t in sens.candidate_types],
        "base": sens.base.name,
        "fixed_bytes": sens.fixed_bytes,
        "n_params_total": sens.n_params_total,
        "tensors": [
            {
                "name": t.name,
                "n_params": t.n_params,
                "options": [[o.ggml_type.name, o.nbytes, o.error] for o in t.options],
            }
            for t in sens.tensors
        ],
    }


def _type(name: Any, where: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType.__members__[str(name)]
    except KeyError:
        raise RampError(f"{where}: unknown ggml type {name!r}") from None


def from_json(d: Any, where: str = "sensitivity") -> Sensitivity:
    """A Sensitivity from `to_json`'s form; one RampError for anything else or a broken invariant."""
    d = check_header(d, KIND, FORMAT_VERSION, where, "sensitivity file")
    try:
        tensors = []
        for t in d["tensors"]:
            opts = tuple(
                Option(_type(ty, where), int(nb), float(err)) for ty, nb, err in t["options"]
            )
            if not opts or undominated(opts) != opts or not all(math.isfinite(o.error) for o in opts):
                raise RampError(f"{where}: options of {t['name']} are not sorted, undominated and finite")
            tensors.append(TensorOptions(str(t["name"]), int(t["n_params"]), opts))
        return Sensitivity(
            model_sha256=str(d["model_sha256"]),
            imatrix_digest=d["imatrix_digest"],
            fixed_bytes=int(d["fixed_bytes"]),
            n_params_total=int(d["n_params_total"]),
            tensors=tuple(tensors),
            calibration_digest=d["calibration_digest"],
            ladder=str(d["ladder"]),
            candidate_types=tuple(_type(x, where) for x in d["candidate_types"]),
            base=_type(d["base"], where),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RampError(f"{where}: damaged sensitivity file ({type(e).__name__}: {e})") from None


def save(sens: Sensitivity, dst: str | os.PathLike[str], force: bool = False) -> Path:
    """Write `sens` as JSON (temp file, then rename)."""
    with atomic_path(dst, force) as tmp:
        tmp.write_text(json.dumps(to_json(sens), indent=1))
    return Path(dst)


def load(path: str | os.PathLike[str]) -> Sensitivity:
    p = Path(path)
    if not p.is_file():
        raise RampError(f"{p}: no such file")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise RampError(f"{p}: not a ramp-cpp sensitivity file (not JSON)") from None
    return from_json(d, str(p))
