"""Search at a whole-file size: `ramp-cpp search --size ...` (uniform, greedy or the SAC search) and `apply`
of a sized policy (`method="policy"`). `run_direct` is the whole run, a pipeline of stages over frozen
artifacts, configured by one `request.SizedRequest`:

    plan_run          plan.py          every cheap check, before any work → RunPlan (inventory read once)
    write_settings    sizedconfig.py   run.json: the run directory is this request's
    prepare_sources   stages.py        calibrate → fold (fold/source.py) → Source per folding choice
    measure_presets   stages.py        llama.cpp's presets with the unfolded model's imatrix → Presets (the
                                       preset a --size names is always scored: the never-worse rule's mark)
    measure_source    stages.py        the sensitivity and tensor cache of each folding choice → Measured
    decide_fold       stages.py        --fold auto's choice (folddecision.py) → FoldDecision; when --fold
                                       check keeps the unfolded model, release_folded deletes the folded copy
                                       and cache before the unfolded model is measured
    allocate          stages.py        SAC or a policy's rollout (learned.py) → Allocation
    fit_and_write     stages.py        the GGUF from the tensor cache with ramp.* metadata → Written
    evaluate          stages.py        its KLD and PPL on the reward chunks
    never_worse       neverworse.py    worse than the preset of the same size: the preset's file instead
    split_output      llama/splitout   with --split-max-size, the file written as a split set of shards
    write_reports     runreport.py     allocation.json, report.json, pareto.png, card → DirectResult

The budget is a whole-file size: `--size 95MiB`, or `--size Q4_K_M` for the size of that llama.cpp preset
(with the same imatrix) on this model.

Greedy's sensitivity is the measured one by default (`--sensitivity measured`, measure/groups.py): the proxy
errors rescaled per role × depth group by the KLD llama.cpp measures on the reward chunks when that group
alone is quantized to its cheapest candidate; `proxy` keeps the proxy as measured. Uniform reads no error.

`sac` (allocate/sac/search.py) starts from greedy's allocation on the same sensitivity and spends
`--evaluations` real evaluations of the reward chunks on what the additive proxy cannot see; `policy` is a
trained SAC policy's mean-action rollout on this model, zero-shot. Both are projected onto the budget.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ramp_cpp.costs import Meter, StageCost
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.fold.source import workdir
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.splitout import SplitOutput, existing_shards, split_gguf
from ramp_cpp.pipeline.neverworse import Verdict, never_worse
from ramp_cpp.pipeline.plan import MIB, plan_run
from ramp_cpp.pipeline.request import Hooks, SizedRequest
from ramp_cpp.pipeline.runreport import write_reports
from ramp_cpp.pipeline.sizedconfig import write_settings
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
    verdict: Verdict | None = None  # which file was written: the allocation's or the preset's
    gpu: dict[str, Any] | None = None  # report.json's summary "gpu" of a --gpu-size run
    split: SplitOutput | None = None  # the shards, with --split-max-size (`gguf` is the first)


def run_direct(
    req: SizedRequest, opts: RuntimeOptions = RuntimeOptions(), hooks: Hooks = Hooks(),
    executor: Executor | None = None,
) -> DirectResult:
    """Measure, allocate with `req.method` to the whole-file `req.size`; write GGUF and report to
    `req.run_dir` (request.SizedRequest says what each setting means). `opts`: llama.cpp's options;
    `hooks`: progress, SAC's episodes and each stage's costs as it ends (all of them also go to report.json's
    "costs" and `DirectResult.costs`); `executor`: where the tensor cache's passes, the group probes and the
    fold decision run (executor.py; default: one after another in this process): the answers do not depend on
    it, nor on where the tensor cache keeps its bytes."""
    plan = plan_run(req, executor.workers if executor else 1)
    write_settings(plan.run_dir, plan.settings)
    # what a run killed here before left half-written (a cache inside the run folder is swept with it)
    sweep_temps(plan.run_dir)
    if not plan.cache_root.is_relative_to(plan.run_dir):
        sweep_temps(plan.cache_root)
    # E: one forward pass over the reward chunks; disk held: the run folder and its caches
    held = lambda: disk_bytes(plan.run_dir, plan.cache_root)  # noqa: E731
    meter = Meter(plan.cfg.chunks * plan.cfg.n_ctx, hooks.on_cost, held)
    decided = kept_unfolded(plan)  # resumed after the fold check kept the unfolded model: no folded copy
    sources = prepare_sources(plan, opts, hooks.progress, meter, (False,) if decided else None)
    eopts = replace(opts, n_ctx=plan.cfg.n_ctx)
    rt = Runtime(opts, eopts, workdir(), hooks.progress, hooks.on_episode, meter, executor or Serial())
    base_cal = next(iter(sources.values())).base_cal
    try:
        with meter.stage("base log-probs"):
            warm_base(plan, rt)
        with meter.stage("presets"):
            base = measure_presets(plan, plan.presets, base_cal, rt)
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
            verdict = never_worse(plan, out, k, base, base_cal, rt)
    finally:
        shutil.rmtree(rt.scratch, ignore_errors=True)
    split = split_output(out.gguf, req.split_max)
    if split is not None:
        out = replace(out, gguf=split.first)
    rep = write_reports(plan, m, decision, alloc, out, k, base, meter.to_json(), verdict, split)
    return DirectResult(plan.run_dir, out.gguf, rep.allocation, rep.report, rep.file_bytes, base.target,
                        verdict.ppl, verdict.kld, tuple(meter.stages), verdict, rep.gpu, split)


def split_output(gguf: Path, split_max: int | None) -> SplitOutput | None:
    """The run's GGUF as a split set when asked (the one file removed), else None; either way no set of an
    earlier run of this folder is left beside it under its name."""
    if split_max is None:
        for q in existing_shards(gguf):
            q.unlink()
        return None
    return split_gguf(gguf, gguf, split_max, force=True)


def describe(r: DirectResult) -> str:
    """One line on the written file, and which file it is when the never-worse rule chose the preset's."""
    line = (
        f"{r.gguf.name}: {r.file_bytes / MIB:.2f} MiB (target {r.target_bytes / MIB:.2f}), "
        f"reward-text KLD {r.kld:.4f}, PPL {r.ppl:.3f}"
    )
    if r.gpu is not None:
        g = r.gpu
        line += (
            f"; on the GPU with {g['offload']}: {g['resident_bytes'] / MIB:.2f} MiB of tensors + "
            f"{g['kv_bytes'] / MIB:.2f} MiB KV = {g['resident_plus_kv'] / MIB:.2f} MiB "
            f"(--gpu-size {g['cap_bytes'] / MIB:.2f})"
        )
    v = r.verdict
    line = line if v is None or v.note is None else f"{line}; {v.note}"
    return line if r.split is None else f"{line}; {r.split.describe()}"
