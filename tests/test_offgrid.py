"""The off-grid rescale: the same function (llama.cpp's logits), weights off the source's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType
from test_fold import fvals, logits, rel_rms
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.fold.offgrid import (
    KEY_PERMUTED,
    KEY_SEED,
    KEY_SOURCE,
    OffgridConfig,
    offgrid,
    plan_permutation,
    plan_scales,
)
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import (
    TensorRewrite,
    field_value,
    open_reader,
    read_inventory,
    rewrite_gguf,
    tensor_types,
)
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map, quantize_preset
from ramp_cpp.store.cache import file_sha256

T = GGMLQuantizationType
CFG = EvalConfig(n_ctx=128, n_chunks=2)

SPECS = {
    "llama": synthetic.Spec(),  # grouped-query attention: 4 query heads on 2 kv heads
    "llama-tied": synthetic.Spec(tied=True),
    "llama-fused-qkv": synthetic.Spec(fused_qkv=True),
    "qwen2": synthetic.Spec(arch="qwen2", arch_tensors=True),  # attn_v.bias divided with V's rows
    "gemma3": synthetic.Spec(arch="gemma3", arch_tensors=True, tied=True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("offgrid")
    return {k: synthetic.write(d / f"{k}.f16.gguf", s) for k, s in SPECS.items()}


@pytest.mark.parametrize("kind", list(SPECS))
def test_same_function_other_weights(
    kind: str, models: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    src = models[kind]
    dst = offgrid(src, tmp_path / "o.gguf", OffgridConfig(seed=3))
    info = read_inventory(src)
    for t in info.searched:  # every searched linear moved, by up to the spread
        if kind == "llama-fused-qkv" and t.role == "attn_output":
            continue  # V's rows live inside the fused tensor: that pair is left alone, o keeps its columns
        a, b = fvals(src, t.name), fvals(dst, t.name)
        r = np.abs(b / np.where(a == 0, 1, a))
        assert np.median(np.abs(np.log(r[a != 0]))) > 0.05, t.name
    k = kld(dst, src, tiny_text, CFG)
    assert abs(k.kld_mean) < 1e-4 and k.kld_max < 1e-2
    assert rel_rms(logits(src, tiny_text), logits(dst, tiny_text)) < 1e-2


def test_uncompensated_rescale_is_detected(models: dict[str, Path], tiny_text: str, tmp_path: Path) -> None:
    """Control for the test above: V's rows divided without attn_output's columns changes the function."""
    src = models["llama"]
    t = plan_scales(src, OffgridConfig(seed=3)).rows["blk.0.attn_v.weight"]
    bad = {"blk.0.attn_v.weight": TensorRewrite(T.F16, lambda w: w / t[:, None].astype(np.float32))}
    rewrite_gguf(src, tmp_path / "bad.gguf", bad)
    assert rel_rms(logits(src, tiny_text), logits(tmp_path / "bad.gguf", tiny_text)) > 1e-2


def test_gqa_columns_follow_their_kv_head(models: dict[str, Path]) -> None:
    """Column (head h, dim d) of attn_output takes V's factor of kv head h // (n_head / n_head_kv), dim d."""
    sc = plan_scales(models["llama"], OffgridConfig(seed=1))
    s = SPECS["llama"]
    hd = s.n_embd // s.n_head
    t = sc.rows["blk.1.attn_v.weight"].reshape(s.n_head_kv, hd)
    cols = sc.cols["blk.1.attn_output.weight"].reshape(s.n_head, hd)
    for h in range(s.n_head):
        np.testing.assert_array_equal(cols[h], t[h // (s.n_head // s.n_head_kv)])


def test_leaves_the_source_grid(models: dict[str, Path], tmp_path: Path) -> None:
    """Why it exists: a base dequantized from Q4_0 is re-emitted by Q4_0 exactly; its off-grid copy is not."""
    src = models["llama"]
    q = quantize_preset(src, tmp_path / "q.gguf", "Q4_0").path
    deq = Path(quantize_preset(q, tmp_path / "deq.gguf", "F16", QuantizeOptions(allow_requantize=True)).path)
    og = offgrid(deq, tmp_path / "og.gguf", OffgridConfig(seed=0))
    name = "blk.0.ffn_down.weight"

    def requant_error(base: Path) -> float:
        out = quantize_map(base, tmp_path / f"{base.stem}.q4.gguf", {name: T.Q4_0}, base=T.Q8_0).path
        w = fvals(base, name)
        return float(np.sqrt(((fvals(Path(out), name) - w) ** 2).mean()) / w.std())

    assert requant_error(deq) < 1e-3 < 0.05 < requant_error(og)


def test_seeded_metadata_and_untouched_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["qwen2"]
    a = offgrid(src, tmp_path / "a.gguf", OffgridConfig(seed=5))
    b = offgrid(src, tmp_path / "b.gguf", OffgridConfig(seed=5))
    c = offgrid(src, tmp_path / "c.gguf", OffgridConfig(seed=6))
    assert file_sha256(a) == file_sha256(b) != file_sha256(c)
    r = open_reader(a)
    assert field_value(r, KEY_SEED) == 5 and file_sha256(src) in field_value(r, KEY_SOURCE)
    for name in ("token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.bias"):
        np.testing.assert_array_equal(fvals(src, name), fvals(a, name))


def test_quantized_input_refused(models: dict[str, Path], tmp_path: Path) -> None:
    q = quantize_preset(models["llama"], tmp_path / "q8.gguf", "Q8_0").path
    with pytest.raises(RampError, match="dequantize first"):
        offgrid(q, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_offgrid(models: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "o.gguf"
    r = runner.invoke(app, ["offgrid", str(models["llama"]), "-o", str(out), "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert field_value(open_reader(out), KEY_SEED) == 2
    r = runner.invoke(app, ["offgrid", str(models["llama"]), "-o", str(out)])
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, ["offgrid", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.gguf")])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert (
        r.exit_code == 2
        and len(lines) == 1
        and lines[0].startswith("error:")
        and not (tmp_path / "x.gguf").exists()
    )


# -- the residual permutation (offgrid --permute, issue 23) ------------------------------------------------


@pytest.mark.parametrize("kind", list(SPECS))
def test_permuted_same_function_embeddings_moved(
    kind: str, models: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    src = models[kind]
    plain = offgrid(src, tmp_path / "plain.gguf", OffgridConfig(seed=3))
    perm = offgrid(src, tmp_path / "perm.gguf", OffgridConfig(seed=3, permute=True))
    assert field_value(open_reader(perm), KEY_PERMUTED) is True
    pm = plan_permutation(src, OffgridConfig(seed=3, permute=True))
    assert pm is not None and sorted(pm.order) == list(range(SPECS[kind].n_embd))
    # the same factors as without --permute, then the channels reordered: readers by column, the rest by row
    for name in pm.cols:
        np.testing.assert_array_equal(fvals(perm, name), fvals(plain, name)[:, pm.order])
    for name in pm.rows:
        np.testing.assert_array_equal(fvals(perm, name), fvals(plain, name)[pm.order])
    assert "token_embd.weight" in pm.cols and "output_norm.weight" in pm.rows
    if not SPECS[kind].tied:
        assert "output.weight" in pm.cols
    assert not np.array_equal(fvals(perm, "token_embd.weight"), fvals(src, "token_embd.weight"))
    k = kld(perm, src, tiny_text, CFG)
    assert abs(k.kld_mean) < 1e-4 and k.kld_max < 1e-2
    assert rel_rms(logits(src, tiny_text), logits(perm, tiny_text)) < 1e-2


@pytest.mark.parametrize("left_alone", ["blk.0.attn_norm.weight", "blk.1.ffn_up.weight", "output_norm.weight",
                                        "blk.0.post_ffw_norm.weight"])
def test_a_tensor_left_out_of_the_permutation_changes_the_function(
    left_alone: str, models: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    """Control for the test above: permuting every residual tensor but one is detected, for a norm, a reader
    and gemma3's post-norm (the records name each of them for a reason)."""
    src = models["gemma3" if "post_" in left_alone else "llama"]
    pm = plan_permutation(src, OffgridConfig(seed=3, permute=True))
    assert pm is not None and left_alone in pm.cols | pm.rows
    types = tensor_types(src)

    def permuted(n: str) -> TensorRewrite:
        order = pm.order
        fn = (lambda w: w[:, order]) if n in pm.cols else (lambda w: w[order])
        return TensorRewrite(T[types[n][0]], fn)

    whole = {n: permuted(n) for n in pm.cols | pm.rows}
    rewrite_gguf(src, tmp_path / "all.gguf", whole)
    rewrite_gguf(src, tmp_path / "bad.gguf", {n: r for n, r in whole.items() if n != left_alone})
    assert rel_rms(logits(src, tiny_text), logits(tmp_path / "all.gguf", tiny_text)) < 1e-2
    assert rel_rms(logits(src, tiny_text), logits(tmp_path / "bad.gguf", tiny_text)) > 1e-2


def test_cli_offgrid_permute(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.gguf"
    r = CliRunner().invoke(app, ["offgrid", str(models["llama"]), "-o", str(out), "--permute"])
    assert r.exit_code == 0, r.output
    assert field_value(open_reader(out), KEY_PERMUTED) is True
