"""Evaluate stage: perplexity and KL divergence with llama.cpp's `llama-perplexity` protocol, in process.

Protocol (tools/perplexity/perplexity.cpp): the whole text is tokenized once (with BOS when the vocabulary
asks for it); chunk j is tokens[j*n_ctx:(j+1)*n_ctx] with its first token replaced by BOS; only the second
half is scored: the logits at positions first..n_ctx-2 (first = n_ctx/2) predict tokens first+1..n_ctx-1.

KLD against a base model uses the base's log-probabilities, computed once and cached on disk. A full
distribution per token (49k floats for SmolLM2) would make the cache hundreds of MB per few chunks, so per
scored token the cache keeps the base's top-k tokens exactly plus s tokens drawn from the rest of the
distribution by stratified inverse-CDF sampling of p restricted to the tail (p_rest = 1 - sum_top p_i):

    KLD = sum_{i in top-k} p_i (log p_i - log q_i)  +  p_rest * E_{i ~ p|tail}[log p_i - log q_i]
        ~ sum_{i in top-k} p_i (log p_i - log q_i)  +  p_rest * mean_{j<s}(log p_{i_j} - log q_{i_j})

The first term is exact; the second is an unbiased estimate of the tail's share, so the mean KLD is
unbiased (a single top-k + "rest bucket" would be a lower bound, 20% low at k=64 on SmolLM2-135M, whose
distributions are flat). bench/studies/kld_topk_error.py measures the error against the exact value.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import cache_dir, file_sha256_cached

Progress = Callable[[int, int], None]  # (chunks done, chunks total)


@dataclass(frozen=True)
class EvalConfig:
    n_ctx: int = 512  # llama-perplexity's default
    first_chunk: int = 0
    n_chunks: int | None = None  # None: every whole chunk of the text
    top_k: int = 64  # base log-probs kept exactly per scored token for KLD
    tail_samples: int = 64  # tokens sampled from the rest of the base distribution per scored token
    up_to: bool = False  # n_chunks is an upper bound: a shorter text gives what it has instead of an error

    def key(self) -> dict[str, Any]:
        """The fields as a cache key; `up_to` only when set, so keys written before it existed stay valid."""
        return {k: v for k, v in asdict(self).items() if k != "up_to" or v}


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_tokens: int
    n_chunks: int
    seconds: float
    tokens_per_second: float  # tokens decoded (n_chunks * n_ctx) per second


@dataclass(frozen=True)
class KLDResult:
    ppl: float
    base_ppl: float
    ppl_ratio: float
    ln_ppl_ratio: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_p999: float  # the 99.9th percentile: the tail llama-perplexity prints as "99.9%   KLD"
    kld_max: float
    same_top_pct: float
    delta_p_mean: float  # mean of p_q(token) - p_base(token), in percentage points
    delta_p_rms: float
    rest_mass_mean: float  # base probability outside the top-k (the sampled share of the KLD)
    top_k: int
    n_tokens: int
    n_chunks: int
    seconds: float
    # per-chunk mean KLD: two files scored on the same chunks are compared by their paired differences,
    # whose spread is far smaller than the per-token spread behind kld_stderr
    chunk_kld: tuple[float, ...] = ()


def chunks(tokens: np.ndarray, cfg: EvalConfig, bos: int | None) -> list[np.ndarray]:
    """The evaluated chunks of `tokens`, each of n_ctx tokens with BOS first when the model uses one."""
    n_avail = len(tokens) // cfg.n_ctx
    if n_avail < 1:
        raise RampError(f"text too short: {len(tokens)} tokens, one chunk needs {cfg.n_ctx} (lower --ctx)")
    n = n_avail - cfg.first_chunk if cfg.n_chunks is None else cfg.n_chunks
    if cfg.up_to:
        n = min(n, n_avail - cfg.first_chunk)
    if cfg.first_chunk < 0 or n < 1 or cfg.first_chunk + n > n_avail:
        raise RampError(
            f"text has {n_avail} chunks of {cfg.n_ctx} tokens; asked for {n} from chunk {cfg.first_chunk}"
        )
    out = []
    for j in range(cfg.first_chunk, cfg.first_chunk + n):
        c = tokens[j * cfg.n_ctx : (j + 1) * cfg.n_ctx].copy()
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 with a float64 normaliser (as llama-perplexity's double sum)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    lse = m + np.log(e.sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x - lse


def logsumexp_rows(x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of `x` (float32), using `buf` (same shape) as scratch so no 50 MB temporary
    is allocated per chunk: the PPL loop's cost stays close to the bare decode's."""
    m = x.max(axis=1)
    np.subtract(x, m[:, None], out=buf)
    np.exp(buf, out=buf)
    return m.astype(np.float64) + np.log(buf.sum(axis=1, dtype=np.float64))


