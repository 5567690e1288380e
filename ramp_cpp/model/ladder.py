"""Nominal bit-widths -> the ggml type llama.cpp really writes, and what it costs in bytes.

Paper §4.2.2 maps b=3,4,5,6 to the K-quants and anything higher to Q8_0. llama.cpp cannot store a
256-block type in a tensor whose rows are not a multiple of 256 and silently falls back to a smaller-block
type (`tensor_type_fallback` in `src/llama-quant.cpp` of the llama.cpp that llama-cpp-python 0.3.36
vendors); `TYPES` records that per type, so predicted bytes equal written bytes. Bytes come from
`gguf.GGML_QUANT_SIZES`, never from hand-typed numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ramp_cpp.errors import RampError

T = GGMLQuantizationType

#: Paper §4.2.2 (Eq. 23), extended downwards with Q2_K; 8 bits is the paper's "higher -> Q8_0".
NOMINAL_TYPES: dict[int, GGMLQuantizationType] = {
    2: T.Q2_K,
    3: T.Q3_K,
    4: T.Q4_K,
    5: T.Q5_K,
    6: T.Q6_K,
    8: T.Q8_0,
}


@dataclass(frozen=True)
class TypeInfo:
    """What llama.cpp's quantizer does with one ggml type it can write (a case of `ggml_quantize_chunk`).

    `fallback`: the type `tensor_type_fallback` writes instead when the rows are not a multiple of the
    block (F16 when that does not fit either); None where llama.cpp defines none: then a block of at most
    32 becomes F16 and a larger block is an error. `needs_imatrix`: llama.cpp refuses to write it without
    an importance matrix (`tensor_requires_imatrix`; it exempts token_embd/output, but ggml itself asserts
    on IQ2_XXS, IQ2_XS and IQ1_S there, so ramp-cpp asks for one on every tensor). `family`: float,
    legacy (the 32-block Q4_0 ... Q8_0), k (the K-quants), iq, ternary, fp4 or lowbit (Q1_0, Q2_0): the
    kernels an engine needs to run it (`PORTABLE_FAMILIES`)."""

    name: str
    fallback: str | None = None
    needs_imatrix: bool = False
    family: str = "other"  # a record that names none is not portable


_RECORDS: tuple[TypeInfo, ...] = (
    TypeInfo("F32", family="float"),
    TypeInfo("F16", family="float"),
    TypeInfo("BF16", family="float"),
    TypeInfo("Q4_0", family="legacy"),
    TypeInfo("Q4_1", family="legacy"),
    TypeInfo("Q5_0", family="legacy"),
    TypeInfo("Q5_1", family="legacy"),
    TypeInfo("Q8_0", family="legacy"),
    TypeInfo("MXFP4", family="fp4"),
    TypeInfo("NVFP4", family="fp4"),
    TypeInfo("Q1_0", family="lowbit"),
    TypeInfo("Q2_0", "Q4_0", family="lowbit"),
    TypeInfo("Q2_K", "Q4_0", family="k"),
    TypeInfo("Q3_K", "Q4_0", family="k"),
    TypeInfo("Q4_K", "Q5_0", family="k"),
    TypeInfo("Q5_K", "Q5_1", family="k"),
    TypeInfo("Q6_K", "Q8_0", family="k"),
    TypeInfo("TQ1_0", "Q4_0", family="ternary"),
    TypeInfo("TQ2_0", "Q4_0", family="ternary"),
    TypeInfo("IQ4_NL", family="iq"),
    TypeInfo("IQ4_XS", "IQ4_NL", family="iq"),
    TypeInfo("IQ3_S", "IQ4_NL", family="iq"),
    TypeInfo("IQ3_XXS", "IQ4_NL", needs_imatrix=True, family="iq"),
    TypeInfo("IQ2_S", "IQ4_NL", needs_imatrix=True, family="iq"),
    TypeInfo("IQ2_XS", "IQ4_NL", needs_imatrix=True, family="iq"),
    TypeInfo("IQ2_XXS", "IQ4_NL", needs_imatrix=True, family="iq"),
    TypeInfo("IQ1_M", "IQ4_NL", needs_imatrix=True, family="iq"),
    TypeInfo("IQ1_S", "IQ4_NL", needs_imatrix=True, family="iq"),
)

#: The families every GGUF engine with ggml's older kernels runs: unquantized, the legacy 32-block types and
#: the K-quants. IQ types need their own kernels (and codebooks), which engines other than llama.cpp lack
#: (mistral.rs issue 2100); the ternary, FP4 and 1-bit types are newer still.
PORTABLE_FAMILIES = frozenset({"float", "legacy", "k"})

#: Every type llama.cpp's quantizer can write and this gguf-py knows, -> its record.
TYPES: dict[GGMLQuantizationType, TypeInfo] = {
    T.__members__[r.name]: r
    for r in _RECORDS
    if r.name in T.__members__ and T.__members__[r.name] in GGML_QUANT_SIZES  # older gguf-py lack some
}


def needs_imatrix(t: GGMLQuantizationType) -> bool:
    """True when llama.cpp writes `t` only with an importance matrix (IQ1_S, IQ1_M, IQ2_*, IQ3_XXS)."""
    return TYPES[t].needs_imatrix


def is_portable(t: GGMLQuantizationType) -> bool:
    """True when `t` is of a family every GGUF engine runs (`PORTABLE_FAMILIES`: no IQ type); a type
    llama.cpp's quantizer does not write is not."""
    info = TYPES.get(t)
    return info is not None and info.family in PORTABLE_FAMILIES


