"""Padding rows to multiples of 256 and upcycling a dense FFN into experts: the same function through
llama.cpp (logits, KLD), the layout the records promise, and one-line refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from test_fold import fvals, logits, rel_rms
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.fold.pad import pad, plan_pad, spread
from ramp_cpp.fold.upcycle import UpcycleConfig, neox_to_norm, upcycle
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import TensorRewrite, field_value, open_reader, read_inventory, rewrite_gguf
from ramp_cpp.llama.quantize import quantize_preset

T = GGMLQuantizationType
CFG = EvalConfig(n_ctx=128, n_chunks=2)
LEGACY = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}

# off the 256 grid like the benchmark models (SmolLM2 576 wide, 9 heads on 3; Qwen2.5 896, 14 on 2)
SPECS = {
    "llama-gqa": synthetic.Spec(n_embd=192, n_head=6, n_head_kv=2, n_ff=384),
    "llama-tied": synthetic.Spec(n_embd=192, n_head=6, n_head_kv=2, n_ff=384, tied=True),
    # 3 heads of 64 on 3 kv heads: 12 query heads (768 wide) in a 256-wide model, written as key_length
    "llama-mha": synthetic.Spec(n_embd=192, n_head=3, n_head_kv=3, n_ff=384),
    "qwen2": synthetic.Spec(arch="qwen2", arch_tensors=True, n_embd=192, n_head=6, n_head_kv=2, n_ff=384),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("padup")
    return {k: synthetic.write(d / f"{k}.f16.gguf", s) for k, s in SPECS.items()}


@pytest.fixture(scope="module")
def padded(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("padded")
    return {k: pad(p, d / f"{k}.pad.gguf") for k, p in models.items()}


# -- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "n_to", "zeros_per_block"),
    [
        (576, 768, [64, 64, 64]),  # SmolLM2's hidden size: two 32-sub-blocks of zeros at each block's tail
        (896, 1024, [32, 32, 32, 32]),  # Qwen2.5-0.5B's
        (192, 256, [64]),
        (600, 768, [56, 56, 56]),
        (513, 768, [85, 85, 85]),
        (514, 768, [85, 85, 84]),
    ],
)
def test_zero_channels_spread_over_the_blocks(n: int, n_to: int, zeros_per_block: list[int]) -> None:
    pos = spread(n, n_to, 256)
    assert len(pos) == n and len(set(pos)) == n and np.all(np.diff(pos) > 0)
    real = np.zeros(n_to, dtype=int)
    real[pos] = 1
    blocks = real.reshape(-1, 256)
    assert [256 - int(b.sum()) for b in blocks] == zeros_per_block
    for b in blocks:  # the zeros at the tail: real channels first
        assert np.all(np.diff(b) <= 0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_pad_same_function_rows_on_256(
    kind: str, models: dict[str, Path], padded: dict[str, Path], tiny_text: str
) -> None:
    src, dst = models[kind], padded[kind]
    for t in read_inventory(dst).tensors:
        assert t.n_per_row % 256 == 0, t.name
    k = kld(dst, src, tiny_text, CFG)
    assert abs(k.kld_mean) < 1e-5 and k.same_top_pct == 100.0
    assert rel_rms(logits(src, tiny_text), logits(dst, tiny_text)) < 2e-3


@pytest.mark.parametrize(
    ("kind", "want"),
    [
        # (n_embd, n_head, n_ff, head_dim): 6 heads on 2 kv heads -> 8 (one zero head per group of 3)
        ("llama-gqa", (256, 8, 512, 32)),
        ("qwen2", (256, 8, 512, 32)),
        ("llama-mha", (256, 12, 512, 64)),  # multiples of 3 heads of 64 reach 256 only at 12
    ],
)
def test_pad_metadata(kind: str, want: tuple[int, int, int, int], padded: dict[str, Path]) -> None:
    r = open_reader(padded[kind])
    a = SPECS[kind].arch
    e, h, f, hd = want
    assert field_value(r, f"{a}.embedding_length") == e
    assert field_value(r, f"{a}.attention.head_count") == h
    assert field_value(r, f"{a}.feed_forward_length") == f
    eps = field_value(r, f"{a}.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(1e-5 * 192 / 256, rel=1e-6)
    kl = field_value(r, f"{a}.attention.key_length")
    assert kl == (hd if h * hd != e else kl)  # written where llama.cpp's n_embd / n_head default is wrong


def test_query_heads_keep_their_kv_head(models: dict[str, Path]) -> None:
    """SmolLM2's shape: 9 heads on 3 kv heads become 12; head h of group h // 3 sits at slot h % 3 of its
    group of 4 (slot 3 is the zero head), so it still reads kv head h // 3."""
    spec = synthetic.Spec(n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_layer=1)
    src = synthetic.write(Path(models["llama-gqa"]).parent / "smol-shape.gguf", spec)
    plan = plan_pad(src)
    heads = plan.query.pos.reshape(9, 64)[:, 0] // 64
    assert heads.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert (plan.residual.size, plan.query.size, plan.ffn.size) == (768, 768, 1536)


