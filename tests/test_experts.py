"""Expert tensors in the native collector (MUL_MAT_ID), the calibration artifact and the imatrix GGUF; the
reference is llama.cpp's own llama-imatrix, built from the very sdist libllama comes from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import synthetic
import vendored
from gguf import GGMLQuantizationType
from synthetic import ROUTED, MoESpec, write_moe

from ramp_cpp.calibration.artifact import (
    CalibConfig,
    Calibration,
    load_calibration,
    save_calibration,
    write_imatrix,
)
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.ggufio import open_reader
from ramp_cpp.llama.ggufio import read_imatrix as read_imatrix_gguf
from ramp_cpp.llama.native import quantize_model
from ramp_cpp.llama.quantize import _ftypes

EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
CTX = 64


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe")
    text = d / "words.txt"
    text.write_text(synthetic.text(3000, seed=1))
    return {
        "text": text,
        "top2": write_moe(d / "moe.f16.gguf", MoESpec(**ROUTED)),
        "all": write_moe(d / "moe-all.f16.gguf", MoESpec(n_expert_used=4, seed=1, **ROUTED)),
    }


def windows(path: Path, text: str) -> int:
    """How many whole CTX-token windows the text holds for this model's tokenizer."""
    from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions

    with LlamaModel(path, RuntimeOptions(n_ctx=CTX)) as m:
        return len(m.tokenize(text)) // CTX


def measure(path: Path, text_file: Path, samples: int = 4) -> Calibration:
    return calibrate(path, text_file.read_text(), CalibConfig(text=str(text_file), samples=samples, ctx=CTX))


def test_expert_statistics_add_up(moe: dict[str, Path]) -> None:
    """Top-2 of 4 experts: each token's row reaches two experts, so the per-expert counts add up to twice the
    tokens; gate and up read the same rows; pooled over the experts, the gate's statistics are the router's
    (every token reaches some expert), counted twice; down reads each expert's own activations."""
    cal = measure(moe["top2"], moe["text"])
    tokens = 4 * CTX
    for b in range(2):
        router = cal.stats[f"blk.{b}.ffn_gate_inp.weight"]
        assert router.counts is None and router.count == tokens
        for role in EXPERTS:
            st = cal.stats[f"blk.{b}.{role}.weight"]
            n_in = 256
            assert st.max_abs.shape == st.sum_sq.shape == (4, n_in) and st.n_expert == 4
            assert st.count == tokens and st.counts is not None and int(st.counts.sum()) == 2 * tokens
            assert (st.counts > 0).all() and len(set(st.counts.tolist())) > 1  # uneven, as a router makes it
        gate, up = (cal.stats[f"blk.{b}.{r}.weight"] for r in EXPERTS[:2])
        np.testing.assert_array_equal(gate.sum_sq, up.sum_sq)
        np.testing.assert_array_equal(gate.counts, up.counts)
        pooled = gate.pooled()
        np.testing.assert_array_equal(pooled.max_abs, router.max_abs)
        np.testing.assert_allclose(pooled.sum_sq, 2 * router.sum_sq, rtol=1e-12)
        assert pooled.count == 2 * tokens
        # each expert's rows are a proper subset: sums below the router's, maxima at most the router's
        assert (gate.sum_sq < router.sum_sq[None, :]).all()
        assert (gate.max_abs <= router.max_abs[None, :]).all()
        down = cal.stats[f"blk.{b}.ffn_down_exps.weight"]
        assert not np.allclose(down.sum_sq[0], down.sum_sq[1])


def test_every_expert_used_sees_every_token(moe: dict[str, Path]) -> None:
    """With all 4 experts used, the ids route every token to every expert: each expert's gate statistics are
    the router's exactly, and each count is the tokens."""
    cal = measure(moe["all"], moe["text"])
    for b in range(2):
        router = cal.stats[f"blk.{b}.ffn_gate_inp.weight"]
        gate = cal.stats[f"blk.{b}.ffn_gate_exps.weight"]
        assert gate.counts is not None and gate.counts.tolist() == [4 * CTX] * 4
        for e in range(4):
            np.testing.assert_array_equal(gate.max_abs[e], router.max_abs)
            np.testing.assert_allclose(gate.sum_sq[e], router.sum_sq, rtol=1e-12)


