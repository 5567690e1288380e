from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import splitgguf
import synthetic
from gguf import GGUFReader

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import _read_inventory, add_metadata, open_reader, read_inventory
from ramp_cpp.llama.shards import merged_header_bytes


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


def _big_tokenizer(src: Path, dst: Path) -> Path:
    """`src` with a tokenizer array of a large model's length (60,000 merges of uneven byte lengths, some
    multi-byte and one empty) and a 40-int array outside the tokenizer, which both readers parse."""
    rng = np.random.default_rng(0)
    pieces = ["Ġ", "é", "ab", "the", "\u2581w", "x" * 70, ""]
    merges = ["".join(rng.choice(pieces, size=int(k))) for k in rng.integers(0, 4, 60_000)]
    return add_metadata(src, dst, {"tokenizer.ggml.merges": merges, "ramp.test.ints": list(range(40))})


@pytest.mark.parametrize("n_shards", [1, 3])
def test_inventory_reader_steps_over_the_tokenizer_arrays(
    tiny_model: Path, tmp_path: Path, n_shards: int
) -> None:
    """The inventory's reader (HeaderReader) steps over tokenizer.ggml.* arrays, unparsed: the inventory,
    its metadata, every other key's value, every field's bytes (a split set's one-file header size) and every
    tensor's place are gguf-py's full parse's."""
    big = _big_tokenizer(tiny_model, tmp_path / "big.gguf")
    path = big if n_shards == 1 else splitgguf.split(big, tmp_path / "s.gguf", n_shards)[0]
    fast, slow = _read_inventory(path), _read_inventory(path, tokenizer=True)
    assert fast == slow and fast.metadata == slow.metadata
    assert fast.metadata["ramp.test.ints"] == "[40 items]"
    a, b = open_reader(path, tokenizer=False), open_reader(path)
    assert list(a.fields) == list(b.fields)
    skipped = [k for k, f in a.fields.items() if f.contents() is None]
    assert skipped == ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                       "tokenizer.ggml.merges"]
    assert len(b.fields["tokenizer.ggml.merges"].contents()) == 60_000
    for k, f in a.fields.items():
        assert sum(p.nbytes for p in f.parts) == sum(p.nbytes for p in b.fields[k].parts), k
        if k not in skipped:
            assert f.contents() == b.fields[k].contents(), k
    where = [(t.name, int(t.tensor_type), t.shape.tolist(), t.data_offset) for t in a.tensors]
    assert where == [(t.name, int(t.tensor_type), t.shape.tolist(), t.data_offset) for t in b.tensors]
    assert merged_header_bytes(a, fast.alignment) == merged_header_bytes(b, fast.alignment)


def test_the_tensor_readers_that_step_over_the_tokenizer_give_the_full_parses_results(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """source_tensors (the proxy's and the in-memory cache's rows), the tensor cache's header template and
    cuts, the layer embeddings' weight moments, the GPU cap's KV and resident bytes, pad and upcycle read the
    source with HeaderReader: the same tensors, bytes, template and values, the same files written, as with
    gguf-py's full parse."""
    from ramp_cpp.allocate import gpu
    from ramp_cpp.fold import pad, upcycle
    from ramp_cpp.llama import ggufio
    from ramp_cpp.write.cachefiles import source_tensors

    big = _big_tokenizer(tiny_model, tmp_path / "big.gguf")
    full = {t.name: t for t in open_reader(big).tensors}
    fast = source_tensors(big)
    assert [(n, int(t.tensor_type), t.shape.tolist(), bytes(t.data)) for n, t in fast.items()] == [
        (n, int(t.tensor_type), t.shape.tolist(), bytes(t.data)) for n, t in full.items()]
    written = {}
    for how in ("header", "full"):
        if how == "full":  # every reader parses the tokenizer too
            monkeypatch.setattr(ggufio, "HeaderReader", GGUFReader)
        idx = ggufio.extract_tensors(big, ["output_norm.weight", "blk.1.ffn_down.weight"], tmp_path / how)
        written[how] = [
            ggufio.read_header_template(big), idx, (tmp_path / how).read_bytes(),
            ggufio.weight_moments(big, [t.name for t in read_inventory(big).searched]),
            gpu.kv_cache_bytes(big, 512), gpu.resident_bytes(big),
            pad.pad(big, tmp_path / f"{how}.pad.gguf").read_bytes(),
            upcycle.upcycle(big, tmp_path / f"{how}.moe.gguf", upcycle.UpcycleConfig(experts=2)).read_bytes(),
        ]
    assert written["header"] == written["full"]
