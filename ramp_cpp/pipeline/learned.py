"""The sized run's learned methods (its `allocate` stage, stages.py): `sac`, the SAC search warm-started from
greedy's allocation (allocate/sac/search.py; its policy saved in the run directory), and `policy`, a trained
sized policy's mean-action rollout on this model, zero-shot. Both allocations are projected onto the budget
afterwards, by the fit stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp.executor import Executor, Serial
from ramp_cpp.fold.source import Source
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.pipeline.plan import RunPlan


def learned_allocation(
    plan: RunPlan,
    sens: Sensitivity,
    source: Source,
    cache: Any,
    target: int,
    eopts: RuntimeOptions,
    scratch: Path,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    executor: Executor | None = None,
) -> tuple[dict[str, GGMLQuantizationType], dict[str, Any]]:
    """The allocation of `plan.method` (sac or policy) on `sens` at `target`, and what to report of it.
    `eopts`: llama.cpp's options for scoring; `scratch`: where episode files go; `on_episode`: SAC's
    per-episode callback; `executor`: where a SAC round's evaluations run (None or serial: this process)."""
    from ramp_cpp.allocate.allocators import greedy
    from ramp_cpp.allocate.sac.policyfile import save_policy
    from ramp_cpp.allocate.sac.rollout import Context
    from ramp_cpp.allocate.sac.scoring import RewardScorer, layer_embeddings, policy_episode
    from ramp_cpp.allocate.sac.search import policy_meta, policy_tensors, rescore, search

    if plan.method == "policy":
        pol = plan.policy
        ep = policy_episode(pol, source.path, source.cal, sens, target)
        moved = sum(ep.proposed[t.name] != ep.choice[t.name] for t in sens.tensors)
        return ep.choice, {"policy_sha256": pol.sha256, "projected_tensors": int(moved)}
    sac, rd, ecfg, text = plan.sac, plan.run_dir, plan.cfg.eval_config, plan.text
    ctx = Context(sens, layer_embeddings(source.path, source.cal, sens, sac.variant), target, sac.span,
                  sac.variant, sac.projection)
    t0 = time.perf_counter()
    scorer = RewardScorer(cache, plan.model_path, text, ecfg, eopts, scratch)
    # a round of several rollouts goes to the run's workers; one at a time stays in this process, where the
    # loaded chunks and base log-probs are reused
    batch = None
    if executor is not None and not isinstance(executor, Serial) and sac.rollouts > 1:
        batch = scorer.on(executor)
    ref = greedy(sens, target)
    out = search(ctx, scorer, ref, sac, rd, on_episode, batch)
    save_policy(policy_tensors(out.agent), policy_meta(ctx, sac, sac.variant), rd / "policy.safetensors")
    choice, second = out.choice, None
    if sac.rescore_top > 0:  # a second look on the next chunks of the reward text (search.rescore)
        after = plan.cfg.first_chunk + plan.cfg.chunks  # the chunks after the reward's
        vcfg = replace(ecfg, first_chunk=after, n_chunks=sac.rescore_chunks)
        check = RewardScorer(cache, plan.model_path, text, vcfg, eopts, scratch)
        choice, _, table = rescore(sens, out.state, check, sac.rescore_top, target, ref)
        second = {"chunks": [vcfg.first_chunk, vcfg.n_chunks], "table": table}
    return choice, {
        "sac": {
            "evaluations": out.state.evaluations,
            "episodes": out.state.episode,
            "reward_kld": out.kld,
            "reward_kld_greedy": out.kld_ref,
            "reward_kld_policy": out.policy_kld,
            "rescored": second,
            "rollouts": sac.rollouts,
            "t_search": time.perf_counter() - t0,
            "policy": str(rd / "policy.safetensors"),
        }
    }
