from __future__ import annotations

from pathlib import Path

import pytest
import synthetic

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory


def test_tiny_llama_inventory(tiny_model: Path) -> None:
    info = read_inventory(tiny_model)
    assert (info.arch, info.n_blocks, info.context_length, info.tied_output) == ("llama", 2, 256, False)
    q = info.tensor("blk.1.attn_q.weight")
    assert (q.role, q.block, q.n_rows, q.n_per_row, q.n_params, q.ggml_type) == (
        "attn_q",
        1,
        256,
        256,
        65536,
        "F16",
    )
    down = info.tensor("blk.0.ffn_down.weight")
    assert (down.n_rows, down.n_per_row) == (256, 384)
    assert info.tensor("output.weight").role == "output"
    assert not info.tensor("token_embd.weight").searched
    order = [(t.block, t.role) for t in info.searched]
    roles = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert order == [(b, r) for b in range(2) for r in roles]


@pytest.mark.parametrize(
    "spec",
    [
        synthetic.Spec(arch="llama", tied=True),
        synthetic.Spec(arch="qwen2", n_layer=3),
        synthetic.Spec(arch="gemma3", extra_block_tensors=("attn_q_norm.weight", "attn_k_norm.weight")),
        synthetic.Spec(arch="granite", n_layer=1),  # any blk.N.* architecture, no special code
    ],
)
def test_architectures(tmp_path: Path, spec: synthetic.Spec) -> None:
    info = read_inventory(synthetic.write(tmp_path / "m.gguf", spec))
    assert info.arch == spec.arch and info.n_blocks == spec.n_layer
    assert info.tied_output == spec.tied
    assert len(info.searched) == 7 * spec.n_layer
    assert {t.role for t in info.tensors} >= {"token_embd", "attn_q", "ffn_down"}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RampError, match="no such file"):
        read_inventory(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(RampError, match="not a GGUF"):
        read_inventory(p)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005])
def test_truncated(tiny_model: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_model.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(RampError, match="truncated|damaged"):
        read_inventory(p)
