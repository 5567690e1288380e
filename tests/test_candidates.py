from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType as T

from ramp_cpp.allocate.budget import costs
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import TensorInfo, read_inventory, tensor_types
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure.candidates import (
    DEFAULT_TYPES,
    CandidateConfig,
    candidates,
    paper_candidates,
    parse_types,
    searched_tensors,
    tensor_candidates,
    type_for_bpw,
)
from ramp_cpp.measure.sensitivity import Option
from ramp_cpp.model.ladder import bits_per_weight

#: What llama.cpp writes as asked, by bytes (bpw: Q2_K 2.625, Q3_K 3.4375, IQ4_XS 4.25, Q4_K = IQ4_NL =
#: Q4_0 4.5, Q4_1 5, Q5_K = Q5_0 5.5, Q5_1 6, Q6_K 6.5625, Q8_0 8.5; equal bytes in DEFAULT_TYPES' order).
ALL_256 = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0")
BLOCK_32 = ("IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

#: (row length, types, have imatrix) -> candidates, written by hand from ggml's block sizes (256 for the
#: K-quants and IQ4_XS / IQ2_XS / IQ3_S, 32 for the others).
CASES = [
    (256, DEFAULT_TYPES, False, ALL_256),
    (1536, DEFAULT_TYPES, True, ALL_256),
    (384, DEFAULT_TYPES, False, BLOCK_32),
    (576, DEFAULT_TYPES, False, BLOCK_32),
    (320, DEFAULT_TYPES, True, BLOCK_32),
    (48, DEFAULT_TYPES, False, ()),
    (256, (T.Q8_0, T.IQ2_XS, T.Q4_K), False, ("Q4_K", "Q8_0")),  # IQ2_XS needs an imatrix
    (256, (T.Q8_0, T.IQ2_XS, T.IQ3_S, T.Q4_K), True, ("IQ2_XS", "IQ3_S", "Q4_K", "Q8_0")),
    (384, (T.Q8_0, T.IQ2_XS, T.IQ3_S, T.Q4_K), True, ("Q8_0",)),
    (256, (T.Q4_0, T.Q4_K, T.IQ4_NL), False, ("Q4_0", "Q4_K", "IQ4_NL")),  # ties keep the order given
]


def _tensor(n_per_row: int, n_rows: int = 64) -> TensorInfo:
    n = n_per_row * n_rows
    return TensorInfo("blk.0.attn_q.weight", "attn_q", 0, n_per_row, n_rows, n, "F16", 2 * n, True, 0)


@pytest.mark.parametrize(("row", "types", "im", "want"), CASES)
def test_candidates_per_row_length(row: int, types: tuple[T, ...], im: bool, want: tuple[str, ...]) -> None:
    got = candidates(_tensor(row), types, im)
    assert tuple(t.name for t in got) == want
    cfg = CandidateConfig(types=types)
    assert tuple(w.name for _, w in tensor_candidates(cfg, _tensor(row), im)) == want
    assert all(a == w for a, w in tensor_candidates(cfg, _tensor(row), im))  # written as asked


#: (row length, bits) -> the paper ladder's written types, llama.cpp's fallbacks included
PAPER = [
    (256, (3, 4, 5, 6), ("Q3_K", "Q4_K", "Q5_K", "Q6_K")),
    (384, (3, 4, 5, 6), ("Q4_0", "Q5_0", "Q5_1", "Q8_0")),
    (384, (2, 3, 8), ("Q4_0", "Q8_0")),  # Q2_K and Q3_K both fall back to Q4_0
    (256, (2, 3, 4, 5, 6, 8), ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")),
]


@pytest.mark.parametrize(("row", "bits", "want"), PAPER)
def test_paper_ladder_keeps_fallbacks(row: int, bits: tuple[int, ...], want: tuple[str, ...]) -> None:
    t = _tensor(row)
    assert tuple(x.name for x in paper_candidates(t, bits)) == want
    cfg = CandidateConfig(ladder="paper", bits=bits)
    pairs = tensor_candidates(cfg, t, False)
    assert tuple(w.name for _, w in pairs) == want
    assert {a for a, _ in pairs} <= set(cfg.requested())
    # the same written types as the paper path of the search prices (allocation.costs)
    model = _FakeModel(t)
    assert set(costs(model, [t], bits).types[0]) == set(want)


class _FakeModel:
    """The fields allocation.costs reads of a model holding one tensor."""

    def __init__(self, t: TensorInfo) -> None:
        self.tensors = (t,)
        self.alignment = 32
        self.data_offset = 0
        self.other_bytes = 0
        self.n_params_total = t.n_params


#: (options, target bpw) -> the type a policy's action means
BPW = [
    (("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"), 4.0, "IQ4_XS"),
    (("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"), 4.375, "IQ4_XS"),  # tie: the cheaper
    (("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"), 5.0, "Q4_K"),  # tie: the cheaper
    (("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"), 0.0, "Q2_K"),
    (("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"), 16.0, "Q8_0"),
    (BLOCK_32, 4.4, "IQ4_NL"),  # IQ4_NL and Q4_0 have the same bpw: the first given
    (BLOCK_32, 5.3, "Q5_0"),
    (BLOCK_32, 7.5, "Q8_0"),
    (("Q8_0", "Q4_0"), 6.5, "Q4_0"),  # exactly halfway: the cheaper, whatever the order
]


@pytest.mark.parametrize(("names", "target", "want"), BPW)
def test_type_for_bpw(names: tuple[str, ...], target: float, want: str) -> None:
    ts = [T[n] for n in names]
    assert type_for_bpw(ts, target) == T[want]
    assert type_for_bpw([Option(t, 1, 0.0) for t in ts], target) == T[want]


def test_type_for_bpw_transfers_across_widths() -> None:
    """One action on a 256-wide and a 576-wide tensor: each gets its own type, with nearly the bpw asked."""
    for target in (3.0, 4.25, 4.5, 5.5, 6.5, 8.5):
        a = type_for_bpw(candidates(_tensor(256), DEFAULT_TYPES, False), target)
        b = type_for_bpw(candidates(_tensor(576), DEFAULT_TYPES, False), target)
        assert a in candidates(_tensor(256), DEFAULT_TYPES, False)
        assert b.name in BLOCK_32
        if target >= 4.5:
            assert abs(bits_per_weight(a) - target) <= 0.07 and abs(bits_per_weight(b) - target) <= 0.5
    with pytest.raises(RampError, match="no candidate"):
        type_for_bpw([], 4.0)


def test_config_and_parse_refusals() -> None:
    assert parse_types(" q4_k, IQ4_XS,Q4_K ,Q8_0") == (T.Q4_K, T.IQ4_XS, T.Q8_0)
    for spec, match in (("Q4_X", "unknown ggml type"), (" , ", "comma-separated"), ("IQ4_XS,Q9", "unknown")):
        with pytest.raises(RampError, match=match):
            parse_types(spec)
    with pytest.raises(RampError, match="unknown ladder"):
        CandidateConfig(ladder="rungs")
    with pytest.raises(RampError, match="bit-widths"):
        CandidateConfig(ladder="paper", bits=(3, 7))
    with pytest.raises(RampError, match="empty"):
        CandidateConfig(types=())
    assert CandidateConfig().requested() == DEFAULT_TYPES
    assert CandidateConfig(ladder="paper").requested() == (T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


# -- against llama.cpp ----------------------------------------------------------------------------------

#: synthetic models: rows of 256 and 384 (default), 256 only (n_ff 512), 320 and 640 (narrow), tied
SPECS = {
    "default": synthetic.Spec(),
    "all256": synthetic.Spec(n_ff=512, seed=3),
    "narrow": synthetic.Spec(n_embd=320, n_ff=640, seed=2),
    "tied": synthetic.Spec(tied=True, seed=1),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("cand-models")
    yield {k: synthetic.write(d / f"{k}.f16.gguf", s) for k, s in SPECS.items()}


@pytest.mark.parametrize("spec", list(SPECS))
def test_written_types_are_the_candidates(spec: str, models: dict[str, Path], tmp_path: Path) -> None:
    """Quantize with maps that give every searched tensor (embeddings included) each of its candidates in
    turn: llama.cpp writes exactly the types chosen, never a fallback."""
    info = read_inventory(models[spec])
    tensors = searched_tensors(info)
    assert {t.role for t in tensors} >= {"token_embd", "attn_q", "ffn_down"}
    assert ("output" in {t.role for t in tensors}) == (spec != "tied")
    rows = {t.n_per_row for t in tensors}
    assert rows & {256, 512} or spec == "narrow"
    with_im = spec in ("default", "narrow")
    types = (*DEFAULT_TYPES, T.IQ2_XS, T.IQ3_S) if with_im else DEFAULT_TYPES
    rng = np.random.default_rng(0)
    im = {t.name: (rng.random(t.n_per_row) + 0.1).astype(np.float32) for t in info.searched}
    if not with_im:
        im = None
    cands = {t.name: candidates(t, types, im is not None and t.name in im) for t in tensors}
    for t in tensors:  # reference: which rows take the 256-blocks
        assert (T.Q4_K in cands[t.name]) == (t.n_per_row % 256 == 0)
        linear = t.role not in ("token_embd", "output")  # the imatrix covers the linears only
        assert (T.IQ2_XS in cands[t.name]) == (t.n_per_row % 256 == 0 and with_im and linear)
        assert T.Q8_0 in cands[t.name]
    n_maps = max(len(c) for c in cands.values())
    for k in range(n_maps):
        m = {n: c[(k + i) % len(c)] for i, (n, c) in enumerate(cands.items())}
        out = tmp_path / f"q{k}.gguf"
        r = quantize_map(models[spec], out, m, opts=QuantizeOptions(imatrix=im))
        assert r.n_fallback == 0
        written = tensor_types(out)
        assert {n: written[n][0] for n in m} == {n: t.name for n, t in m.items()}
        out.unlink()