def test_residual_relative_sums_per_expert(moe: dict[str, Path]) -> None:
    """The residual-relative sums (each row over its token's residual mean square) per expert: pooled over the
    experts they are top-k times the router's, which reads the same rows once each."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.llama.native import stats_model

    with stats_model(moe["top2"], RuntimeOptions(n_ctx=CTX), residual=("embd", "ffn_inp-", "l_out-")) as m:
        toks = m.tokenize(moe["text"].read_text())
        for i in range(2):
            m.run(toks[i * CTX : (i + 1) * CTX])
        rel = m.collector.relative()  # type: ignore[union-attr]
    for b in range(2):
        router, n_router = rel[f"blk.{b}.ffn_gate_inp.weight"]
        gate, n_gate = rel[f"blk.{b}.ffn_gate_exps.weight"]
        assert n_router == n_gate == 2 * CTX and gate.shape == (4, 256)
        np.testing.assert_allclose(gate.sum(axis=0), 2 * router, rtol=1e-12)
        assert not np.allclose(gate[0], gate[1])


@pytest.mark.parametrize(
    ("sum_sq", "counts", "want"),
    [
        ([[2.0, 4.0], [3.0, 6.0]], [2, 3], [[1.0, 2.0], [1.0, 2.0]]),
        # an unused expert: ones, as llama-quantize reads it
        ([[2.0, 4.0], [0.0, 0.0]], [4, 0], [[0.5, 1.0], [1.0, 1.0]]),
    ],
)
def test_per_expert_mean_sq(sum_sq: list[list[float]], counts: list[int], want: list[list[float]]) -> None:
    s = np.array(sum_sq)
    st = InputStats(np.sqrt(s).astype(np.float32), s, 2, np.array(counts, dtype=np.int64))
    np.testing.assert_array_equal(st.mean_sq, np.array(want, dtype=np.float32))


def test_expert_statistics_round_trip(moe: dict[str, Path], tmp_path: Path) -> None:
    cal = measure(moe["top2"], moe["text"], samples=2)
    back = load_calibration(save_calibration(cal, tmp_path / "c.safetensors"))
    assert back.stats.keys() == cal.stats.keys()
    for name, st in cal.stats.items():
        b = back.stats[name]
        np.testing.assert_array_equal(b.max_abs, st.max_abs)
        np.testing.assert_array_equal(b.sum_sq, st.sum_sq)
        assert b.count == st.count
        if st.counts is None:
            assert b.counts is None
        else:
            np.testing.assert_array_equal(b.counts, st.counts)
    # the imatrix GGUF holds them as llama-imatrix writes them
    r = open_reader(write_imatrix(cal, tmp_path / "im.gguf"))
    t = {x.name: x for x in r.tensors}
    st = cal.stats["blk.1.ffn_down_exps.weight"]
    sums = t["blk.1.ffn_down_exps.weight.in_sum2"]
    counts = t["blk.1.ffn_down_exps.weight.counts"]
    assert [int(x) for x in sums.shape] == [256, 4] and [int(x) for x in counts.shape] == [1, 4]
    np.testing.assert_array_equal(np.asarray(counts.data).ravel(), st.counts.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(sums.data).reshape(4, 256), st.sum_sq.astype(np.float32))
    assert [int(x) for x in t["blk.1.attn_q.weight.counts"].shape] == [1, 1]
    # and read back as llama-quantize normalizes it, each expert's sums over its own count
    back_im = read_imatrix_gguf(tmp_path / "im.gguf")["blk.1.ffn_down_exps.weight"]
    np.testing.assert_allclose(back_im, cal.imatrix()["blk.1.ffn_down_exps.weight"].ravel(), rtol=1e-6)


def test_quantize_takes_the_per_expert_imatrix(moe: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's quantizer wants n_expert x n_in importance values for an expert tensor (one slice per
    expert) and refuses any other size: the calibration's are accepted, a pooled single row is not."""
    cal = measure(moe["top2"], moe["text"], samples=2)
    im = cal.imatrix()
    assert im["blk.0.ffn_up_exps.weight"].shape == (4, 256)
    ftype = _ftypes()["IQ3_XXS"]  # needs an importance matrix for every quantized tensor
    quantize_model(str(moe["top2"]), str(tmp_path / "q.gguf"), ftype, True, {}, im, 2, False)
    types = {t.name: GGMLQuantizationType(int(t.tensor_type))
             for t in open_reader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.IQ3_XXS
    pooled = {**im, "blk.0.ffn_up_exps.weight": cal.stats["blk.0.ffn_up_exps.weight"].pooled().mean_sq}
    with pytest.raises(RampError, match="imatrix size"):
        quantize_model(str(moe["top2"]), str(tmp_path / "p.gguf"), ftype, True, {}, pooled, 2, False)


# -- against llama-imatrix --------------------------------------------------------------------------------


def read_imatrix(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (in_sum2 as (n_mat, n_in), counts as (n_mat,)) of an imatrix GGUF."""
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in open_reader(path).tensors}
    out = {}
    for key, sums in t.items():
        if key.endswith(".in_sum2"):
            name = key[: -len(".in_sum2")]
            counts = t[f"{name}.counts"].ravel()
            out[name] = (sums.reshape(len(counts), -1), counts)
    return out


@pytest.mark.slow
def test_imatrix_matches_llama_imatrix(moe: dict[str, Path], tmp_path: Path) -> None:
    """The same text through llama-imatrix (consecutive CTX-token chunks from the start, BOS first, every
    chunk) and through `calibrate` with every window of the text (then in text order, BOS first): every
    entry, dense and per expert, has the same counts and the same sums (llama-imatrix adds in float)."""
    exe = vendored.tool("llama-imatrix")
    model, text = moe["top2"], moe["text"]
    n = windows(model, text.read_text())
    ref = tmp_path / "ref.gguf"
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-o", str(ref), "-c", str(CTX), "-b", str(CTX),
           "--chunks", str(n), "--no-ppl", "--process-output", "-t", "2",
           "--output-format", "gguf"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    want = read_imatrix(ref)
    cal = measure(model, text, samples=n)
    got = read_imatrix(write_imatrix(cal, tmp_path / "ours.gguf"))
    assert got.keys() == want.keys()
    experts = [k for k in want if k.endswith("_exps.weight")]
    assert len(experts) == 6 and all(want[k][1].shape == (4,) for k in experts)
    for k, (sums, counts) in want.items():
        np.testing.assert_array_equal(got[k][1], counts, err_msg=k)
        np.testing.assert_allclose(got[k][0], sums, rtol=5e-5, atol=1e-6, err_msg=k)  # measured: 1.2e-5
    # the router makes the experts' shares uneven, and llama-imatrix counted them so too
    assert len(set(want["blk.0.ffn_up_exps.weight"][1].tolist())) > 1