class _Scorer:
    """Runs chunks and returns, per chunk, the raw logits of positions first..n-2 (a view into llama.cpp's
    buffer), their log-sum-exp and the tokens they predict: log p(i) = logits[i] - lse."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.buf: np.ndarray | None = None

    def __call__(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        first = len(chunk) // 2
        x = self.model.logits(chunk, first, len(chunk) - 1)
        if self.buf is None or self.buf.shape != x.shape:
            self.buf = np.empty(x.shape, dtype=np.float32)
        return x, logsumexp_rows(x, self.buf), chunk[first + 1 :]


def _tokens(model: LlamaModel, text: str, cfg: EvalConfig) -> list[np.ndarray]:
    return chunks(model.tokenize(text), cfg, model.bos if model.add_bos else None)


def perplexity(
    model_path: str | os.PathLike[str],
    text: str,
    cfg: EvalConfig = EvalConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
) -> PPLResult:
    """PPL = exp(mean NLL) over the second halves of the chunks."""
    with LlamaModel(model_path, _runtime(opts, cfg)) as model:
        cs = _tokens(model, text, cfg)
        score = _Scorer(model)
        nll = []
        t0 = time.perf_counter()
        for i, c in enumerate(cs):
            x, lse, tgt = score(c)
            nll.append(lse - x[np.arange(len(tgt)), tgt])
            if progress:
                progress(i + 1, len(cs))
        dt = time.perf_counter() - t0
    v = np.concatenate(nll)
    mean = float(v.mean())
    stderr = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return PPLResult(
        ppl=float(np.exp(mean)),
        ppl_stderr=float(np.exp(mean) * stderr),
        nll_mean=mean,
        n_tokens=len(v),
        n_chunks=len(cs),
        seconds=dt,
        tokens_per_second=len(cs) * cfg.n_ctx / dt if dt > 0 else 0.0,
    )


def _runtime(opts: RuntimeOptions, cfg: EvalConfig) -> RuntimeOptions:
    return RuntimeOptions(n_ctx=cfg.n_ctx, n_threads=opts.n_threads, n_gpu_layers=opts.n_gpu_layers)


# -- base log-probabilities -------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseLogprobs:
    """The base model's view of the scored tokens: top-k log-probs, tail samples, the target's log-prob."""

    tokens_sha: str
    top_idx: np.ndarray  # (N, k) int32, sorted by decreasing probability
    top_lp: np.ndarray  # (N, k) float32
    tail_idx: np.ndarray  # (N, s) int32, stratified samples of p restricted to the tokens outside top-k
    tail_lp: np.ndarray  # (N, s) float32
    target_lp: np.ndarray  # (N,) float32

    FIELDS = ("tokens_sha", "top_idx", "top_lp", "tail_idx", "tail_lp", "target_lp")


def tokens_sha_of(cs: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for c in cs:
        h.update(np.ascontiguousarray(c, dtype=np.int32).tobytes())
    return h.hexdigest()


def _top_k(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(lp, -k, axis=1)[:, -k:]
    vals = np.take_along_axis(lp, idx, axis=1)
    order = np.argsort(-vals, axis=1)
    return np.take_along_axis(idx, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)


def _tail_samples(
    x: np.ndarray, lse: np.ndarray, top_idx: np.ndarray, s: int, rng: np.random.Generator
) -> np.ndarray:
    """s token ids per row drawn from p (= softmax of x) restricted to the tokens outside top_idx,
    stratified: the j-th draw inverts the tail's CDF at (j + U_j) / s."""
    p = np.exp(x.astype(np.float64) - lse[:, None])
    np.put_along_axis(p, top_idx, 0.0, axis=1)
    cdf = np.cumsum(p, axis=1)
    u = (np.arange(s)[None, :] + rng.random((len(x), s))) / s * cdf[:, -1:]
    idx = np.empty((len(x), s), dtype=np.int32)
    for r in range(len(x)):
        idx[r] = np.minimum(np.searchsorted(cdf[r], u[r], side="right"), x.shape[1] - 1)
    return idx


