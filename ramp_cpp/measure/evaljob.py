"""One evaluation as a job an executor can run anywhere: a type map in, the reward KLD and its cost out.

    EvalJob      the file to score (a type map over a tensor cache, or over a source llama.cpp quantizes),
                 the base log-probs file it is compared with, the scored tokens (`evaluate.reward_chunks`,
                 tokenized once by the caller), llama.cpp's options
    run_eval_job writes the file into a fresh scratch folder (removed however the job ends), loads it,
                 scores the chunks against the base log-probs, and returns the `KLDResult` with its seconds

The job is self-contained and picklable, so `executor.Serial` runs it in this process and
`executor.RayExecutor` on a worker: every path in it must name the same file where the job runs (see the
module docstring of executor.py).
The same job gives the same KLD wherever it runs: llama.cpp's CPU results on these files do not depend on the
thread count (docs/workers.md says how that was checked).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import KLDResult
from ramp_cpp.llama.ggufio import ModelInfo
from ramp_cpp.store.cache import scratch_dir
from ramp_cpp.write.cachefiles import TensorCache


@dataclass(frozen=True)
class Quantized:
    """A file llama.cpp's quantizer writes from `source` (quantize_map's arguments)."""

    source: str
    base: GGMLQuantizationType
    imatrix: Mapping[str, np.ndarray] | None
    info: ModelInfo | None = None


@dataclass(frozen=True)
class EvalJob:
    label: str  # the caller's name for it (a group, "reference", "fold-on")
    origin: TensorCache | Quantized  # where the file's bytes come from
    types: Mapping[str, GGMLQuantizationType]  # tensors named here get their type, the others the base
    base_logprobs: str  # evaluate.base_logprobs_file: the reference the KLD is measured against
    chunks: tuple[np.ndarray, ...]  # the reward chunks' tokens (evaluate.reward_chunks of the base)
    opts: RuntimeOptions  # at the chunks' context
    scratch: str | None = None  # parent of the job's temporary folder where it exists, else cache.scratch_dir


@dataclass(frozen=True)
class EvalOutcome:
    label: str
    result: KLDResult
    seconds: float  # write + load + score


def _workdir(parent: str | None) -> Path:
    if parent and Path(parent).is_dir():
        return Path(tempfile.mkdtemp(prefix="ramp-eval-", dir=parent))
    return scratch_dir("eval")


def run_eval_job(job: EvalJob) -> EvalOutcome:
    """Write, load and score `job`'s file (module docstring)."""
    from ramp_cpp.llama.backend import LlamaModel
    from ramp_cpp.llama.evaluate import kld_loaded, load_base_logprobs, tokens_sha_of
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
    from ramp_cpp.write.assemble import assemble

    t0 = time.perf_counter()
    base = load_base_logprobs(job.base_logprobs)
    chunks = list(job.chunks)
    if tokens_sha_of(chunks) != base.tokens_sha:
        raise RampError(f"{job.label}: the job's tokens are not the ones the base log-probs were computed on")
    wd = _workdir(job.scratch)
    try:
        dst = wd / "eval.gguf"
        o = job.origin
        if isinstance(o, Quantized):
            qopts = QuantizeOptions(imatrix=o.imatrix, n_threads=job.opts.n_threads, force=True)
            quantize_map(o.source, dst, job.types, o.base, qopts, info=o.info)
        else:
            assemble(o, job.types, dst, force=True)
        with LlamaModel(dst, job.opts) as m:
            r = kld_loaded(m, chunks, base)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return EvalOutcome(job.label, r, time.perf_counter() - t0)
