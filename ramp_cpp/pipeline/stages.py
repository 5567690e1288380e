"""The sized run's stages after its plan (plan.py), in the order `run.run_direct` calls them:

    prepare_sources  the calibration, and the folded model when asked (both kept in the run directory)
    measure_presets  llama.cpp's presets with the unfolded model's imatrix: the reference points, and the
                     target of a --size that names a preset
    measure_source   the proxy sensitivity and tensor cache of one folding choice (rescaled by measured
                     KLDs when the sensitivity is `measured`); a measurement of a larger candidate set
                     (the full one, for --types portable) gives its rows and its probes' files, unmeasured
    decide_fold      --fold auto: the folding whose allocation scores the lower reward KLD
    allocate         a learned method's allocation (the SAC search, or a policy's rollout)
    fit_and_write    the allocation at the target, assembled with ramp.* metadata, allocated again below the
                     target while the metadata pushes the file past it
    evaluate         the written file's KLD and PPL on the reward chunks

Each takes the plan, what earlier stages made (frozen artifacts: `Source`, `Presets`, `Measured`,
`FoldDecision`, `Allocation`, `Written`) and the `Runtime`; the report stage is runreport.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp import __version__
from ramp_cpp.costs import Meter, stage
from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.fold.source import Progress, Source, calibrated_source, ramp_output_name, staged
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import KLDResult
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.pipeline.folddecision import (
    FOLD_CHECK_CHUNKS,
    FOLD_CHUNKS,
    KEPT_UNFOLDED,
    Fold,
    FoldDecision,
    FoldEvidence,
    load_kept,
    save_kept,
)
from ramp_cpp.pipeline.learned import learned_allocation
from ramp_cpp.pipeline.plan import LEARNED, RunPlan, check_target
from ramp_cpp.pipeline.sizedconfig import SourceChoice
from ramp_cpp.store.jsonfile import read_keyed, write_keyed

Choice = dict[str, GGMLQuantizationType]

PRESETS = "presets.json"  # the presets' sizes and scores, kept with the run (measure_presets)
SCORES = "scores.json"  # the fold decision's per-chunk KLDs, kept with the run (_score_files)


@dataclass(frozen=True)
class Runtime:
    """How the stages run: llama.cpp's options (`opts`; `eopts` at the run's context, for scoring), the
    scratch folder (`scratch`, removed when the run ends), the progress callback and SAC's per-episode one."""

    opts: RuntimeOptions
    eopts: RuntimeOptions
    scratch: Path
    progress: Progress | None = None
    on_episode: Callable[[dict[str, Any]], None] | None = None
    meter: Meter | None = None  # each stage's costs (costs.py)
    executor: Executor = field(default_factory=Serial)  # where batches of evaluations run (executor.py)


def prepare_sources(
    plan: RunPlan, opts: RuntimeOptions, progress: Progress | None = None, meter: Meter | None = None,
    foldings: tuple[bool, ...] | None = None,
) -> dict[bool, Source]:
    """The source of each folding choice the plan prepares (unfolded first; `foldings`: only these), on one
    calibration: the run's own, `plan.calib`'s, or a new one; the folded model is written once and reused."""
    return {
        f: calibrated_source(
            plan.model_path, plan.run_dir, SourceChoice(plan.cfg.calib, f), opts, plan.calib, progress,
            plan.info, meter, plan.cfg.fold_config,
        )
        for f in (plan.foldings if foldings is None else foldings)
    }


@dataclass(frozen=True)
class Presets:
    """The run's whole-file `target` in bytes, and the presets' rows of report.json (`points`), by preset
    name too (`scored`)."""

    target: int
    points: tuple[dict[str, Any], ...]
    scored: Mapping[str, dict[str, Any]] = field(default_factory=dict)


