"""Nominal bit-widths -> the ggml type llama.cpp really writes, and what it costs in bytes.

Paper §4.2.2 maps b=3,4,5,6 to the K-quants and anything higher to Q8_0. llama.cpp cannot store a
256-block K-quant in a tensor whose rows are not a multiple of 256 and silently falls back to a 32-block
type (`tensor_type_fallback` in `src/llama-quant.cpp` of the llama.cpp that llama-cpp-python 0.3.36
vendors); the ladder reproduces that so predicted bytes equal written bytes. Bytes come from
`gguf.GGML_QUANT_SIZES`, never from hand-typed numbers.
"""

from __future__ import annotations

import functools

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import RampError

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

#: llama.cpp `tensor_type_fallback` for the types the ladder uses (and their IQ cousins' common case).
FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}

#: Types a user may name in a type map: those llama.cpp's quantizer can write without an imatrix.
STORABLE: frozenset[GGMLQuantizationType] = frozenset(
    {
        T.F32,
        T.F16,
        T.BF16,
        T.Q4_0,
        T.Q4_1,
        T.Q5_0,
        T.Q5_1,
        T.Q8_0,
        T.Q2_K,
        T.Q3_K,
        T.Q4_K,
        T.Q5_K,
        T.Q6_K,
    }
)


@functools.lru_cache(maxsize=128)  # an episode looks up every searched tensor's type
def type_from_name(name: str) -> GGMLQuantizationType:
    """'Q4_K' -> GGMLQuantizationType.Q4_K; one clear error for anything else."""
    known = ", ".join(sorted(x.name for x in STORABLE))
    try:
        t = GGMLQuantizationType.__members__[name.strip().upper()]
    except KeyError:
        raise RampError(f"unknown ggml type {name!r} (known: {known})") from None
    if t not in STORABLE:
        raise RampError(f"type {t.name} cannot be written by this tool (known: {known})")
    return t


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def written_type(target: GGMLQuantizationType, n_per_row: int) -> GGMLQuantizationType:
    """The type llama.cpp writes when asked for `target` on rows of `n_per_row` weights."""
    if n_per_row % block_size(target) == 0:
        return target
    fb = FALLBACK.get(target, target)
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
