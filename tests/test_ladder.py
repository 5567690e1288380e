from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ramp_cpp.errors import RampError
from ramp_cpp.llama import native
from ramp_cpp.model.ladder import NOMINAL_TYPES, tensor_nbytes, type_for_bits, type_from_name, written_type


@pytest.mark.parametrize(
    "bits, n_per_row, expected",
    [
        (2, 256, T.Q2_K),
        (3, 256, T.Q3_K),
        (4, 256, T.Q4_K),
        (5, 256, T.Q5_K),
        (6, 256, T.Q6_K),
        (8, 256, T.Q8_0),
        # rows not a multiple of 256: llama.cpp's tensor_type_fallback
        (2, 576, T.Q4_0),
        (3, 576, T.Q4_0),
        (4, 576, T.Q5_0),
        (5, 576, T.Q5_1),
        (6, 576, T.Q8_0),
        (8, 576, T.Q8_0),
        (4, 1536, T.Q4_K),
        (4, 896, T.Q5_0),
        (4, 640, T.Q5_0),
        # not even a multiple of 32: F16
        (4, 100, T.F16),
        (8, 100, T.F16),
    ],
)
def test_type_for_bits(bits: int, n_per_row: int, expected: T) -> None:
    assert type_for_bits(bits, n_per_row) == expected


def test_paper_mapping_is_the_k_quants() -> None:
    assert [NOMINAL_TYPES[b] for b in (3, 4, 5, 6)] == [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("t", [T.F16, T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K])
@pytest.mark.parametrize("n_per_row", [256, 512, 1536])
def test_bytes_agree_with_ggml_row_size(t: T, n_per_row: int) -> None:
    """gguf-py's table and ggml's own ggml_row_size (through the native helper) agree."""
    assert tensor_nbytes(t, n_per_row * 3) == 3 * native.lib().ramp_row_size(int(t), n_per_row)


def test_type_names() -> None:
    assert type_from_name("q4_k") == T.Q4_K
    with pytest.raises(RampError, match="unknown ggml type"):
        type_from_name("Q4_KK")
    with pytest.raises(RampError, match="cannot be written"):
        type_from_name("Q8_K")  # a ggml type llama.cpp's quantizer never writes
    with pytest.raises(RampError, match="no ladder rung"):
        type_for_bits(7, 256)


def test_written_type_keeps_compatible_rows() -> None:
    for t in (T.Q4_0, T.Q8_0, T.F16):
        assert written_type(t, 576) == t
    assert GGML_QUANT_SIZES[T.Q4_K][0] == 256
