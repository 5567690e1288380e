"""Calibration through llama.cpp's eval callback, checked against PyTorch forward hooks on the same tokens;
windows, recipes, the artifact, and the imatrix export."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import synthetic
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import (
    CalibConfig,
    Calibration,
    check_matches,
    load_calibration,
    save_calibration,
    write_imatrix,
)
from ramp_cpp.calibration.collect import calibrate, check_config, load_recipe, windows
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import open_reader, read_imatrix, read_inventory
from ramp_cpp.llama.native import stats_model
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map

TINY = CalibConfig(text="synthetic", samples=3, ctx=128, seed=0)

# llama.cpp runs F16 weights with activations rounded to F16 (2^-11 = 4.9e-4 relative) and an F16 KV
# cache; PyTorch runs everything in F32. On the 2-block synthetic model that leaves at most ~1.2e-3
# relative per column (measured); 5e-3 leaves headroom while a wrong token, position or row count moves
# the statistics by 1e-1 and more (test_reference_check_can_fail shows the margin).
TINY_RTOL = 5e-3

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(module: str) -> str:
    if module == "lm_head":
        return "output.weight"
    parts = module.split(".")  # model.layers.N.self_attn.q_proj
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:])]}.weight"


def hf_stats(path: Path, ws: list[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """GGUF name -> (max |x|, mean x^2, rows) of every nn.Linear's input, by transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    acc: dict[str, list] = {}

    def hook(name: str):
        def f(_mod, inp, _out) -> None:
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            a = acc.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0.0, 0])
            a[0] = torch.maximum(a[0], x.abs().max(0).values)
            a[1] = a[1] + (x * x).sum(0)
            a[2] += x.shape[0]

        return f

    for n, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook(_gguf_name(n)))
    with torch.no_grad():
        for w in ws:
            hf(torch.tensor(w[None, :], dtype=torch.long))
    return {k: (mx.numpy(), (sq / c).numpy(), c) for k, (mx, sq, c) in acc.items()}


def rel_errors(cal: Calibration, ref: dict[str, tuple[np.ndarray, np.ndarray, int]]) -> np.ndarray:
    """Per column |ours - ref| / ref of max_abs and mean_sq over every tensor, as one flat array each."""
    e_max, e_sq = [], []
    for name, (mx, ms, c) in ref.items():
        s = cal.stats[name]
        assert s.count == c, (name, s.count, c)
        e_max.append(np.abs(s.max_abs - mx) / mx)
        e_sq.append(np.abs(s.mean_sq - ms) / ms)
    return np.stack([np.concatenate(e_max), np.concatenate(e_sq)])


def _windows_of(path: Path, text: str, cfg: CalibConfig) -> list[np.ndarray]:
    with LlamaModel(path, RuntimeOptions(n_ctx=16)) as m:
        return windows(m.tokenize(text), cfg, m.bos if m.add_bos else None)


