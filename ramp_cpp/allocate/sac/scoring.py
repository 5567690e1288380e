"""The sized search's two connections to the outside: the layer embeddings of the searched tensors (read from
the GGUF) and the reward, an allocation's mean KLD on the reward chunks, assembled from the tensor cache
and scored through llama-cpp-python against the base's cached log-probs: in this process (`RewardScorer`),
or a round's allocations as one batch of evaluation jobs on an executor (`JobScorer`, `--workers`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.allocate.allocators import Choice
from ramp_cpp.allocate.sac.rollout import Context, Rollout, rollout
from ramp_cpp.calibration.artifact import Calibration
from ramp_cpp.calibration.features import N_STATIC, FeatureConfig, compute_features
from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import (
    EvalConfig,
    ensure_base_logprobs,
    kld_loaded,
    load_base_logprobs,
    reward_chunks,
)
from ramp_cpp.llama.ggufio import read_inventory, weight_moments
from ramp_cpp.measure.sensitivity import Sensitivity


def layer_embeddings(
    src: str | os.PathLike[str], cal: Calibration, sens: Sensitivity, variant: str
) -> np.ndarray:
    """(n_tensors, N_STATIC) standardized static dims of Table 24 for `sens.tensors`, in their order;
    `variant` "paper" takes Table 24's clipped dims, anything else ramp-cpp's unsaturated ones."""
    info = read_inventory(src)
    by_name = {t.name: t for t in info.tensors}
    ts = [by_name[t.name] for t in sens.tensors]
    moments = weight_moments(src, [t.name for t in ts])
    fv = "paper" if variant == "paper" else "ramp"
    feats = compute_features(info, moments, cal, FeatureConfig(variant=fv), ts)
    return feats.standardized()[:, :N_STATIC].astype(np.float32)


class RewardScorer:
    """score(choice) -> mean KLD of the allocation on the reward chunks (`ecfg` of `text`) against
    `base_path`. The episode file lives in `scratch` (tmpfs where there is one) and is overwritten each
    time; `seconds` accumulates assembly + load + scoring time. `on(executor)` scores batches of allocations
    as evaluation jobs instead, with the same base log-probs file and tokens."""

    def __init__(
        self,
        cache: object,
        base_path: str | os.PathLike[str],
        text: str,
        ecfg: EvalConfig,
        opts: RuntimeOptions,
        scratch: Path,
    ) -> None:
        self.cache = cache
        self.opts = replace(opts, n_ctx=ecfg.n_ctx)
        self.base_file = str(ensure_base_logprobs(base_path, text, ecfg, self.opts))
        self.base = load_base_logprobs(self.base_file)
        self.chunks = reward_chunks(base_path, text, ecfg, self.opts)
        self.scratch = scratch
        self.dst = scratch / "episode.gguf"
        self.seconds = 0.0

    def __call__(self, choice: Choice) -> float:
        from ramp_cpp.write.assemble import assemble

        t0 = time.perf_counter()
        assemble(self.cache, choice, self.dst, force=True)  # type: ignore[arg-type]
        with LlamaModel(self.dst, self.opts) as m:
            k = kld_loaded(m, list(self.chunks), self.base).kld_mean
        self.seconds += time.perf_counter() - t0
        return float(k)

    def on(self, executor: Executor) -> JobScorer:
        """This scorer's batches as jobs of `executor` (each with the executor's threads)."""
        return JobScorer(self, executor)


@dataclass
class JobScorer:
    """score_batch(choices) -> each allocation's mean KLD on the reward chunks, as one batch of
    `evaljob.EvalJob`s on `executor` (each job writes its file into its own folder under the scorer's
    scratch); the numbers `scorer` gives one by one."""

    scorer: RewardScorer
    executor: Executor
    seconds: float = 0.0

    def __call__(self, choices: Sequence[Choice]) -> list[float]:
        from ramp_cpp.measure.evaljob import EvalJob, run_eval_job

        t0 = time.perf_counter()
        sc = self.scorer
        opts = replace(sc.opts, n_threads=self.executor.threads or sc.opts.n_threads)
        jobs = [
            EvalJob(f"episode {i}", sc.cache, c, sc.base_file, sc.chunks, opts,  # type: ignore[arg-type]
                    str(sc.scratch))
            for i, c in enumerate(choices)
        ]
        out = [float(o.result.kld_mean) for o in self.executor.map(run_eval_job, jobs)]
        self.seconds += time.perf_counter() - t0
        return out


def policy_episode(
    pol: Any, src: str | os.PathLike[str], cal: Calibration, sens: Sensitivity, budget: int
) -> Rollout:
    """A sized policy's mean-action episode on a model (`apply`, and the benchmark's transfer rows): the
    model's own layer embeddings, the policy's state variant and span, projected onto `budget` bytes."""
    m = pol.meta
    z = layer_embeddings(src, cal, sens, m["variant"])
    ctx = Context(sens, z, budget, float(m["span"]), m["variant"])
    if ctx.obs_dim != int(m["obs_dim"]):
        raise RampError(f"the policy reads {m['obs_dim']} state dims, this rollout makes {ctx.obs_dim}")
    return rollout(ctx, lambda s: float(pol.actor.deterministic_action(s[None])[0, 0]))