def base_logprobs_file(base_sha256: str, text: str, cfg: EvalConfig) -> Path:
    """Where `base_logprobs` keeps the log-probs of the model with this sha256 on `text`'s chunks `cfg`."""
    key_src = json.dumps(
        {"base": base_sha256, "text": hashlib.sha256(text.encode()).hexdigest(), "cfg": cfg.key()},
        sort_keys=True,
    )
    return cache_dir() / "base-logprobs" / f"{hashlib.sha256(key_src.encode()).hexdigest()[:32]}.npz"


def is_prefix(small: EvalConfig, big: EvalConfig) -> bool:
    """Whether `small`'s chunks can be the first ones of `big`'s (same context, first chunk, top-k and tail
    samples, no more chunks); `base_logprobs_sets` checks the tokens themselves."""
    same = (small.n_ctx, small.first_chunk, small.top_k, small.tail_samples) == (
        big.n_ctx, big.first_chunk, big.top_k, big.tail_samples)
    return same and big.n_chunks is not None and small.n_chunks is not None and small.n_chunks <= big.n_chunks


def base_logprobs_sets(
    base_path: str | os.PathLike[str],
    text: str,
    cfgs: Sequence[EvalConfig],
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
) -> None:
    """The base log-probs of every chunk set in `cfgs`, each chunk decoded once: the set with the most chunks
    is computed (`base_logprobs`), and a set whose chunks are its first ones is cut out of it. A chunk's rows
    do not depend on the other chunks (each is its own context, its tail samples are seeded by its index
    first_chunk + i), so the cut equals what `base_logprobs` computes for that set alone."""
    sha = file_sha256_cached(base_path)
    todo = [c for c in dict.fromkeys(cfgs) if not base_logprobs_file(sha, text, c).is_file()]
    if not todo:
        return
    big = max(cfgs, key=lambda c: c.n_chunks or 0)
    full = base_logprobs(base_path, text, big, opts, progress)
    rest = [c for c in todo if c != big]
    cut = [c for c in rest if is_prefix(c, big)]
    if cut:
        with LlamaModel(base_path, _runtime(opts, big)) as model:
            tokens = model.tokenize(text)
            bos = model.bos if model.add_bos else None
        cs_big = chunks(tokens, big, bos)
        rows = full.target_lp.size // max(1, len(cs_big))
        for c in cut:
            cs = chunks(tokens, c, bos)
            same = all(np.array_equal(a, b) for a, b in zip(cs, cs_big, strict=False))
            if len(cs) > len(cs_big) or not same:
                continue
            n = len(cs) * rows
            part = BaseLogprobs(tokens_sha_of(cs), *(getattr(full, f)[:n] for f in BaseLogprobs.FIELDS[1:]))
            _save_base(part, base_logprobs_file(sha, text, c))
    for c in rest:  # what could not be cut is computed (a cut set's file is there now: not read back)
        if not base_logprobs_file(sha, text, c).is_file():
            base_logprobs(base_path, text, c, opts, progress)


def _save_base(out: BaseLogprobs, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{name: getattr(out, name) for name in BaseLogprobs.FIELDS})


