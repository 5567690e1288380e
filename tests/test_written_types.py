"""The types llama.cpp writes for what it is asked (model/ladder.py, llama/quantize.py): its fallbacks for
rows a type's block does not divide, which types need an importance matrix and their bytes, every type its
quantizer writes, IQ maps written as predicted, and a missing imatrix refused before llama.cpp runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama import native
from ramp_cpp.llama.ggufio import read_inventory, tensor_types
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.model.ladder import TYPES, needs_imatrix, tensor_nbytes, type_from_name, written_type

runner = CliRunner()

# -- every type llama.cpp writes, its fallback and its imatrix requirement ----------------------

#: (asked, n_per_row, written): llama.cpp's tensor_type_fallback (src/llama-quant.cpp, as vendored by
#: llama-cpp-python 0.3.36), read off the source: 256-block IQ types -> IQ4_NL, 32-block types -> F16.
FALLBACK_CASES = [
    (T.IQ4_NL, 384, T.IQ4_NL),
    (T.IQ4_NL, 100, T.F16),
    (T.IQ4_XS, 256, T.IQ4_XS),
    (T.IQ4_XS, 384, T.IQ4_NL),
    (T.IQ4_XS, 100, T.F16),
    (T.IQ3_S, 576, T.IQ4_NL),
    (T.IQ3_XXS, 896, T.IQ4_NL),
    (T.IQ2_XXS, 256, T.IQ2_XXS),
    (T.IQ2_XXS, 384, T.IQ4_NL),
    (T.IQ2_XS, 640, T.IQ4_NL),
    (T.IQ2_S, 640, T.IQ4_NL),
    (T.IQ1_S, 576, T.IQ4_NL),
    (T.IQ1_M, 576, T.IQ4_NL),
    (T.TQ1_0, 384, T.Q4_0),
    (T.TQ2_0, 384, T.Q4_0),
    (T.MXFP4, 100, T.F16),
    (T.Q4_K, 384, T.Q5_0),
    (T.Q8_0, 100, T.F16),
]


@pytest.mark.parametrize("asked, n_per_row, written", FALLBACK_CASES)
def test_written_type_follows_llama_cpp_fallback(asked: T, n_per_row: int, written: T) -> None:
    assert written_type(asked, n_per_row) == written


def test_no_fallback_for_large_blocks_is_an_error() -> None:
    """tensor_type_fallback throws for a type with a block > 32 and no fallback (NVFP4: 64)."""
    with pytest.raises(RampError, match="no fallback for NVFP4"):
        written_type(T.NVFP4, 96)
    assert written_type(T.NVFP4, 128) == T.NVFP4


#: ggml_quantize_requires_imatrix (ggml.c) plus tensor_requires_imatrix (llama-quant.cpp).
NEEDS_IMATRIX = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS}


@pytest.mark.parametrize("t", list(TYPES), ids=lambda t: t.name)
def test_imatrix_requirement_and_bytes(t: T) -> None:
    assert needs_imatrix(t) == (t in NEEDS_IMATRIX)
    assert type_from_name(t.name.lower()) == t
    n = 1024  # a multiple of every block: gguf-py's bytes equal ggml_row_size's
    assert tensor_nbytes(t, 3 * n) == 3 * native.lib().ramp_row_size(int(t), n)


def test_writable_types_are_all_of_llama_cpp_quantizer() -> None:
    """ggml_quantize_chunk's cases; Q8_K and the integer types are not among them."""
    names = {t.name for t in TYPES}
    assert {"IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ1_M", "IQ3_S", "TQ1_0", "Q6_K", "BF16"} <= names
    for bad in ("Q8_K", "I8", "F64"):
        with pytest.raises(RampError, match="cannot be written"):
            type_from_name(bad)


def _imatrix(model: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        t.name: rng.uniform(0.1, 3.0, t.n_per_row).astype(np.float32) for t in read_inventory(model).searched
    }


#: (asked for every searched tensor, with an imatrix, written on rows of 256 and of 384 (ffn_down)).
IQ_MAPS = [
    ("IQ4_NL", False, "IQ4_NL", "IQ4_NL"),
    ("IQ4_XS", False, "IQ4_XS", "IQ4_NL"),
    ("IQ2_XXS", True, "IQ2_XXS", "IQ4_NL"),
    ("IQ3_XXS", True, "IQ3_XXS", "IQ4_NL"),
]


@pytest.mark.parametrize("asked, with_im, on_256, on_384", IQ_MAPS)
def test_iq_maps_written_as_predicted(
    tiny_model: Path, tmp_path: Path, asked: str, with_im: bool, on_256: str, on_384: str
) -> None:
    info = read_inventory(tiny_model)
    assert {t.n_per_row for t in info.searched} == {256, 384}  # synthetic.Spec: n_embd 256, n_ff 384
    types = {t.name: asked for t in info.searched}
    opts = QuantizeOptions(imatrix=_imatrix(tiny_model) if with_im else None)
    r = quantize_map(tiny_model, tmp_path / "q.gguf", types, opts=opts)
    written = tensor_types(tmp_path / "q.gguf")
    n_fallback = 0
    for t in info.searched:
        want = on_384 if t.n_per_row == 384 else on_256
        got, nbytes, _ = written[t.name]
        assert (t.name, got, nbytes) == (t.name, want, tensor_nbytes(T[want], t.n_params))
        n_fallback += want != asked
    assert r.n_fallback == n_fallback


def test_missing_imatrix_is_refused_before_llama_cpp(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("llama.cpp was called")

    monkeypatch.setattr(native, "quantize_model", boom)
    with pytest.raises(
        RampError, match=r"blk\.0\.attn_q\.weight would be written as IQ2_XXS.*none was given"
    ):
        quantize_map(tiny_model, tmp_path / "q.gguf", {"blk.0.attn_q.weight": "IQ2_XXS"})
    im = {"blk.0.attn_k.weight": np.ones(256, np.float32)}
    with pytest.raises(RampError, match="has no entry"):
        quantize_map(
            tiny_model, tmp_path / "q.gguf", {"blk.0.attn_q.weight": "IQ1_S"}, opts=QuantizeOptions(im)
        )
    assert list(tmp_path.iterdir()) == []


def test_imatrix_type_that_falls_back_needs_none(tiny_model: Path, tmp_path: Path) -> None:
    """IQ2_XXS on rows of 384 is written as IQ4_NL, which llama.cpp writes without an imatrix."""
    quantize_map(tiny_model, tmp_path / "q.gguf", {"blk.0.ffn_down.weight": "IQ2_XXS"})
    assert tensor_types(tmp_path / "q.gguf")["blk.0.ffn_down.weight"][0] == "IQ4_NL"


def test_cli_quantize_accepts_iq_types(tiny_model: Path, tmp_path: Path) -> None:
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"blk.0.attn_q.weight": "IQ4_XS", "blk.1.ffn_down.weight": "iq4_nl"}))
    r = runner.invoke(
        app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q.gguf"), "--types", str(m), "--json"]
    )
    assert r.exit_code == 0, r.output
    got = {t["name"]: t["ggml_type"] for t in json.loads(r.stdout)["tensors"]}
    assert (got["blk.0.attn_q.weight"], got["blk.1.ffn_down.weight"]) == ("IQ4_XS", "IQ4_NL")
    m.write_text(json.dumps({"blk.0.attn_q.weight": "IQ2_XS"}))
    r = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "x.gguf"), "--types", str(m)])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "importance matrix" in lines[0], r.output