def warm_base(plan: RunPlan, rt: Runtime) -> None:
    """The unfolded model's log-probs on every chunk the run scores (the reward chunks; with --fold auto the
    fold decision's too; the probes' first chunks), computed once into the user cache so the stages after
    only read them; each chunk is decoded once (a set that is the first chunks of another is cut from it)."""
    from ramp_cpp.llama.evaluate import base_logprobs_sets

    base_logprobs_sets(plan.model_path, plan.text, scored_chunk_sets(plan), rt.eopts)


def scored_chunk_sets(plan: RunPlan) -> list[Any]:
    """The evaluate.EvalConfig of every chunk set the run scores files on (warm_base's)."""
    ecfg = plan.cfg.eval_config
    cfgs = [ecfg, *([fold_eval_config(plan)] if plan.fold.decided_by_run else [])]
    if plan.sensitivity == "measured" and plan.gcfg.chunks is not None:
        cfgs.append(replace(ecfg, n_chunks=min(plan.gcfg.chunks, plan.cfg.chunks)))
    return cfgs


def fold_eval_config(plan: RunPlan) -> Any:
    """The chunks --fold auto (check) scores both foldings on: the first FOLD_CHUNKS (FOLD_CHECK_CHUNKS) of
    the reward text, and at least the reward chunks."""
    ecfg = plan.cfg.eval_config
    n = FOLD_CHECK_CHUNKS if plan.fold is Fold.CHECK else FOLD_CHUNKS
    return replace(ecfg, first_chunk=0, n_chunks=max(n, ecfg.n_chunks or 0), up_to=True)


def measure_presets(plan: RunPlan, presets: tuple[str, ...], base_cal: Any, rt: Runtime) -> Presets:
    """Quantize and score each of `presets` with the unfolded model's imatrix (`base_cal`'s), as a llama.cpp
    user would; the preset a --size names is quantized too, for its file size (the target), and scored only
    when it is among `presets` (the plan's presets hold it: the never-worse rule reads its score). Each
    preset's size and score are saved in the run directory (PRESETS) as it ends: a 7B preset is a quantizer
    pass and a decode of the reward chunks, not paid again on resume."""
    from ramp_cpp.llama.evaluate import kld
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset
    from ramp_cpp.measure.tensorcache import imatrix_digest
    from ramp_cpp.store.cache import file_sha256_cached

    base_im = base_cal.imatrix() if plan.cfg.imatrix else None
    key = {"model_sha256": file_sha256_cached(plan.model_path), "imatrix_digest": imatrix_digest(base_im),
           "eval": plan.cfg.eval_config.key()}
    saved = read_keyed(plan.run_dir / PRESETS, key)
    target, points, scored_by = plan.target, [], {}
    for name in dict.fromkeys([*presets, *([plan.preset] if plan.preset else [])]):
        scored = name in presets  # else quantized for its size only: no reference point was asked for
        have = saved.get(name)
        if not have or (scored and have.get("point") is None):
            q = rt.scratch / f"{name}.gguf"
            qopts = QuantizeOptions(imatrix=base_im, n_threads=rt.opts.n_threads)
            r = quantize_preset(plan.model_path, q, name, qopts, info=plan.info)
            have = {"file_size": r.file_size, "point": None}
            if scored:
                k = kld(q, plan.model_path, plan.text, plan.cfg.eval_config, rt.eopts)
                label = f"{name}+imatrix" if base_im is not None else name
                have["point"] = {"label": label, "file_bytes": r.file_size, "quality": k.kld_mean,
                                 "ppl": k.ppl, "kind": "preset"}
            q.unlink(missing_ok=True)
            saved[name] = have
            write_keyed(plan.run_dir / PRESETS, key, saved)
        if name == plan.preset:
            target = have["file_size"]
            check_target(target, plan.lo, plan.hi, f"{name}'s size")
        if scored:
            points.append(have["point"])
            scored_by[name] = have["point"]
    return Presets(target, tuple(points), scored_by)


