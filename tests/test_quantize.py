from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ramp_cpp.errors import RampError
from ramp_cpp.llama import native
from ramp_cpp.llama.ggufio import read_inventory, tensor_types
from ramp_cpp.llama.quantize import (
    QuantizeOptions,
    complete_map,
    predict,
    predicted_data_bytes,
    quantize_map,
    quantize_preset,
)


def _mixed_map(info) -> dict[str, T]:  # type: ignore[no-untyped-def]
    ladder = [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q2_K, T.Q4_0, T.F16]
    return {t.name: ladder[i % len(ladder)] for i, t in enumerate(info.searched)}


def test_exact_map_types_and_bytes(tiny_model: Path, tmp_path: Path) -> None:
    info = read_inventory(tiny_model)
    asked = {**_mixed_map(info), "token_embd.weight": T.Q6_K}
    full = complete_map(info, asked, T.Q8_0)
    expected = predict(info, full)
    r = quantize_map(tiny_model, tmp_path / "q.gguf", asked, base=T.Q8_0)
    written = tensor_types(tmp_path / "q.gguf")
    for name, (want_type, want_bytes) in expected.items():
        got_type, got_bytes, _ = written[name]
        assert (name, got_type, got_bytes) == (name, want_type, want_bytes)
    # rows of 256 keep the K-quant, rows of 384 (ffn_down) take llama.cpp's fallback
    assert written["blk.0.attn_q.weight"][0] == "Q3_K"
    assert (
        written["blk.0.ffn_down.weight"][0]
        == {
            "Q3_K": "Q4_0",
            "Q4_K": "Q5_0",
            "Q5_K": "Q5_1",
            "Q6_K": "Q8_0",
            "Q8_0": "Q8_0",
            "Q2_K": "Q4_0",
            "Q4_0": "Q4_0",
            "F16": "F16",
        }[asked["blk.0.ffn_down.weight"].name]
    )
    assert written["output.weight"][0] == "Q8_0"  # not in the map: the base type
    assert r.n_fallback > 0
    # whole file: predicted data bytes + header + per-tensor alignment padding
    size = (tmp_path / "q.gguf").stat().st_size
    slack = size - predicted_data_bytes(info, full)
    reader = GGUFReader(tmp_path / "q.gguf")
    header = min(int(t.data_offset) for t in reader.tensors)
    assert header <= slack <= header + 32 * len(reader.tensors)


def test_names_are_anchored(tmp_path: Path) -> None:
    """blk.1.* in a map never matches blk.11.* (llama.cpp matches override patterns as regexes)."""
    m = synthetic.write(tmp_path / "deep.gguf", synthetic.Spec(n_layer=12, n_embd=256, n_ff=256, n_head=4))
    quantize_map(m, tmp_path / "q.gguf", {"blk.1.attn_q.weight": "Q6_K"}, base=T.Q4_0)
    w = tensor_types(tmp_path / "q.gguf")
    assert w["blk.1.attn_q.weight"][0] == "Q6_K"
    assert w["blk.11.attn_q.weight"][0] == "Q4_0"
    assert w["blk.10.attn_q.weight"][0] == "Q4_0"


def test_file_bytes_equal_row_quantizer(tiny_model: Path, tmp_path: Path) -> None:
    """What llama_model_quantize writes for a tensor equals ggml_quantize_chunk on its f32 values."""
    quantize_map(
        tiny_model, tmp_path / "q.gguf", {"blk.0.attn_q.weight": "Q4_K", "blk.1.ffn_down.weight": "Q5_0"}
    )
    src = {t.name: t for t in GGUFReader(tiny_model).tensors}
    out = {t.name: t for t in GGUFReader(tmp_path / "q.gguf").tensors}
    for name, t in (("blk.0.attn_q.weight", T.Q4_K), ("blk.1.ffn_down.weight", T.Q5_0)):
        f32 = np.asarray(src[name].data, dtype=np.float32)
        assert native.quantize_rows(int(t), f32) == out[name].data.tobytes()