def test_pad_moves_values_not_changes_them(models: dict[str, Path], padded: dict[str, Path]) -> None:
    src, dst = models["qwen2"], padded["qwen2"]
    plan = plan_pad(src)
    r, q, f = plan.residual.pos, plan.query.pos, plan.ffn.pos
    cases = {
        "blk.0.attn_q.weight": (q, r), "blk.0.attn_k.weight": (None, r), "blk.1.attn_output.weight": (r, q),
        "blk.0.ffn_up.weight": (f, r), "blk.1.ffn_down.weight": (r, f), "token_embd.weight": (None, r),
    }
    for name, (rows, cols) in cases.items():
        a, b = fvals(src, name), fvals(dst, name)
        rows = np.arange(a.shape[0]) if rows is None else rows
        cols = np.arange(a.shape[1]) if cols is None else cols
        np.testing.assert_array_equal(b[np.ix_(rows, cols)], a)
        assert np.abs(b).sum() == pytest.approx(np.abs(a).sum(), rel=1e-6)  # the rest is zero
    np.testing.assert_array_equal(fvals(dst, "blk.0.attn_q.bias")[q], fvals(src, "blk.0.attn_q.bias"))
    np.testing.assert_array_equal(fvals(dst, "blk.0.attn_k.bias"), fvals(src, "blk.0.attn_k.bias"))
    np.testing.assert_allclose(
        fvals(dst, "blk.0.ffn_norm.weight")[r], fvals(src, "blk.0.ffn_norm.weight") * math.sqrt(192 / 256),
        rtol=1e-6,
    )