@dataclass(frozen=True)
class Measured:
    """What one folding choice prepared: its source, proxy sensitivity `sens`, the sensitivity the allocator
    reads (`alloc_sens`: `sens` rescaled by the measured KLD groups, `groups`, or `sens` itself), the tensor
    cache, and the seconds it took."""

    folded: bool
    source: Source
    sens: Sensitivity
    alloc_sens: Sensitivity
    groups: Any  # groups.GroupReport, or None
    cache: Any  # tensorcache.TensorCache
    seconds: float


def measure_source(plan: RunPlan, folded: bool, source: Source, rt: Runtime) -> Measured:
    """Measure → tensor cache → (measured sensitivity) of `source`, all cached under `plan.cache_root`."""
    from ramp_cpp.measure.groups import calibrate_sensitivity
    from ramp_cpp.measure.proxy import MeasureConfig, measure
    from ramp_cpp.measure.tensorcache import build_cache

    im = source.cal.imatrix() if plan.cfg.imatrix else None
    t0 = time.perf_counter()
    cc, progress = plan.cc, rt.progress
    mcfg = MeasureConfig(
        candidates=cc, n_threads=rt.opts.n_threads, in_memory=plan.in_memory, row_sample=plan.row_sample
    )
    what = "folded" if folded else "unfolded"
    with stage(rt.meter, f"tensor cache + proxy ({what})"):
        sens = measure(
            source.path, source.cal, im, mcfg, plan.cache_root, staged(progress, "measure"),
            staged(progress, "tensor cache"), text=None, info=source.info, executor=rt.executor,
        )
        cache = build_cache(
            source.path, cc.requested(), plan.cache_root, imatrix=im, base=cc.base,
            n_threads=rt.opts.n_threads, searched=[t.name for t in sens.tensors], info=source.info,
            executor=rt.executor, in_memory=plan.in_memory,
        )
    alloc_sens, groups = sens, None
    if plan.sensitivity == "transferred":  # other models' group ratios: no evaluation (transfer.py)
        alloc_sens = sens.scaled(plan.ratios.factors(source.info, [t.name for t in sens.tensors]))
    if plan.sensitivity == "measured":
        # against the unfolded model: the folded source computes the same function
        with stage(rt.meter, f"group probes ({what})"):
            ecfg = plan.cfg.eval_config
            if plan.gcfg.chunks is not None:
                ecfg = replace(ecfg, n_chunks=min(plan.gcfg.chunks, plan.cfg.chunks))
            alloc_sens, groups = calibrate_sensitivity(
                sens, cache, plan.model_path, plan.text, ecfg, rt.eopts, plan.gcfg,
                staged(progress, "kld groups"), scratch=rt.scratch, executor=rt.executor,
            )
    return Measured(folded, source, sens, alloc_sens, groups, cache, time.perf_counter() - t0)


def decide_fold(
    plan: RunPlan, measured: Mapping[bool, Measured], sources: Mapping[bool, Source], target: int, rt: Runtime
) -> FoldDecision:
    """The folding the request named; with --fold auto the one whose allocation (greedy's, for the learned
    methods) scores the lower KLD on the first FOLD_CHUNKS chunks of the reward text; with --fold check,
    folding unless the folded model's allocation, quantized by llama.cpp from the unfolded model with its own
    imatrix, scores clearly lower on FOLD_CHECK_CHUNKS chunks (folddecision.choose_fold)."""
    if plan.fold is Fold.CHECK:
        return _check_fold(plan, measured[True], sources[False], target, rt)
    if plan.fold is not Fold.AUTO:
        (folded,) = measured
        return FoldDecision(folded)
    from ramp_cpp.allocate.allocators import ALLOCATORS

    probe = "greedy" if plan.method in LEARNED else plan.method
    jobs = {
        str(f): (m.cache, ALLOCATORS[probe](m.alloc_sens, target, gpu=plan.gpu_budget(m.alloc_sens)))
        for f, m in measured.items()
    }
    per = _score_files(plan, jobs, fold_eval_config(plan), rt)
    return FoldDecision.auto(probe, FoldEvidence.of(per["True"], per["False"]))