def ensure_base_logprobs(
    base_path: str | os.PathLike[str], text: str, cfg: EvalConfig, opts: RuntimeOptions = RuntimeOptions()
) -> Path:
    """The file `base_logprobs` keeps for these arguments, computed first when it is not there (what the
    evaluation jobs read, wherever they run)."""
    path = base_logprobs_file(file_sha256_cached(base_path), text, cfg)
    if not path.is_file():
        base_logprobs(base_path, text, cfg, opts)
    return path


def load_base_logprobs(path: str | os.PathLike[str]) -> BaseLogprobs:
    """The log-probs `base_logprobs` saved at `path` (where a worker reads what the run computed)."""
    try:
        with np.load(path) as z:
            return BaseLogprobs(str(z["tokens_sha"]), *(z[f] for f in BaseLogprobs.FIELDS[1:]))
    except (OSError, KeyError, ValueError) as e:
        raise RampError(f"{path}: cannot read the base log-probs ({e})") from None


def base_logprobs(
    base_path: str | os.PathLike[str],
    text: str,
    cfg: EvalConfig = EvalConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
) -> BaseLogprobs:
    """Base log-probs for the scored tokens, from the on-disk cache when this exact (file, text, chunks,
    n_ctx, k) was computed before."""
    path = base_logprobs_file(file_sha256_cached(base_path), text, cfg)
    if path.is_file():
        return load_base_logprobs(path)
    with LlamaModel(base_path, _runtime(opts, cfg)) as model:
        cs = _tokens(model, text, cfg)
        score = _Scorer(model)
        k = min(cfg.top_k, model.n_vocab - 1)
        parts: dict[str, list[np.ndarray]] = {f: [] for f in BaseLogprobs.FIELDS[1:]}
        for i, c in enumerate(cs):
            x, lse, tgt = score(c)
            a, b = _top_k(x, k)
            tail = _tail_samples(x, lse, a, cfg.tail_samples, np.random.default_rng(cfg.first_chunk + i))
            parts["top_idx"].append(a)
            parts["top_lp"].append((b - lse[:, None]).astype(np.float32))
            parts["tail_idx"].append(tail)
            parts["tail_lp"].append((np.take_along_axis(x, tail, axis=1) - lse[:, None]).astype(np.float32))
            parts["target_lp"].append((x[np.arange(len(tgt)), tgt] - lse).astype(np.float32))
            if progress:
                progress(i + 1, len(cs))
    out = BaseLogprobs(tokens_sha_of(cs), *(np.concatenate(parts[f]) for f in BaseLogprobs.FIELDS[1:]))
    _save_base(out, path)
    return out


# -- KLD --------------------------------------------------------------------------------------------