def test_imatrix_changes_the_quantization(tiny_model: Path, tmp_path: Path) -> None:
    info = read_inventory(tiny_model)
    q = info.tensor("blk.0.attn_q.weight")
    rng = np.random.default_rng(1)
    im = {q.name: (rng.random(q.n_per_row) ** 4 * 100).astype(np.float32)}
    quantize_map(tiny_model, tmp_path / "a.gguf", {q.name: "Q3_K"})
    quantize_map(tiny_model, tmp_path / "b.gguf", {q.name: "Q3_K"}, opts=QuantizeOptions(imatrix=im))
    a = {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "b.gguf").tensors}
    assert a[q.name] != b[q.name]
    assert a["blk.1.attn_q.weight"] == b["blk.1.attn_q.weight"]  # no imatrix entry: unchanged
    f32 = next(
        np.asarray(t.data, dtype=np.float32) for t in GGUFReader(tiny_model).tensors if t.name == q.name
    )
    assert native.quantize_rows(int(T.Q3_K), f32, im[q.name]) == b[q.name]


def test_preset(tiny_model: Path, tmp_path: Path) -> None:
    r = quantize_preset(tiny_model, tmp_path / "q4km.gguf", "Q4_K_M")
    types = {t.ggml_type for t in r.tensors}
    assert "Q4_K" in types and 4.0 < r.bpw_searched < 7.0


def test_refuses_requantize_unknowns_and_existing_output(tiny_model: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.gguf"
    quantize_preset(tiny_model, q, "Q8_0")
    with pytest.raises(RampError, match="already quantized"):
        quantize_preset(q, tmp_path / "qq.gguf", "Q4_0")
    quantize_preset(q, tmp_path / "qq.gguf", "Q4_0", QuantizeOptions(allow_requantize=True))
    with pytest.raises(RampError, match="exists"):
        quantize_preset(tiny_model, q, "Q8_0")
    with pytest.raises(RampError, match="unknown ggml type"):
        quantize_map(tiny_model, tmp_path / "x.gguf", {"blk.0.attn_q.weight": "Q4_X"})
    with pytest.raises(RampError, match="not a weight tensor"):
        quantize_map(tiny_model, tmp_path / "x.gguf", {"blk.9.attn_q.weight": "Q4_K"})
    with pytest.raises(RampError, match="unknown preset"):
        quantize_preset(tiny_model, tmp_path / "x.gguf", "Q4_K_X")
    assert not (tmp_path / "x.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_quantization_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """llama.cpp refusing (IQ types without an imatrix) -> one error, no output, no temp file."""
    with pytest.raises(RampError, match="llama.cpp"):
        quantize_preset(tiny_model, tmp_path / "iq.gguf", "IQ2_XXS")
    assert list(tmp_path.iterdir()) == []


def test_imatrix_file_is_read_as_llama_quantize_does(tiny_model: Path, tmp_path: Path) -> None:
    """An importance-matrix GGUF (`<name>.in_sum2`, `<name>.counts`) is normalised to sum/count."""
    from gguf import GGUFWriter

    from ramp_cpp.llama.ggufio import read_imatrix

    rng = np.random.default_rng(2)
    sums = (rng.random(256) * 50).astype(np.float32)
    w = GGUFWriter(str(tmp_path / "im.gguf"), "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", sums.reshape(1, 256))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[10.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(tmp_path / "im.gguf")
    assert list(im) == ["blk.0.attn_q.weight"]
    np.testing.assert_allclose(im["blk.0.attn_q.weight"], sums / 10.0, rtol=1e-6)
    quantize_map(
        tiny_model, tmp_path / "a.gguf", {"blk.0.attn_q.weight": "Q3_K"}, opts=QuantizeOptions(imatrix=im)
    )
    quantize_map(tiny_model, tmp_path / "b.gguf", {"blk.0.attn_q.weight": "Q3_K"})
    a = {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "b.gguf").tensors}
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]
    with pytest.raises(RampError, match="no imatrix entries"):
        read_imatrix(tiny_model)