def kept_unfolded(plan: RunPlan) -> FoldDecision | None:
    """A resumed run's --fold check that already kept the unfolded model (`release_folded`), else None."""
    return load_kept(plan.run_dir / KEPT_UNFOLDED) if plan.fold is Fold.CHECK else None


def release_folded(plan: RunPlan, folded: Measured, decision: FoldDecision) -> None:
    """--fold check kept the unfolded model: save the decision, then delete the folded copy and (when it lives
    in the run folder, not in a cache root other runs share) the folded model's tensor cache, before the
    unfolded model is measured. The run's disk then peaks at the larger of the two measurements, not at
    their sum (the 7B shape's run held 29.7 GiB, 2.37x its F16 file, with both)."""
    from ramp_cpp.measure.tensorcache import remove_cache

    save_kept(plan.run_dir / KEPT_UNFOLDED, decision)
    run = plan.run_dir.resolve()
    if folded.cache.directory.resolve().is_relative_to(run):
        remove_cache(folded.cache)
    if folded.source.path.resolve().parent == run:
        folded.source.path.unlink(missing_ok=True)


def _check_fold(plan: RunPlan, on: Measured, off: Source, target: int, rt: Runtime) -> FoldDecision:
    from ramp_cpp.allocate.allocators import ALLOCATORS
    from ramp_cpp.measure.evaljob import Quantized

    probe = "greedy" if plan.method in LEARNED else plan.method
    choice = ALLOCATORS[probe](on.alloc_sens, target, gpu=plan.gpu_budget(on.alloc_sens))
    im = off.cal.imatrix() if plan.cfg.imatrix else None
    # the unfolded file is the one llama.cpp writes for the same map from the unfolded model
    jobs = {"on": (on.cache, choice), "off": (Quantized(str(off.path), plan.cc.base, im, off.info), choice)}
    per = _score_files(plan, jobs, fold_eval_config(plan), rt)
    return FoldDecision.auto(probe, FoldEvidence.of(per["on"], per["off"]), "check")


def _score_files(
    plan: RunPlan, files: Mapping[str, tuple[Any, Choice]], ecfg: Any, rt: Runtime
) -> dict[str, tuple[float, ...]]:
    """Each named (origin, type map)'s per-chunk KLD against the unfolded model on `ecfg`'s chunks, as one
    batch of the run's executor (evaljob.EvalJob: origin a tensor cache or a `Quantized` source). Scores are
    saved in the run directory (SCORES) under what they were computed from, so a resumed run scores only the
    files it has not."""
    from ramp_cpp.llama.evaluate import ensure_base_logprobs, reward_chunks
    from ramp_cpp.measure.evaljob import EvalJob, run_eval_job

    ropts = replace(rt.eopts, n_ctx=ecfg.n_ctx, n_threads=rt.executor.threads or rt.eopts.n_threads)
    base_file = str(ensure_base_logprobs(plan.model_path, plan.text, ecfg, ropts))
    keys = {label: _score_key(origin, choice, base_file) for label, (origin, choice) in files.items()}
    saved = read_keyed(plan.run_dir / SCORES, {"format": 1})
    todo = {label: f for label, f in files.items() if keys[label] not in saved}
    if todo:
        chunks = reward_chunks(plan.model_path, plan.text, ecfg, ropts)
        jobs = [
            EvalJob(label, origin, choice, base_file, chunks, ropts, str(rt.scratch))
            for label, (origin, choice) in todo.items()
        ]
        for o in rt.executor.map(run_eval_job, jobs):
            saved[keys[o.label]] = list(o.result.chunk_kld)
            write_keyed(plan.run_dir / SCORES, {"format": 1}, saved)
    return {label: tuple(saved[keys[label]]) for label in files}