def kld_terms(
    base: BaseLogprobs, rows: slice, x: np.ndarray, lse: np.ndarray, tgt: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-token statistics of the quantized model (logits `x`, their log-sum-exp `lse`) against the
    cached base rows `rows`."""
    idx, blp = base.top_idx[rows], base.top_lp[rows].astype(np.float64)
    p = np.exp(blp)
    q_at = np.take_along_axis(x, idx, axis=1).astype(np.float64) - lse[:, None]
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    kl = (p * (blp - q_at)).sum(axis=1)
    q_tail = np.take_along_axis(x, base.tail_idx[rows], axis=1).astype(np.float64) - lse[:, None]
    rest = p_rest * (base.tail_lp[rows].astype(np.float64) - q_tail).mean(axis=1)
    n = len(tgt)
    qt = x[np.arange(n), tgt].astype(np.float64) - lse
    return {
        "kld": kl + rest,  # unclipped: a per-token estimate may dip below 0, the mean stays unbiased
        "nll_q": -qt,
        "nll_b": -base.target_lp[rows].astype(np.float64),
        "same_top": (x.argmax(axis=1) == idx[:, 0]),
        "dp": np.exp(qt) - np.exp(base.target_lp[rows].astype(np.float64)),
        "rest": p_rest,
    }


def kld(
    model_path: str | os.PathLike[str],
    base_path: str | os.PathLike[str],
    text: str,
    cfg: EvalConfig = EvalConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
    base_progress: Progress | None = None,
) -> KLDResult:
    """llama-perplexity --kl-divergence statistics of `model_path` against `base_path`."""
    base = base_logprobs(base_path, text, cfg, opts, base_progress)
    with LlamaModel(model_path, _runtime(opts, cfg)) as model:
        cs = _tokens(model, text, cfg)
        if tokens_sha_of(cs) != base.tokens_sha:
            raise RampError(f"{model_path} tokenizes the text differently from the base {base_path}")
        return kld_loaded(model, cs, base, progress)


def kld_loaded(
    model: LlamaModel, cs: list[np.ndarray], base: BaseLogprobs, progress: Progress | None = None
) -> KLDResult:
    """KLD statistics of an already loaded model on chunks `cs` (those `base` was computed on)."""
    parts: dict[str, list[np.ndarray]] = {}
    score = _Scorer(model)
    t0 = time.perf_counter()
    row = 0
    for i, c in enumerate(cs):
        x, lse, tgt = score(c)
        for k, v in kld_terms(base, slice(row, row + len(tgt)), x, lse, tgt).items():
            parts.setdefault(k, []).append(v)
        row += len(tgt)
        if progress:
            progress(i + 1, len(cs))
    dt = time.perf_counter() - t0
    r = summarize({k: np.concatenate(v) for k, v in parts.items()}, base.top_idx.shape[1], len(cs), dt)
    return replace(r, chunk_kld=tuple(float(v.mean()) for v in parts["kld"]))


def eval_chunks(model: LlamaModel, text: str, cfg: EvalConfig) -> list[np.ndarray]:
    """The chunks `cfg` selects from `text`, tokenized by `model` (BOS first where the model uses one)."""
    return _tokens(model, text, cfg)


def reward_chunks(
    base_path: str | os.PathLike[str], text: str, cfg: EvalConfig, opts: RuntimeOptions = RuntimeOptions()
) -> tuple[np.ndarray, ...]:
    """`eval_chunks` of the model at `base_path`: the tokens every evaluation job of a batch scores, made
    once by the caller so that no job tokenizes the text again (0.5 s of SmolLM2's 9.6 s evaluation)."""
    with LlamaModel(base_path, _runtime(opts, cfg)) as model:
        return tuple(_tokens(model, text, cfg))


def forward_seconds(model: LlamaModel, cs: list[np.ndarray]) -> float:
    """Wall time of the bare forward passes over `cs`, same logits requested as scoring: the floor an
    evaluation can reach."""
    t0 = time.perf_counter()
    for c in cs:
        model.logits(c, len(c) // 2, len(c) - 1)
    return time.perf_counter() - t0


def summarize(t: dict[str, np.ndarray], top_k: int, n_chunks: int, seconds: float) -> KLDResult:
    kl = t["kld"]
    n = len(kl)
    ppl_q = float(np.exp(t["nll_q"].mean()))
    ppl_b = float(np.exp(t["nll_b"].mean()))
    return KLDResult(
        ppl=ppl_q,
        base_ppl=ppl_b,
        ppl_ratio=ppl_q / ppl_b,
        ln_ppl_ratio=float(t["nll_q"].mean() - t["nll_b"].mean()),
        kld_mean=float(kl.mean()),
        kld_stderr=float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        kld_median=float(np.median(kl)),
        kld_p99=float(np.percentile(kl, 99)),
        kld_p999=float(np.percentile(kl, 99.9)),
        kld_max=float(kl.max()),
        same_top_pct=float(100.0 * t["same_top"].mean()),
        delta_p_mean=float(100.0 * t["dp"].mean()),
        delta_p_rms=float(100.0 * np.sqrt((t["dp"] ** 2).mean())),
        rest_mass_mean=float(t["rest"].mean()),
        top_k=top_k,
        n_tokens=n,
        n_chunks=n_chunks,
        seconds=seconds,
    )
