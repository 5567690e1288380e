from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, KLDResult, base_logprobs, kld, perplexity, summarize
from ramp_cpp.llama.quantize import quantize_map
from ramp_cpp.store.cache import cache_dir

CFG = EvalConfig(n_ctx=128, n_chunks=4, top_k=32)


def _reference_nll(model: Path, text: str, n_ctx: int, n_chunks: int) -> np.ndarray:
    """llama-perplexity's protocol written out independently with llama-cpp-python's high-level API."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=n_ctx, logits_all=True, verbose=False, n_batch=n_ctx)
    toks = llm.tokenize(text.encode(), add_bos=True)
    out = []
    for j in range(n_chunks):
        c = toks[j * n_ctx : (j + 1) * n_ctx]
        c[0] = llm.token_bos()
        llm.reset()
        llm.eval(c)
        first = n_ctx // 2
        for pos in range(first, n_ctx - 1):
            x = np.asarray(llm.scores[pos], dtype=np.float64)
            lse = x.max() + np.log(np.exp(x - x.max()).sum())
            out.append(lse - x[c[pos + 1]])
    return np.asarray(out)


@pytest.mark.usefixtures("plain_llama")
def test_ppl_matches_independent_loop(tiny_model: Path, tiny_text: str) -> None:
    r = perplexity(tiny_model, tiny_text, CFG)
    ref = _reference_nll(tiny_model, tiny_text, CFG.n_ctx, 4)
    assert r.n_tokens == 4 * (128 - 1 - 64) == len(ref)
    assert r.ppl == pytest.approx(float(np.exp(ref.mean())), rel=1e-4)


def test_kld_of_base_against_itself_is_zero(tiny_model: Path, tiny_text: str) -> None:
    r = kld(tiny_model, tiny_model, tiny_text, CFG)
    assert r.kld_mean == pytest.approx(0.0, abs=1e-6)
    assert r.same_top_pct == 100.0 and r.ppl == pytest.approx(r.base_ppl)


def test_kld_estimate_matches_exact(tiny_model: Path, tiny_text: str, tmp_path: Path) -> None:
    q = tmp_path / "q3.gguf"
    quantize_map(tiny_model, q, {}, base="Q3_K")
    r = kld(q, tiny_model, tiny_text, CFG)
    # exact KLD from full distributions of both models
    exact = []
    with (
        LlamaModel(tiny_model, RuntimeOptions(n_ctx=128)) as b,
        LlamaModel(q, RuntimeOptions(n_ctx=128)) as m,
    ):
        toks = b.tokenize(tiny_text)
        for j in range(4):
            c = toks[j * 128 : (j + 1) * 128].copy()
            c[0] = b.bos
            lb = b.logits(c, 64, 127).astype(np.float64).copy()
            lq = m.logits(c, 64, 127).astype(np.float64)
            lb -= np.logaddexp.reduce(lb, axis=1, keepdims=True)
            lq = lq - np.logaddexp.reduce(lq, axis=1, keepdims=True)
            exact.append((np.exp(lb) * (lb - lq)).sum(axis=1))
    exact_mean = float(np.concatenate(exact).mean())
    # the random tiny model is nearly flat: most of its mass is outside the top-32, so this checks the
    # sampled tail estimate, not just the exact top-k part
    assert r.rest_mass_mean > 0.5
    assert r.kld_mean == pytest.approx(exact_mean, rel=0.03)
    assert r.ppl > r.base_ppl * 0.9 and r.n_tokens == 4 * 63


def test_base_logprobs_are_cached(tiny_model: Path, tiny_text: str) -> None:
    cfg = EvalConfig(n_ctx=128, n_chunks=2, first_chunk=1, top_k=8)
    a = base_logprobs(tiny_model, tiny_text, cfg)
    files = list((cache_dir() / "base-logprobs").glob("*.npz"))
    assert files
    mtimes = [f.stat().st_mtime_ns for f in files]
    b = base_logprobs(tiny_model, tiny_text, cfg)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(a.top_idx, b.top_idx) and a.top_idx.shape == (2 * 63, 8)
    assert np.all(np.diff(a.top_lp, axis=1) <= 0)


def test_text_too_short(tiny_model: Path) -> None:
    with pytest.raises(RampError, match="text too short: .* one chunk needs 128"):
        perplexity(tiny_model, "the city", CFG)
    with pytest.raises(RampError, match="asked for 99"):
        perplexity(tiny_model, "the city " * 300, EvalConfig(n_ctx=128, n_chunks=99))


def test_chunk_subset(tiny_model: Path, tiny_text: str) -> None:
    a = perplexity(tiny_model, tiny_text, EvalConfig(n_ctx=128, n_chunks=1, first_chunk=2))
    b = perplexity(tiny_model, tiny_text, EvalConfig(n_ctx=128, n_chunks=1, first_chunk=3))
    assert a.n_tokens == b.n_tokens == 63 and a.ppl != b.ppl


def test_base_logprob_sets_cut_from_the_largest_equal_sets_computed_alone(
    tiny_model: Path, tiny_text: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Reference: each set computed on its own (in another cache) against the sets cut from the largest one;
    the cut decodes only the largest set's chunks."""
    from ramp_cpp.llama import evaluate

    big = EvalConfig(n_ctx=128, n_chunks=4, top_k=8, tail_samples=8, up_to=True)
    sets = [EvalConfig(n_ctx=128, n_chunks=2, top_k=8, tail_samples=8), big,
            EvalConfig(n_ctx=128, n_chunks=1, top_k=8, tail_samples=8),
            EvalConfig(n_ctx=128, n_chunks=1, first_chunk=2, top_k=8, tail_samples=8)]  # not a prefix
    decoded: list[int] = []
    real = evaluate.base_logprobs

    def counting(path: object, text: str, cfg: EvalConfig, *a: object, **k: object) -> object:
        if not evaluate.base_logprobs_file(evaluate.file_sha256_cached(path), text, cfg).is_file():
            decoded.append(cfg.n_chunks or 0)
        return real(path, text, cfg, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate, "base_logprobs", counting)
    evaluate.base_logprobs_sets(tiny_model, tiny_text, sets)
    assert sorted(decoded) == [1, 4]  # the largest set and the one that is not its first chunks
    cut = {c: real(tiny_model, tiny_text, c) for c in sets}
    monkeypatch.setenv("RAMP_CACHE_DIR", str(tmp_path / "alone"))
    for c in sets:
        alone = real(tiny_model, tiny_text, c)
        for f in evaluate.BaseLogprobs.FIELDS:
            assert np.array_equal(getattr(alone, f), getattr(cut[c], f)), (c, f)
    assert len(list((tmp_path / "alone" / "base-logprobs").glob("*.npz"))) == len(sets)  # computed, not read