def _score_key(origin: Any, choice: Choice, base_file: str) -> str:
    """What a score was computed from: the bytes' origin (a tensor cache's model, imatrix and base type, or
    the source llama.cpp quantizes with its imatrix), the type map, and the base log-probs it is compared with
    (their file name holds the base's sha256, the text and the chunks)."""
    from ramp_cpp.measure.evaljob import Quantized
    from ramp_cpp.measure.tensorcache import imatrix_digest
    from ramp_cpp.store.cache import file_sha256_cached

    if isinstance(origin, Quantized):
        src = {"source": file_sha256_cached(origin.source), "imatrix": imatrix_digest(origin.imatrix),
               "base": origin.base.name, "by": "llama.cpp"}
    else:
        src = {"source": origin.model_sha256, "imatrix": origin.imatrix_digest, "base": origin.base.name,
               "by": "cache"}
    types = {n: t.name for n, t in sorted(choice.items())}
    d = {**src, "types": types, "base_logprobs": Path(base_file).name}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Allocation:
    """A learned method's allocation before it is fitted to the file (`learned`; None for the allocators,
    which compute theirs at the fit) and what the report says of its search (`summary`)."""

    learned: Choice | None
    summary: dict[str, Any]


def allocate(plan: RunPlan, m: Measured, target: int, rt: Runtime) -> Allocation:
    """The SAC search or a policy's rollout on `m` (learned.py); nothing to do for greedy and uniform."""
    if plan.method not in LEARNED:
        return Allocation(None, {})
    choice, summary = learned_allocation(
        plan, m.alloc_sens, m.source, m.cache, target, rt.eopts, rt.scratch, rt.on_episode, rt.executor
    )
    return Allocation(choice, summary)


@dataclass(frozen=True)
class Written:
    """The run's GGUF, the allocation it holds (`choice`) and its ramp.* metadata (`meta`)."""

    gguf: Path
    choice: Choice
    meta: dict[str, Any]
    file_bytes: int = 0  # the allocation's file, as written (the never-worse rule may replace it)


def fit_and_write(
    plan: RunPlan, m: Measured, alloc: Allocation, target: int, decision: FoldDecision, rt: Runtime
) -> Written:
    """Allocate at `target` (or project the learned allocation onto it), assemble the GGUF from the tensor
    cache with its ramp.* metadata. The metadata grows the header after the allocation was made, so the
    allocation is made for `target` less a bound on that growth (`metadata_bound`) before anything is
    assembled; if the file is still over the target, allocate again with the budget lowered by the
    overshoot (3 tries). One assembly where there were two: at 7B each one quantizes gigabytes."""
    from ramp_cpp.allocate.allocators import ALLOCATORS, project
    from ramp_cpp.llama.ggufio import add_metadata
    from ramp_cpp.measure.tensorcache import assemble

    gguf = plan.run_dir / ramp_output_name(plan.model_path, plan.preset or plan.size.strip())
    out = rt.scratch / "out.gguf"

    def fill(budget: int) -> tuple[Choice, dict[str, Any]]:
        if alloc.learned is not None:
            choice = project(m.alloc_sens, alloc.learned, budget)
        else:
            choice = ALLOCATORS[plan.method](m.alloc_sens, budget, gpu=gpu)
        meta = metadata(
            m.sens, choice, plan.method, plan.size, target, m.folded, plan.cfg.imatrix,
            m.source.base_cal.describe(), plan.sensitivity or "none",
        )
        meta.update(decision.metadata())
        if plan.gpu is not None:
            meta.update(gpu_metadata(plan.gpu, gpu, m.alloc_sens, choice))
        return choice, meta

    gpu = plan.gpu_budget(m.alloc_sens)

    choice, meta = fill(target)
    bound = metadata_bound(meta, m.cache.template.alignment)
    budget = target
    if m.alloc_sens.file_bytes(choice) + bound > target:
        budget = target - bound
        choice, meta = fill(budget)
    for _ in range(3):
        assemble(m.cache, choice, out, force=True)
        add_metadata(out, gguf, meta, force=True)
        over = gguf.stat().st_size - target
        if over <= 0:
            _check_gpu(plan, gguf, meta)
            return Written(gguf, choice, meta, gguf.stat().st_size)
        # below this allocation's own bytes: a greedy that left slack under `budget` would otherwise
        # return the same allocation for `budget - over`
        budget = min(budget, m.alloc_sens.file_bytes(choice)) - over
        choice, meta = fill(budget)
    raise RampError(f"could not fit {gguf.name} under {target} bytes")