@pytest.fixture(scope="module")
def tiny_ref(tiny_model: Path, tiny_text: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    return hf_stats(tiny_model, _windows_of(tiny_model, tiny_text, TINY))


# -- agreement with an independent forward ------------------------------------------------------------


def test_stats_agree_with_transformers(tiny_model: Path, tiny_text: str, tiny_ref: dict) -> None:
    cal = calibrate(tiny_model, tiny_text, TINY)
    info = read_inventory(tiny_model)
    # every searched weight and the output head, nothing else (token_embd is a lookup, not a matmul)
    assert set(cal.stats) == {t.name for t in info.searched} | {"output.weight"}
    assert set(tiny_ref) == set(cal.stats)
    assert cal.n_tokens == TINY.samples * TINY.ctx
    assert all(s.count == cal.n_tokens for s in cal.stats.values())
    err = rel_errors(cal, tiny_ref)
    assert err[0].max() < TINY_RTOL and err[1].max() < TINY_RTOL, err.max(axis=1)
    # q, k and v read the same input
    q, k = cal.stats["blk.1.attn_q.weight"], cal.stats["blk.1.attn_k.weight"]
    assert np.array_equal(q.sum_sq, k.sum_sq) and np.array_equal(q.max_abs, k.max_abs)


def test_reference_check_can_fail(tiny_model: Path, tiny_text: str, tiny_ref: dict) -> None:
    """Other windows of the same text (another seed) are far outside the tolerance."""
    other = calibrate(tiny_model, tiny_text, replace(TINY, seed=1))
    assert rel_errors(other, tiny_ref).max() > 20 * TINY_RTOL


def test_pieces_keep_the_kv_cache(tiny_model: Path, tiny_text: str) -> None:
    """A window decoded in pieces (as 2048-token windows are) measures what one batch measures: the KV
    cache carries the earlier pieces, and every position of every piece is counted."""
    ws = _windows_of(tiny_model, tiny_text, replace(TINY, ctx=256, samples=2))
    got = {}
    for piece in (256, 48):
        with stats_model(tiny_model, RuntimeOptions(n_ctx=256), piece=piece) as m:
            for w in ws:
                m.run(w)
            got[piece] = m.stats()
    assert {s.count for s in got[48].values()} == {512}
    # attention over a partly filled cache takes other kernel paths (F16 rounding in other places): up to
    # 3e-3 measured; a cache lost between pieces would change the statistics by far more
    for name, s in got[256].items():
        np.testing.assert_allclose(got[48][name].sum_sq, s.sum_sq, rtol=TINY_RTOL, err_msg=name)
        np.testing.assert_allclose(got[48][name].max_abs, s.max_abs, rtol=TINY_RTOL, err_msg=name)


def hf_relative(path: Path, ws: list[np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name -> Σ_t x_tj² / ms(h_t) / T of every nn.Linear's input x, h_t the token's residual row where
    the linear's branch adds (the decoder layer's input for the attention, the post-attention norm's input for
    the MLP; the final norm's input for the head), ms its mean square, by transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ms: list[torch.Tensor] = []
    acc: dict[str, list] = {}

    def residual(_mod, inp) -> None:
        h = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
        ms[:] = [(h * h).mean(1)]

    def linear(name: str):
        def f(_mod, inp, _out) -> None:
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            a = acc.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            a[0] = a[0] + (x * x / ms[0][:, None]).sum(0)
            a[1] += x.shape[0]

        return f

    for n, m in hf.named_modules():
        if n.endswith(("input_layernorm", "post_attention_layernorm")) or n == "model.norm":
            m.register_forward_pre_hook(residual)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear(_gguf_name(n)))
    with torch.no_grad():
        for w in ws:
            hf(torch.tensor(w[None, :], dtype=torch.long))
    return {k: (sq / c).numpy() for k, (sq, c) in acc.items()}


def test_relative_stats_agree_with_transformers(tiny_model: Path, tiny_text: str) -> None:
    """The collector's residual-relative sums (rel_sq: each token's input row over its residual row's mean
    square, bench/studies/relproxy.py's weighting) against PyTorch hooks on the same tokens; without the
    residual nodes named, the weights' own statistics are the same as ever and nothing is divided."""
    ws = _windows_of(tiny_model, tiny_text, TINY)
    ref = hf_relative(tiny_model, ws)
    got, plain = {}, {}
    for residual, out in ((("embd", "ffn_inp-", "l_out-"), got), ((), plain)):
        with stats_model(tiny_model, RuntimeOptions(n_ctx=TINY.ctx), residual=residual) as m:
            for w in ws:
                m.run(w)
            out.update(stats=m.stats(), rel=m.collector.relative())  # type: ignore[union-attr]
    n_tokens = TINY.samples * TINY.ctx
    assert set(ref) <= set(got["rel"]) and {"embd", "ffn_inp-1", "l_out-1"} <= set(got["stats"])
    for name, want in ref.items():
        rel, rows = got["rel"][name]
        assert rows == n_tokens, name
        np.testing.assert_allclose(rel / rows, want, rtol=2 * TINY_RTOL, err_msg=name)
        np.testing.assert_array_equal(got["stats"][name].sum_sq, plain["stats"][name].sum_sq)
        assert plain["rel"][name][1] == 0
    # the check can fail: one block's residual in place of another's is far outside it
    rel, rows = got["rel"]["blk.1.ffn_up.weight"]
    assert np.abs(rel / rows / ref["blk.1.attn_q.weight"] - 1).max() > 20 * TINY_RTOL


@pytest.mark.slow
@pytest.mark.demo
def test_demo_stats_agree_with_transformers(demo_model: Path, wikitext: Callable[[str], str]) -> None:
    """SmolLM2-135M, 2 windows of 512 tokens of wikitext2-valid. Over 30 blocks the F16 rounding compounds,
    and columns whose mean x^2 is ~500x below the tensor's median carry the largest relative error
    (measured: median 3e-4, max 2.3e-2)."""
    text = wikitext("wikitext2-valid")
    cfg = CalibConfig(samples=2, ctx=512)
    cal = calibrate(demo_model, text, cfg)
    ref = hf_stats(demo_model, _windows_of(demo_model, text, cfg))
    ref["token_embd.weight"] = ref.pop("output.weight")  # tied head: llama.cpp multiplies by token_embd
    err = rel_errors(cal, ref)
    assert set(ref) == set(cal.stats)
    assert np.median(err, axis=1).max() < 2e-3, np.median(err, axis=1)
    assert err.max() < 5e-2, err.max(axis=1)


# -- windows and configuration ------------------------------------------------------------------------


def test_windows_are_seeded_distinct_and_start_with_bos() -> None:
    tokens = np.arange(10_000, dtype=np.int32) + 100
    cfg = CalibConfig(samples=5, ctx=1000, seed=3)
    a, b = windows(tokens, cfg, bos=1), windows(tokens, cfg, bos=1)
    assert [w.tolist() for w in a] == [w.tolist() for w in b]
    starts = [int(w[1]) - 101 for w in a]
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert all(s % 1000 == 0 for s in starts)  # aligned, so windows never overlap
    assert all(w[0] == 1 and len(w) == 1000 for w in a)
    assert [int(w[1]) for w in windows(tokens, replace(cfg, seed=4), None)] != [int(w[1]) for w in a]
    assert windows(tokens, cfg, bos=None)[0][0] == starts[0] + 100


@pytest.mark.parametrize(
    ("n_tokens", "cfg", "needed"),
    [
        (999, CalibConfig(samples=1, ctx=1000), "need 1000 tokens, found 999"),
        (5_000, CalibConfig(samples=6, ctx=1000), "need 6000 tokens, found 5000"),
    ],
)
def test_short_text_names_needed_and_found(n_tokens: int, cfg: CalibConfig, needed: str) -> None:
    with pytest.raises(RampError, match=needed):
        windows(np.zeros(n_tokens, dtype=np.int32), cfg, None)


def test_short_text_through_the_model(tiny_model: Path) -> None:
    with pytest.raises(RampError, match=r"need 384 tokens, found \d+"):
        calibrate(tiny_model, "the city of the world", TINY)


@pytest.mark.parametrize(
    ("cfg", "ctx_train", "match"),
    [
        (CalibConfig(samples=0), None, "samples must be >= 1"),
        (CalibConfig(ctx=1), None, "ctx must be >= 2"),
        (CalibConfig(seed=-1), None, "seed must be >= 0"),
        (CalibConfig(ctx=4096), 2048, "exceeds the model's training context of 2048"),
        (CalibConfig(text="wikitext2-test"), None, "held out"),
    ],
)
def test_bad_config(cfg: CalibConfig, ctx_train: int | None, match: str) -> None:
    with pytest.raises(RampError, match=match):
        check_config(cfg, ctx_train)


def test_recipes(tmp_path: Path) -> None:
    assert load_recipe("paper") == CalibConfig()  # the shipped recipe is the paper's defaults
    assert load_recipe("fast") == CalibConfig(samples=4, ctx=128)
    r = tmp_path / "mine.toml"
    r.write_text('text = "notes.txt"\nsamples = 2\n')
    assert load_recipe(str(r)) == CalibConfig(text="notes.txt", samples=2)
    r.write_text("samples = 2\nwindows = 3\n")
    with pytest.raises(RampError, match="unknown key 'windows'"):
        load_recipe(str(r))
    r.write_text('samples = "many"\n')
    with pytest.raises(RampError, match="samples must be int"):
        load_recipe(str(r))
    r.write_text("samples = [\n")
    with pytest.raises(RampError, match="not valid TOML"):
        load_recipe(str(r))
    with pytest.raises(RampError, match="unknown recipe 'huge'"):
        load_recipe("huge")


# -- artifact ------------------------------------------------------------------------------------------


def test_artifact_round_trip_and_model_check(tiny_model: Path, tiny_text: str, tmp_path: Path) -> None:
    cal = calibrate(tiny_model, tiny_text, TINY)
    assert len(cal.model_sha256) == 64 and cal.arch == "llama" and cal.model_name == tiny_model.name
    p = save_calibration(cal, tmp_path / "c.safetensors")
    back = load_calibration(p)
    assert back.header() == cal.header()
    for name, s in cal.stats.items():
        b = back.stats[name]
        assert np.array_equal(b.max_abs, s.max_abs) and np.array_equal(b.sum_sq, s.sum_sq)
        assert b.count == s.count
    check_matches(back, read_inventory(tiny_model))
    wider = synthetic.write(tmp_path / "wide.gguf", synthetic.Spec(n_embd=512, n_head=8, n_head_kv=4))
    with pytest.raises(RampError, match="has 256 input columns for blk.0.attn_q.weight, wide.gguf has 512"):
        check_matches(back, read_inventory(wider))
    deeper = synthetic.write(tmp_path / "deep.gguf", synthetic.Spec(n_layer=3))
    with pytest.raises(RampError, match="no statistics for 7 tensors of deep.gguf"):
        check_matches(back, read_inventory(deeper))
    qwen = synthetic.write(tmp_path / "qwen.gguf", synthetic.Spec(arch="qwen2"))
    with pytest.raises(RampError, match="measured on a llama model .* this model is qwen2"):
        check_matches(back, read_inventory(qwen))


def test_imatrix_export(tiny_model: Path, tiny_text: str, tmp_path: Path) -> None:
    cal = calibrate(tiny_model, tiny_text, TINY)
    p = write_imatrix(cal, tmp_path / "im.gguf")
    r = open_reader(p)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv == {
        "general.type": "imatrix",
        "imatrix.datasets": ["synthetic"],
        "imatrix.chunk_count": 3,
        "imatrix.chunk_size": 128,
    }
    names = [t.name for t in r.tensors]
    assert names[:2] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts"]  # sorted, paired
    im = read_imatrix(p)
    assert set(im) == set(cal.stats)  # blk.* and output.weight
    for name, v in cal.imatrix().items():
        np.testing.assert_allclose(im[name], v, rtol=1e-6)
    with pytest.raises(RampError, match="exists"):
        write_imatrix(cal, p)

    # llama.cpp's quantizer takes it, and it changes what a K-quant writes
    types = {"blk.0.attn_q.weight": "Q3_K"}
    a = quantize_map(tiny_model, tmp_path / "a.gguf", types, "Q4_K", QuantizeOptions(imatrix=im))
    b = quantize_map(tiny_model, tmp_path / "b.gguf", types, "Q4_K")
    assert a.file_size == b.file_size

    def q_bytes(path: str) -> bytes:
        return bytes(next(t for t in open_reader(path).tensors if t.name == "blk.0.attn_q.weight").data)

    assert q_bytes(a.path) != q_bytes(b.path)


# -- command line ---------------------------------------------------------------------------------------

runner = CliRunner()


def _fails(args: list[str], match: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert match in lines[0], lines[0]


def test_cli_calibrate_and_imatrix(tiny_model: Path, tiny_text: str, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(tiny_text)
    out, im = tmp_path / "c.safetensors", tmp_path / "im.gguf"
    args = ["calibrate", str(tiny_model), "--recipe", "fast", "--text", str(text), "--samples", "3"]
    r = runner.invoke(app, [*args, "-o", str(out), "--imatrix", str(im), "--json", "-t", "1"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["config"] == {"text": str(text), "samples": 3, "ctx": 128, "seed": 0}  # recipe + overrides
    assert d["n_tokens"] == 384 and d["n_tensors"] == 15
    cal = load_calibration(out)
    assert set(read_imatrix(im)) == set(cal.stats)
    # the same windows as the library call
    ref = calibrate(tiny_model, tiny_text, replace(TINY, text=str(text)))
    name = "blk.1.ffn_down.weight"
    assert np.array_equal(cal.stats[name].sum_sq, ref.stats[name].sum_sq)
    im2 = tmp_path / "im2.gguf"
    r = runner.invoke(app, ["imatrix", str(out), "-o", str(im2)])
    assert r.exit_code == 0 and "15 tensors" in r.stdout, r.output
    assert im2.read_bytes() == im.read_bytes()


def test_cli_bad_inputs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    short = tmp_path / "short.txt"
    short.write_text("the city of the world")
    base = ["calibrate", str(tiny_model), "-o", str(out), "--recipe", "fast"]
    _fails([*base, "--text", str(short)], "need 512 tokens, found")
    _fails([*base, "--text", "wikitext2-test"], "held out")
    _fails([*base, "--ctx", "1024"], "exceeds the model's training context of 256")
    _fails([*base, "--samples", "0"], "samples must be >= 1")
    _fails([*base, "--recipe", "nope"], "unknown recipe 'nope'")
    _fails([*base, "--imatrix", str(out)], "same file")
    _fails(["calibrate", str(tmp_path / "missing.gguf"), "-o", str(out), "--recipe", "fast"], "no such file")
    _fails(["imatrix", str(short), "-o", str(tmp_path / "im.gguf")], "not a ramp-cpp calibration file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]
