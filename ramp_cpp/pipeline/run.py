"""Search at a whole-file size: `ramp-cpp search --method uniform|greedy|sac --size ...`, and `apply` of a
sized policy (`method="policy"`). `run_direct` is the whole run, a pipeline of stages over frozen artifacts:

    plan_run          plan.py          every cheap check, before any work → RunPlan (inventory read once)
    write_settings    sizedconfig.py   run.json: the run directory is this request's
    prepare_sources   stages.py        calibrate → fold (fold/source.py) → Source per folding choice
    measure_presets   stages.py        llama.cpp's presets with the unfolded model's imatrix → Presets
    measure_source    stages.py        the sensitivity and tensor cache of each folding choice → Measured
    decide_fold       stages.py        --fold auto's choice (folddecision.py) → FoldDecision; when --fold
                                       check keeps the unfolded model, release_folded deletes the folded copy
                                       and cache before the unfolded model is measured
    allocate          stages.py        SAC or a policy's rollout (learned.py) → Allocation
    fit_and_write     stages.py        the GGUF from the tensor cache with ramp.* metadata → Written
    evaluate          stages.py        its KLD and PPL on the reward chunks
    write_reports     runreport.py     allocation.json, report.json, pareto.png → DirectResult

The configuration is `SizedConfig` (sizedconfig.py). The budget is a whole-file size: `--size 95MiB`, or
`--size Q4_K_M` for the size of that llama.cpp preset (with the same imatrix) on this model.

Greedy's sensitivity is the measured one by default (`--sensitivity measured`, measure/groups.py): the proxy
errors rescaled per role × depth group by the KLD llama.cpp measures on the reward chunks when that group
alone is quantized to its cheapest candidate; `proxy` keeps the proxy as measured. Uniform reads no error.

`sac` (allocate/sac/search.py) starts from greedy's allocation on the same sensitivity and spends
`--evaluations` real evaluations of the reward chunks on what the additive proxy cannot see; `policy` is a
trained SAC policy's mean-action rollout on this model, zero-shot. Both are projected onto the budget.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ramp_cpp.allocate.sac.search import SizedSearchConfig
from ramp_cpp.costs import Meter, StageCost
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.fold.source import Progress, workdir
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.plan import MIB, plan_run
from ramp_cpp.pipeline.runreport import write_reports
from ramp_cpp.pipeline.sizedconfig import DEFAULTS, SizedConfig, write_settings
from ramp_cpp.pipeline.stages import (
    Runtime,
    allocate,
    decide_fold,
    evaluate,
    fit_and_write,
    kept_unfolded,
    measure_presets,
    measure_source,
    prepare_sources,
    release_folded,
    warm_base,
)
from ramp_cpp.store.atomic import sweep_temps
from ramp_cpp.store.cache import disk_bytes


@dataclass(frozen=True)
class DirectResult:
    run_dir: Path
    gguf: Path
    allocation: Path
    report: Path
    file_bytes: int
    target_bytes: int
    ppl: float
    kld: float
    costs: tuple[StageCost, ...] = ()


def run_direct(
    model_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    method: str,
    size: str,
    cfg: SizedConfig = DEFAULTS,
    cc: CandidateConfig = CandidateConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    calib: str | os.PathLike[str] | None = None,
    presets: tuple[str, ...] = ("Q4_K_M", "Q3_K_M"),
    progress: Progress | None = None,
    sensitivity: str | None = "proxy",
    gcfg: GroupConfig | None = None,
    sac: SizedSearchConfig | None = None,
    policy: str | os.PathLike[str] | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    fold: str | None = None,
    on_cost: Callable[[StageCost], None] | None = None,
    executor: Executor | None = None,
    tensor_cache: str = "auto",
    row_sample: int = 1,
) -> DirectResult:
    """Measure, allocate with `method` to the whole-file `size`; write GGUF and report to `run_dir`.
    `cfg`: the SizedConfig. `sensitivity`: what greedy
    allocates on, `proxy` or `measured` (groups.py, configured by `gcfg`, None: GroupConfig's defaults); None
    means measured. `proxy` is this function's default so that library callers (bench/, tests) keep the
    allocation they had; the command line's default is `measured`. `sac`: the SAC search's settings (method
    "sac"); `policy`: the policy file method "policy" rolls out. `cache_root`: where the tensor cache and the
    measurements live (default: the run directory's `cache/`); runs of one model may share one. `fold`:
    "on", "off" or "auto" (None: `cfg.fold`); auto prepares both and keeps the one whose allocation
    (greedy's, for SAC) has the lower reward KLD (`choose_fold`). `on_cost`: called with each stage's costs
    (costs.StageCost) as it ends; all of them go to report.json's "costs" and `DirectResult.costs`.
    `executor`: where the tensor cache's passes, the group probes and the fold decision run (executor.py;
    default: one after another in this process); the answers do not depend on it. `tensor_cache`: where the
    candidate types' bytes live (plan.TENSOR_CACHES); the files do not depend on it either. `row_sample`: the
    proxy measures every k-th span of a linear's rows (proxy.MeasureConfig; 1: all rows)."""
    plan = plan_run(
        model_path, run_dir, method, size, cfg, cc, calib, sensitivity, gcfg, sac, policy, cache_root, fold,
        executor.workers if executor else 1, tensor_cache, row_sample,
    )
    write_settings(plan.run_dir, plan.settings)
    # what a run killed here before left half-written (a cache inside the run folder is swept with it)
    sweep_temps(plan.run_dir)
    if not plan.cache_root.is_relative_to(plan.run_dir):
        sweep_temps(plan.cache_root)
    # E: one forward pass over the reward chunks; disk held: the run folder and its caches
    held = lambda: disk_bytes(plan.run_dir, plan.cache_root)  # noqa: E731
    meter = Meter(plan.cfg.chunks * plan.cfg.n_ctx, on_cost, held)
    decided = kept_unfolded(plan)  # resumed after the fold check kept the unfolded model: no folded copy
    sources = prepare_sources(plan, opts, progress, meter, (False,) if decided else None)
    eopts = replace(opts, n_ctx=plan.cfg.n_ctx)
    rt = Runtime(opts, eopts, workdir(), progress, on_episode, meter, executor or Serial())
    try:
        with meter.stage("base log-probs"):
            warm_base(plan, rt)
        with meter.stage("presets"):
            base = measure_presets(plan, presets, next(iter(sources.values())).base_cal, rt)
        first = () if decided else plan.measured_first
        measured = {f: measure_source(plan, f, sources[f], rt) for f in first}
        with meter.stage("fold decision"):
            decision = decided or decide_fold(plan, measured, sources, base.target, rt)
        if decision.folded not in measured:  # --fold check kept the unfolded model: measured only now
            if True in measured:
                release_folded(plan, measured.pop(True), decision)
            measured[decision.folded] = measure_source(plan, decision.folded, sources[decision.folded], rt)
        m = measured[decision.folded]
        with meter.stage("allocate"):
            alloc = allocate(plan, m, base.target, rt)
            out = fit_and_write(plan, m, alloc, base.target, decision, rt)
        with meter.stage("evaluate"):
            k = evaluate(plan, out.gguf, rt)
    finally:
        shutil.rmtree(rt.scratch, ignore_errors=True)
    rep = write_reports(plan, m, decision, alloc, out, k, base, meter.to_json())
    return DirectResult(plan.run_dir, out.gguf, rep.allocation, rep.report, rep.file_bytes, base.target,
                        k.ppl, k.kld_mean, tuple(meter.stages))


def describe(r: DirectResult) -> str:
    return (
        f"{r.gguf.name}: {r.file_bytes / MIB:.2f} MiB (target {r.target_bytes / MIB:.2f}), "
        f"reward-text KLD {r.kld:.4f}, PPL {r.ppl:.3f}"
    )