@functools.lru_cache(maxsize=128)  # an episode looks up every searched tensor's type
def type_from_name(name: str) -> GGMLQuantizationType:
    """'Q4_K' -> GGMLQuantizationType.Q4_K; one clear error for anything else."""
    known = ", ".join(t.name for t in TYPES)
    try:
        t = GGMLQuantizationType.__members__[name.strip().upper()]
    except KeyError:
        raise RampError(f"unknown ggml type {name!r} (known: {known})") from None
    if t not in TYPES:
        raise RampError(f"type {t.name} cannot be written by llama.cpp's quantizer (known: {known})")
    return t


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def written_type(target: GGMLQuantizationType, n_per_row: int) -> GGMLQuantizationType:
    """The type llama.cpp writes when asked for `target` on rows of `n_per_row` weights
    (`tensor_type_fallback`)."""
    if n_per_row % block_size(target) == 0:
        return target
    info = TYPES.get(target)
    if info is None or info.fallback is None:
        if block_size(target) > 32:
            raise RampError(
                f"llama.cpp has no fallback for {target.name} on rows of {n_per_row} "
                f"(not a multiple of its block of {block_size(target)})"
            )
        return T.F16
    fb = T.__members__[info.fallback]
    return fb if n_per_row % block_size(fb) == 0 else T.F16


def tensor_nbytes(t: GGMLQuantizationType, n_elements: int) -> int:
    """Bytes of a tensor of `n_elements` weights stored as `t` (ggml block layout)."""
    blck, size = GGML_QUANT_SIZES[t]
    if n_elements % blck:
        raise RampError(f"{n_elements} weights cannot be stored as {t.name} (block of {blck})")
    return n_elements // blck * size


def bits_per_weight(t: GGMLQuantizationType) -> float:
    blck, size = GGML_QUANT_SIZES[t]
    return 8.0 * size / blck


def type_for_bits(bits: int, n_per_row: int) -> GGMLQuantizationType:
    """Nominal bit-width -> written ggml type (ladder then fallback)."""
    try:
        return written_type(NOMINAL_TYPES[bits], n_per_row)
    except KeyError:
        raise RampError(f"no ladder rung for {bits} bits (rungs: {sorted(NOMINAL_TYPES)})") from None