def gpu_metadata(cap: Any, gpu: Any, sens: Sensitivity, choice: Choice) -> dict[str, Any]:
    """ramp.* keys of a --gpu-size run: the cap, the KV bytes it holds, and the GPU-resident bytes of the
    allocation (the tensors `-ot exps=CPU` leaves on the GPU, padded as the file holds them)."""
    resident = cap.cap_bytes - cap.kv_bytes - gpu.weights_bytes + gpu.used(sens, choice)
    return {"ramp.gpu_cap_bytes": cap.cap_bytes, "ramp.kv_bytes": cap.kv_bytes, "ramp.gpu_bytes": resident}


def _check_gpu(plan: RunPlan, gguf: Path, meta: Mapping[str, Any]) -> None:
    """The written file's GPU-resident bytes are the ones the allocation predicted (a bug otherwise: the
    plan's bytes of the tensors it does not search disagree with the tensor cache's)."""
    if plan.gpu is None:
        return
    from ramp_cpp.allocate.gpu import resident_bytes

    got = resident_bytes(gguf)
    if got != meta["ramp.gpu_bytes"]:
        raise RampError(
            f"{gguf.name}: holds {got} GPU-resident bytes where the allocation predicted "
            f"{meta['ramp.gpu_bytes']} (a bug: please report it)"
        )


def metadata_bound(meta: Mapping[str, Any], alignment: int) -> int:
    """An upper bound on the bytes `meta` adds to a GGUF header: a key is 8 bytes of length, its name and 4
    bytes of type (≤ 16 + name); a scalar or string value ≤ 16 + 2·len(its JSON) (a string is 8 bytes of
    length and its UTF-8 text, which JSON's escapes never undercount; a number at most 8 bytes); an array 12
    bytes and its items; plus the header's padding, < `alignment`."""

    def size(v: Any) -> int:
        if isinstance(v, (list, tuple)):
            return 12 + sum(size(x) for x in v)
        return 16 + 2 * len(json.dumps(v, default=str))

    return sum(16 + len(k.encode()) + size(v) for k, v in meta.items()) + alignment


def metadata(
    sens: Sensitivity,
    choice: Choice,
    method: str,
    size: str,
    target: int,
    folded: bool,
    imatrix: bool,
    calibration: str,
    sensitivity: str = "proxy",
) -> dict[str, Any]:
    """ramp.* keys of an output GGUF made by a direct method. `ramp.sensitivity`: what the allocator read,
    proxy, measured, or none (uniform); `ramp.predicted_error` is the proxy's whichever it was."""
    names = [t.name for t in sens.tensors]
    linears = [t for t in sens.tensors if t.name.startswith("blk.")]
    searched_bytes = sum(t.option(choice[t.name]).nbytes for t in linears)
    return {
        "ramp.version": __version__,
        "ramp.method": method,
        "ramp.budget_mode": "size",
        "ramp.size_target": size,
        "ramp.target_bytes": int(target),
        "ramp.bpw": float(8 * searched_bytes / sum(t.n_params for t in linears)),
        "ramp.tensor_names": names,
        "ramp.tensor_types": [choice[n].name for n in names],
        "ramp.predicted_error": float(sens.error(choice)),
        "ramp.scale_folding": bool(folded),
        "ramp.calibration": calibration,
        "ramp.imatrix": bool(imatrix),
        "ramp.sensitivity": sensitivity,
    }


def evaluate(plan: RunPlan, gguf: Path, rt: Runtime) -> KLDResult:
    """The written file's KLD and PPL against the unfolded model on the reward chunks."""
    from ramp_cpp.llama.evaluate import kld

    return kld(gguf, plan.model_path, plan.text, plan.cfg.eval_config, rt.eopts)
