"""Which tensors are searched and which GGUF types each may take: the action space of every allocator.

Two ladders:

- `types` (default): per tensor, the types of `CandidateConfig.types` that llama.cpp writes *as asked* for
  its row length (n_per_row % block == 0, so no `tensor_type_fallback` is involved and the requested type
  is the written type), ordered by bytes; types that need an importance matrix (`ladder.needs_imatrix`)
  only for tensors the imatrix covers. A 576-wide model thus gets no K-quant on its q/k/v/o/gate/up rows
  but keeps IQ4_NL and the legacy 32-block types, instead of paying for a K-quant that silently becomes
  Q5_0.
- `paper`: the paper's nominal rungs `bits` (3/4/5/6, optionally 2 and 8), each the type llama.cpp really
  writes for the row length, fallbacks included (`ladder.type_for_bits`, as `allocation.costs` prices them).

A policy's action is a target bits per weight; `type_for_bpw` turns it into each tensor's own candidate
nearest that target, so a policy trained on one model means the same on models of other widths.

Searched tensors: every blk.N linear, plus (with `embeddings`) `token_embd.weight` first and the untied
`output.weight` last. In a tied model token_embd is also the output head: one tensor, one type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import ModelInfo, TensorInfo
from ramp_cpp.measure.sensitivity import Option
from ramp_cpp.model.arch import check_known
from ramp_cpp.model.ladder import (
    NOMINAL_TYPES,
    TYPES,
    bits_per_weight,
    block_size,
    is_portable,
    needs_imatrix,
    tensor_nbytes,
    type_for_bits,
    type_from_name,
)

T = GGMLQuantizationType

#: The default candidate set: K-quants, the 4-bit IQ types, the legacy 32-block types.
DEFAULT_TYPES: tuple[GGMLQuantizationType, ...] = (
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.IQ4_XS,
    T.IQ4_NL,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
)



@dataclass(frozen=True)
class TypeSet:
    """A candidate set `--types NAME` names: its types, in DEFAULT_TYPES' order, and what it is for."""

    name: str
    types: tuple[GGMLQuantizationType, ...]
    what: str


#: The named candidate sets. `portable`: the K-quants and the legacy types (ladder.PORTABLE_FAMILIES), for a
#: file that must run on engines without IQ kernels (mistral.rs issue 2100): Q2_K ... Q6_K, Q4_0, Q4_1, Q5_0,
#: Q5_1, Q8_0. A search on it writes no IQ type anywhere in the file: the base type (Q8_0) is portable too.
TYPE_SETS: dict[str, TypeSet] = {
    s.name: s
    for s in (
        TypeSet("full", DEFAULT_TYPES, "K-quants, IQ4_XS/IQ4_NL and the legacy types (the default)"),
        TypeSet(
            "portable",
            tuple(t for t in DEFAULT_TYPES if is_portable(t)),
            "K-quants and legacy types only, no IQ type: for engines without IQ kernels",
        ),
    )
}

LADDERS = ("types", "paper")

#: Roles that are searched besides the blk.N linears (arch.ROLES names), in visiting position.
EMBEDDING_ROLES = ("token_embd", "output")


@dataclass(frozen=True)
class CandidateConfig:
    """The candidate set. `types` for the `types` ladder (order breaks ties between equal byte counts);
    `bits` for the `paper` ladder; `embeddings`: token_embd / output searched too; `base`: the type of every
    quantizable tensor that is not searched (quantize_map's `base`)."""

    types: tuple[GGMLQuantizationType, ...] = DEFAULT_TYPES
    ladder: str = "types"
    bits: tuple[int, ...] = (3, 4, 5, 6)
    embeddings: bool = True
    base: GGMLQuantizationType = T.Q8_0

    def __post_init__(self) -> None:
        if self.ladder not in LADDERS:
            raise RampError(f"unknown ladder {self.ladder!r} (choose from {', '.join(LADDERS)})")
        if not self.types:
            raise RampError("the candidate set is empty")
        bad = [t.name for t in self.types if t not in TYPES]
        if bad:
            raise RampError(f"llama.cpp's quantizer cannot write {bad[0]}")
        wrong = [b for b in self.bits if b not in NOMINAL_TYPES]
        if wrong or not self.bits:
            raise RampError(f"bit-widths must be among {sorted(NOMINAL_TYPES)}, got {list(self.bits)}")

    def requested(self) -> tuple[GGMLQuantizationType, ...]:
        """The types asked of llama.cpp (the tensor cache's): the candidate set, or the paper's rungs."""
        if self.ladder == "paper":
            return tuple(NOMINAL_TYPES[b] for b in sorted(set(self.bits)))
        return tuple(dict.fromkeys(self.types))

    @property
    def portable(self) -> bool:
        """Every type the set asks for, and the base, runs on engines without IQ kernels: the run's file must
        then hold no other type (the never-worse rule keeps the allocation rather than ship an IQ preset)."""
        return is_portable(self.base) and all(is_portable(t) for t in self.requested())

    def key(self) -> dict[str, object]:
        """What identifies the candidate set in a saved measurement."""
        return {
            "ladder": self.ladder,
            "types": [t.name for t in self.requested()],
            "embeddings": self.embeddings,
            "base": self.base.name,
        }