def test_unscaled_norms_change_the_function(
    models: dict[str, Path], padded: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    """Control for the equivalence: the padded model with its norm weights back at the source's values."""
    dst = padded["llama-gqa"]
    norms = [t.name for t in open_reader(dst).tensors if t.name.endswith("norm.weight")]
    undo = {n: TensorRewrite(T.F32, lambda w: w / math.sqrt(192 / 256)) for n in norms}
    rewrite_gguf(dst, tmp_path / "bad.gguf", undo)
    src = models["llama-gqa"]
    assert rel_rms(logits(src, tiny_text), logits(tmp_path / "bad.gguf", tiny_text)) > 1e-2


def test_presets_pick_k_quants_once_padded(
    models: dict[str, Path], padded: dict[str, Path], tmp_path: Path
) -> None:
    """Why padding exists: Q3_K_M of the 192-wide model falls back to legacy types, of the padded one not."""

    def types(p: Path) -> set[str]:
        q = Path(quantize_preset(p, tmp_path / f"{p.stem}.q3km.gguf", "Q3_K_M").path)
        return {t.ggml_type for t in read_inventory(q).searched}

    assert types(models["llama-gqa"]) & LEGACY
    got = types(padded["llama-gqa"])
    assert not got & LEGACY and "Q3_K" in got


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        (synthetic.Spec(n_ff=512), "already a multiple"),
        (synthetic.Spec(arch="gemma3", arch_tensors=True, n_embd=192, n_head=6, n_head_kv=2), "supports"),
        # qwen2's attn_q is n_embd x n_embd: 3 kv heads of 64 reach a multiple of 256 only at 768 query rows
        (synthetic.Spec(arch="qwen2", arch_tensors=True, n_embd=192, n_head=3, n_head_kv=3), "n_head"),
    ],
)
def test_pad_refusals(spec: synthetic.Spec, msg: str, tmp_path: Path) -> None:
    src = synthetic.write(tmp_path / "m.gguf", spec)
    with pytest.raises(RampError, match=msg):
        pad(src, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_pad_quantized_refused(models: dict[str, Path], tmp_path: Path) -> None:
    q = quantize_preset(models["llama-gqa"], tmp_path / "q8.gguf", "Q8_0").path
    with pytest.raises(RampError, match="dequantize first"):
        pad(q, tmp_path / "o.gguf")


def test_cli_pad(models: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "p.gguf"
    r = runner.invoke(app, ["pad", str(models["llama-gqa"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "hidden 192 -> 256" in r.output and field_value(open_reader(out), "llama.embedding_length") == 256
    r = runner.invoke(app, ["pad", str(out), "-o", str(tmp_path / "again.gguf")])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "nothing to pad" in lines[0]
    assert not (tmp_path / "again.gguf").exists()


# -- upcycling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "n_rot", "want"),
    [(8, 8, [0, 4, 1, 5, 2, 6, 3, 7]), (6, 4, [0, 2, 1, 3, 4, 5]), (2, 2, [0, 1])],
)
def test_neox_to_norm_order(head_dim: int, n_rot: int, want: list[int]) -> None:
    assert neox_to_norm(head_dim, n_rot).tolist() == want


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "qwen2"])
@pytest.mark.parametrize("base", ["source", "padded"])
def test_upcycled_same_function(
    kind: str, base: str, models: dict[str, Path], padded: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    src = (models if base == "source" else padded)[kind]
    moe = upcycle(src, tmp_path / "moe.gguf", UpcycleConfig(experts=4, top_k=2, seed=1))
    r = open_reader(moe)
    assert field_value(r, "general.architecture") == "llama"
    assert field_value(r, "llama.expert_count") == 4 and field_value(r, "llama.expert_used_count") == 2
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    e, f = (192, 384) if base == "source" else (256, 512)
    assert shapes["blk.1.ffn_up_exps.weight"] == (e, f, 4) and shapes["blk.1.ffn_gate_inp.weight"] == (e, 4)
    assert "blk.0.ffn_up.weight" not in shapes
    k = kld(moe, src, tiny_text, CFG)
    assert abs(k.kld_mean) < 1e-4 and k.same_top_pct == 100.0
    assert rel_rms(logits(src, tiny_text), logits(moe, tiny_text)) < 1e-2


def test_exact_copies_match_tighter(models: dict[str, Path], tiny_text: str, tmp_path: Path) -> None:
    """Without the experts' rescale (spread 0) nothing is rounded again: only the gating's arithmetic
    differs."""
    src = models["qwen2"]
    moe = upcycle(src, tmp_path / "moe.gguf", UpcycleConfig(experts=8, top_k=3, spread=0.0))
    assert rel_rms(logits(src, tiny_text), logits(moe, tiny_text)) < 2e-3


def test_rope_order_matters(models: dict[str, Path], tiny_text: str, tmp_path: Path) -> None:
    """Control for qwen2 -> llama: the upcycled model with q/k rows put back in qwen2's order computes
    another function (llama ropes adjacent pairs, qwen2 halves)."""
    src = models["qwen2"]
    moe = upcycle(src, tmp_path / "moe.gguf", UpcycleConfig(experts=2, top_k=1))
    back = np.argsort(neox_to_norm(32, 32))

    def unpermute(w: np.ndarray) -> np.ndarray:
        heads = w.reshape(-1, 32, *w.shape[1:])
        return heads[:, back].reshape(w.shape)

    names = [t.name for t in open_reader(moe).tensors if ".attn_q." in t.name or ".attn_k." in t.name]
    types = {t.name: T(int(t.tensor_type)) for t in open_reader(moe).tensors}
    rewrite_gguf(moe, tmp_path / "bad.gguf", {n: TensorRewrite(types[n], unpermute) for n in names})
    assert rel_rms(logits(src, tiny_text), logits(tmp_path / "bad.gguf", tiny_text)) > 1e-2


def test_experts_differ_in_quantization_error(models: dict[str, Path], tmp_path: Path) -> None:
    """Each expert's up rows / t_e and down columns · t_e: down slices quantize with different errors; gate
    slices are the dense gate (nothing can rescale it), up slices the dense rows each times one factor."""
    src = models["llama-gqa"]
    moe = upcycle(src, tmp_path / "moe.gguf", UpcycleConfig(experts=4, top_k=2, seed=2))
    gate, up, down = (fvals(moe, f"blk.0.ffn_{r}_exps.weight") for r in ("gate", "up", "down"))
    dense_down = fvals(src, "blk.0.ffn_down.weight")
    for e in range(4):
        np.testing.assert_array_equal(gate[e], fvals(src, "blk.0.ffn_gate.weight"))
        assert not np.array_equal(up[e], up[(e + 1) % 4]) and not np.array_equal(down[e], down[(e + 1) % 4])
    # the function's invariant: up row r times down column r is the dense one's (to F16 rounding)
    prod = up[:, :, 0][:, None, :] * down  # (e, n_embd, n_ff): up[e, r, 0] * down[e, i, r]
    ref = fvals(src, "blk.0.ffn_up.weight")[:, 0][None, :] * dense_down
    np.testing.assert_allclose(prod, np.broadcast_to(ref, prod.shape), rtol=3e-3, atol=1e-6)

    def rel_err(w: np.ndarray) -> float:
        q = dequantize(quantize(w, T.Q4_0), T.Q4_0).reshape(w.shape)
        return float(np.sqrt(((q - w) ** 2).mean()) / w.std())

    errs = [rel_err(down[e]) for e in range(4)]
    assert len(set(errs)) == 4 and max(errs) / min(errs) > 1.001


@pytest.mark.parametrize(
    ("cfg", "msg"),
    [
        (UpcycleConfig(experts=1), "--experts"),
        (UpcycleConfig(experts=2000), "--experts"),
        (UpcycleConfig(experts=4, top_k=5), "--top-k"),
        (UpcycleConfig(top_k=0), "--top-k"),
        (UpcycleConfig(spread=-1.0), "--spread"),
    ],
)
def test_upcycle_bad_config(cfg: UpcycleConfig, msg: str, models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RampError, match=msg):
        upcycle(models["llama-gqa"], tmp_path / "o.gguf", cfg)
    assert not (tmp_path / "o.gguf").exists()


def test_upcycle_refusals(models: dict[str, Path], tmp_path: Path) -> None:
    moe = upcycle(models["llama-gqa"], tmp_path / "moe.gguf", UpcycleConfig(experts=2, top_k=1))
    with pytest.raises(RampError, match="already a mixture of experts"):
        upcycle(moe, tmp_path / "twice.gguf")
    g = synthetic.write(tmp_path / "g.gguf", synthetic.Spec(arch="gemma3", arch_tensors=True))
    with pytest.raises(RampError, match="upcycling supports llama, qwen2"):
        upcycle(g, tmp_path / "o.gguf")
    q = quantize_preset(models["llama-gqa"], tmp_path / "q8.gguf", "Q8_0").path
    with pytest.raises(RampError, match="dequantize first"):
        upcycle(q, tmp_path / "o.gguf")
    spec = synthetic.Spec(arch="qwen2", arch_tensors=True, fused_qkv=True)
    fused = synthetic.write(tmp_path / "f.gguf", spec)
    with pytest.raises(RampError, match="fused attn_qkv"):
        upcycle(fused, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_upcycle(models: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    args = ["upcycle", str(models["qwen2"]), "-o", str(out), "--experts", "4", "--top-k", "2", "--seed", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rd = open_reader(out)
    assert field_value(rd, "llama.expert_count") == 4 and field_value(rd, "ramp.upcycle.seed") == 3
    r = runner.invoke(app, ["upcycle", str(models["qwen2"]), "-o", str(tmp_path / "x.gguf"), "--top-k", "9"])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--top-k" in lines[0]
    assert not (tmp_path / "x.gguf").exists()