@pytest.mark.parametrize(
    ("env", "amx", "repack"),
    [(None, False, True), (None, True, False), ("1", True, True), ("0", False, False), ("", True, False)],
)
def test_weight_repacking_is_off_on_amx_cpus_unless_asked(
    monkeypatch: pytest.MonkeyPatch, env: str | None, amx: bool, repack: bool
) -> None:
    """llama.cpp's AMX matmul segfaults on some shapes (its issue 20824): models load without the extra
    buffer types there, RAMP_REPACK overriding either way."""
    from ramp_cpp.llama import backend

    if env is None:
        monkeypatch.delenv("RAMP_REPACK", raising=False)
    else:
        monkeypatch.setenv("RAMP_REPACK", env)
    monkeypatch.setattr(backend, "_cpu_has_amx", lambda: amx)
    assert backend.repack_weights() is repack


def _llama_percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's own percentile of the KLD values (`percentile` lambda in tools/perplexity): sorted,
    linear interpolation between the two ranks around fraction * (n - 1)."""
    v = np.sort(values)
    p = fraction * (len(v) - 1)
    i = int(p)
    return float((1 - (p - i)) * v[i] + (p - i) * v[min(i + 1, len(v) - 1)])


def _summary(kl: np.ndarray) -> KLDResult:
    z = np.zeros_like(kl)
    return summarize({"kld": kl, "nll_q": z, "nll_b": z, "same_top": z, "dp": z, "rest": z}, 8, 1, 1.0)


# (values, p99, p99.9, tolerance): an exact grid, and an exponential sample whose quantiles are -ln(1 - q)
_RNG = np.random.default_rng(0)
_EXP = _RNG.exponential(size=2_000_000)


@pytest.mark.parametrize(
    ("kl", "p99", "p999", "tol"),
    [
        (np.arange(1001) / 1000, 0.99, 0.999, 1e-12),
        (_RNG.permutation(np.arange(1001)) / 1000, 0.99, 0.999, 1e-12),
        (_EXP, -np.log(0.01), -np.log(0.001), 0.02),
    ],
)
def test_kld_tail_percentiles(kl: np.ndarray, p99: float, p999: float, tol: float) -> None:
    r = _summary(kl)
    assert r.kld_p99 == pytest.approx(p99, rel=tol)
    assert r.kld_p999 == pytest.approx(p999, rel=tol)
    # and exactly what llama-perplexity prints as "99.0%" and "99.9%   KLD" for the same values
    assert r.kld_p99 == pytest.approx(_llama_percentile(kl, 0.99), rel=1e-9)
    assert r.kld_p999 == pytest.approx(_llama_percentile(kl, 0.999), rel=1e-9)