def parse_types(spec: str) -> tuple[GGMLQuantizationType, ...]:
    """A named set ('portable', 'full': TYPE_SETS) -> its types; 'Q4_K,IQ4_XS, q8_0' -> the types, in the
    order given, duplicates dropped; one error for a bad name."""
    named = TYPE_SETS.get(spec.strip().lower())
    if named is not None:
        return named.types
    names = [s for s in (x.strip() for x in spec.split(",")) if s]
    if not names:
        raise RampError(
            f"--types takes a set ({', '.join(TYPE_SETS)}) or comma-separated ggml type names such as "
            f"Q4_K,IQ4_XS, not {spec!r}"
        )
    try:
        return tuple(dict.fromkeys(type_from_name(n) for n in names))
    except RampError as e:
        if len(names) > 1:
            raise
        raise RampError(f"{e}; or a named set: {', '.join(TYPE_SETS)}") from None


def searched_tensors(info: ModelInfo, embeddings: bool = True) -> tuple[TensorInfo, ...]:
    """The searched tensors in visiting order: token_embd, the blk.N linears (3-D expert tensors included)
    block by block, output (the first and last only with `embeddings`; output only when the head is not
    tied). One line for a tensor llama.cpp quantizes whose role the tables do not know (`arch.check_known`),
    before any work."""
    for t in info.tensors:
        check_known(t.name, len(t.shape), info.arch)
    linears = info.searched
    if not embeddings:
        return linears
    first = tuple(t for t in info.tensors if t.role == EMBEDDING_ROLES[0])
    last = tuple(t for t in info.tensors if t.role == EMBEDDING_ROLES[1])
    return first + linears + last


def searchable(info: ModelInfo) -> tuple[TensorInfo, ...]:
    """Every tensor any search may give a type: the linears and the embeddings."""
    return searched_tensors(info, embeddings=True)


def candidates(
    tensor: TensorInfo, types: Iterable[GGMLQuantizationType], have_imatrix: bool
) -> tuple[GGMLQuantizationType, ...]:
    """The types of `types` llama.cpp writes as asked for `tensor`'s rows (n_per_row % block == 0), those
    that need an importance matrix only when `have_imatrix` (an imatrix entry for this tensor), ordered by
    bytes; equal byte counts keep the order of `types`."""
    ok = [
        t
        for t in dict.fromkeys(types)
        if tensor.n_per_row % block_size(t) == 0 and (have_imatrix or not needs_imatrix(t))
    ]
    return tuple(sorted(ok, key=lambda t: tensor_nbytes(t, tensor.n_params)))


def paper_candidates(tensor: TensorInfo, bits: Sequence[int]) -> tuple[GGMLQuantizationType, ...]:
    """The written types of the paper's rungs `bits` for `tensor` (fallbacks included), without repeats,
    ordered by bytes."""
    wt = dict.fromkeys(type_for_bits(b, tensor.n_per_row) for b in sorted(set(bits)))
    return tuple(sorted(wt, key=lambda t: tensor_nbytes(t, tensor.n_params)))


def tensor_candidates(
    cfg: CandidateConfig, tensor: TensorInfo, have_imatrix: bool
) -> tuple[tuple[GGMLQuantizationType, GGMLQuantizationType], ...]:
    """(type asked of llama.cpp, type it writes) per candidate of `tensor` under `cfg`, ordered by bytes."""
    if cfg.ladder == "paper":
        asked = {type_for_bits(b, tensor.n_per_row): NOMINAL_TYPES[b] for b in sorted(set(cfg.bits))}
        return tuple((asked[t], t) for t in paper_candidates(tensor, cfg.bits))
    return tuple((t, t) for t in candidates(tensor, cfg.types, have_imatrix))


def type_for_bpw(
    options: Iterable[GGMLQuantizationType | Option], target_bpw: float
) -> GGMLQuantizationType:
    """The candidate whose bits per weight (8 * block bytes / block weights) is nearest `target_bpw`; a tie
    goes to the cheaper type, then to the one given first. The policy's action in bits per weight thus
    picks, for every tensor, its own best-fitting type whatever its row length."""
    ts = [o.ggml_type if isinstance(o, Option) else o for o in options]
    if not ts:
        raise RampError("no candidate types to choose from")
    return min(ts, key=lambda t: (abs(bits_per_weight(t) - target_bpw), bits_per_weight(t)))
