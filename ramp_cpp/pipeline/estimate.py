"""A sized run's cost, stage by stage, before any of it runs (`search --size ... --dry-run`).

`speedprobe.speed_probe` measures this machine on this model (`SpeedProbe`; `speedcache.known_speeds` reads
what this machine measured before and probes the rest); `estimate` turns the plan's counts into costs, with
N = n_ctx:

    eval(n, f)      load_s + tokenize_s + n·(N·token_s·rel(f) + score_s)      E = n / chunks
    rel(f)          file f's decode time relative to F16's: measured on the copy (`decode`; greedy's file the
                    share ā = Σ n_params·frac / Σ n_params of the way from "below" to "above"), else
                    Σ n_params·DECODE[written type] / Σ n_params (CPU; 1 with layers offloaded to a GPU)
    pass(types)     header_s + Σ_quantizable n_params·(quant_s[written, imatrix] + dequant_s[src]/n_threads)
                    + file/copy_bps                                         one llama.cpp quantizer pass
    calibrate       load_s + tokenize_s + samples·ctx·token_s·CALIB_DECODE   E = samples·ctx / (chunks·N)
    fold            header_s + file/hash_bps + Σ_linears n_params·fold_s + file/copy_bps (+ the source's
                    hash when no calibrate stage made it first)
    base log-probs  per chunk set not cached (reward, fold_eval_config's, GroupConfig.chunks'): eval(n, F16)
                    + n·base_s
    presets         pass(preset) per preset in `presets` and the --size one; eval(chunks, preset) if scored
    tensor cache    per type of cc.requested() ∪ {base}: pass(searched at it) + (3·file + bin)/copy_bps (cut,
                    assemble, compare); proxy: Σ_searched n_params·
                    (dequant_s[src] + Σ_candidates (dequant_s[written] + error_s))
    group probes    (1 + len(groups_of) + pairs + refine)·(hi/copy_bps + load_s + n_g·(N·token_s·rel(hi)
                    + score_s)) + tokenize_s, n_g = min(GroupConfig.chunks, chunks); pairs counted in full
                    and refine = min(GroupConfig.refine_evaluations, the parts the groups split into:
                    refine.Tree.capacity with every searched tensor probed) (upper bounds)
    fold decision   check: pass(choice) + 2·eval(n_f, choice), then (if_unfolded: only when the check keeps
                    the unfolded model; `total(stages, unfolded=True)`) tensor cache and group probes again,
                    the folded copy and (in the run folder) the folded cache deleted first;
                    auto: 2·(target/copy_bps + eval(n_f, choice));
                    choice: greedy's file, every searched tensor at its candidate nearest the target's bits
                    per weight (its decode: the mix of the candidates just below and above that many bits),
                    among the candidates on the tensor's frontier by `type_error` (allocators.frontier:
                    greedy's Lagrangian steps between those)
    allocate        FIT_TRIES·(2·target/copy_bps + header_s + (1 - kept)·memq(choice)), kept: the share of
                    greedy's searched bytes the in-memory cache's memo (1 GiB) still holds from the fold
                    decision's file (0 without one); sac: + its evaluations, eval(chunks, choice)
    evaluate        eval(chunks, choice)                                     E = 1

With the tensor cache in memory (plan.in_memory) the cache stage runs the base type's pass only and the proxy
adds Σ_searched n_params·Σ_candidates quant_s[written, imatrix]; with --row-sample K the proxy's terms count a
linear's n_params / K (the rows it reads); every assembly (a probe's group, the fold
decision's and the fits' files) adds memq(types) = Σ_searched, not at base n_params·quant_s[written, imatrix].

RAM: rss_base (the process before a model is loaded) + the model's mmap (its file size) + ctx_bytes (what a
context of N tokens adds, measured); from the tensor cache on, its .bin files (kept mapped) and the proxy's
arrays. Disk: what the run folder holds (resources.disk_needs) + calibration, folded copy, one .bin per
requested type (a fallback type's bytes are stored once per type asking for it) and the GGUF; `written`
counts disk only (scratch on /dev/shm is memory). A calibration, folded copy, base log-probs, a finished proxy
measurement (its tensor cache built with it) or saved group probes already there cost nothing (`_resumed`: a
resumed run is planned for what is left; a cache built but not yet measured is counted in full). A preset
--size's target is the preset's file as `_preset` approximates llama.cpp's mixture. The times assume the
machine stays as loaded as during the probe; what the run does after evaluate (reports, pareto.png) is not a
stage. `header_s` is gguf-py's full parse of the model's header, its tokenizer arrays included: charged for
each parse of a header a stage copies whole (fold's rewrite, a fit's file) and per quantizer pass; readers
of tensors, metadata or a header's bytes only (the inventory, the proxy's source rows, the tensor cache's
template and cuts) step over the tokenizer (ggufio.HeaderReader) and are charged nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, is_prefix
from ramp_cpp.llama.ggufio import TensorInfo
from ramp_cpp.measure.candidates import searched_tensors
from ramp_cpp.measure.tensorcache import MEMO_BYTES
from ramp_cpp.model.ladder import tensor_nbytes, written_type
from ramp_cpp.pipeline.mixes import (
    T,
    file_bytes,
    has_imatrix,
    plan_mixes,
    quant_key,
    quantizable_tensors,
    quantizer_passes,
    written,
)
from ramp_cpp.pipeline.plan import RunPlan
from ramp_cpp.pipeline.speedprobe import SpeedProbe
from ramp_cpp.store.cache import known_sha256

#: The fallback when a type's ratio is not measured (`decode_ratios`).
#: Decode time relative to a plain F16 decode, llama.cpp's CPU backend, one thread on an idle x86 core
#: (demo model, 512 tokens): the activation collector's, and a file's per written type (a K-quant's from a
#: file with it on the 1536-wide rows, the 576-wide ones at its fallback). Threads that wait on a busy CPU
#: squeeze these ratios towards 1 (2 threads sharing 2 cores with another run: Q5_1 1.25, F16 3x slower).
CALIB_DECODE = 1.2
DECODE = {"F16": 1.0, "BF16": 1.0, "Q8_0": 1.3, "Q4_0": 1.1, "Q4_1": 2.3, "Q5_0": 1.75, "Q5_1": 2.85,
          "IQ4_NL": 1.05, "IQ4_XS": 1.25, "Q2_K": 1.05, "Q3_K": 1.0, "Q4_K": 0.65, "Q5_K": 0.6, "Q6_K": 0.8}
DECODE_OTHER = 1.5
FIT_TRIES = 1  # stages.fit_and_write allocates under a bound on the metadata it adds: one assembly


@dataclass(frozen=True)
class StagePlan:
    """A stage as the cost meter names it (costs.StageCost): expected wall seconds, peak RSS, bytes written to
    disk, disk the run holds when it ends; its evaluation units and quantizer passes are exact counts."""

    stage: str
    wall_s: float
    peak_rss: int
    written: int
    held: int
    E: float
    quant_passes: int
    note: str = ""
    #: the run makes this stage only if `--fold check` keeps the unfolded model; `total` leaves it out
    if_unfolded: bool = False



def _base_cached(plan: RunPlan, sha: str | None, ecfg: EvalConfig) -> bool:
    """evaluate.base_logprobs's cache holds these chunks."""
    from ramp_cpp.llama.evaluate import base_logprobs_file

    return sha is not None and base_logprobs_file(sha, plan.text, ecfg).is_file()


def _resumed(plan: RunPlan, folded: bool) -> tuple[bool, int]:
    """For a run folder that holds them: whether the proxy of this folding is measured (its tensor cache built
    with it), and how many group probes are saved, from the state files the stages keep (proxy.measure,
    groups.calibrate_sensitivity). (False, 0) when they cannot be found without work: no calibration in the
    run folder yet, no folded copy, or a model whose hash is not remembered."""
    from ramp_cpp.errors import RampError
    from ramp_cpp.fold.source import CALIB, calibrated_source
    from ramp_cpp.measure.groups import probe_key, saved_probes
    from ramp_cpp.measure.proxy import MeasureConfig, saved_sensitivity
    from ramp_cpp.pipeline.sizedconfig import SourceChoice

    if plan.calib is None and not (plan.run_dir / CALIB).is_file():
        return False, 0
    if folded and not (plan.run_dir / "folded.f16.gguf").is_file():
        return False, 0
    try:  # both files are there: calibrated_source only reads them
        src = calibrated_source(plan.model_path, plan.run_dir, SourceChoice(plan.cfg.calib, folded),
                                RuntimeOptions(), plan.calib, original=plan.info,
                                fold_cfg=plan.cfg.fold_config)
    except (RampError, OSError, ValueError):
        return False, 0
    sha, base_sha = known_sha256(src.path), known_sha256(plan.model_path)
    if sha is None:
        return False, 0
    mcfg = MeasureConfig(candidates=plan.cc, in_memory=plan.in_memory, row_sample=plan.row_sample)
    im = src.cal.imatrix() if plan.cfg.imatrix else None
    got = saved_sensitivity(sha, src.cal, im, mcfg, plan.cache_root)
    if got is None or plan.sensitivity != "measured" or base_sha is None:
        return got is not None, 0
    sens, directory = got
    ecfg = plan.cfg.eval_config
    if plan.gcfg.chunks is not None:
        ecfg = replace(ecfg, n_chunks=min(plan.gcfg.chunks, plan.cfg.chunks))
    return True, saved_probes(directory, probe_key(sens, base_sha, plan.text, ecfg, plan.gcfg))


def estimate(
    plan: RunPlan, presets: tuple[str, ...], opts: RuntimeOptions, probe: SpeedProbe
) -> list[StagePlan]:
    """The stages `run.run_direct` will meter for `plan`, in order, with their expected costs (module
    docstring); E and quantizer passes are the counts the run makes."""
    from ramp_cpp.fold.source import CALIB
    from ramp_cpp.measure.groups import groups_of
    from ramp_cpp.measure.refine import Tree
    from ramp_cpp.pipeline.folddecision import KEPT_UNFOLDED
    from ramp_cpp.pipeline.resources import disk_needs
    from ramp_cpp.pipeline.stages import fold_eval_config
    from ramp_cpp.store.cache import scratch_root

    p, info, cfg, cc = probe, plan.info, plan.cfg, plan.cc
    N, file, chunks = cfg.n_ctx, info.file_size, cfg.chunks
    needs = disk_needs(info, cc, plan.fold, plan.hi, plan.run_dir, plan.cache_root, in_memory=plan.in_memory)
    on_disk = not str(scratch_root().resolve()).startswith("/dev/shm")  # else scratch writes are memory
    searched = searched_tensors(info, cc.embeddings)
    quantized = quantizable_tensors(plan)
    src_deq = p.dequant_s.get(info.tensors[0].ggml_type, 0.0)

    def rel(types: Mapping[str, T], hi: Mapping[str, T] | None = None, a: Mapping[str, float] = {}) -> float:
        """`types`' decode time over F16's by the DECODE table; with `hi`, each tensor a fraction `a` of the
        way to hi's type."""
        if opts.n_gpu_layers:
            return 1.0
        d = lambda m: {n: DECODE.get(w.name, DECODE_OTHER) for n, w in written(plan, m).items()}  # noqa: E731
        lo, up = d(types), d(hi or types)
        n = sum(t.n_params * (lo[t.name] + a.get(t.name, 0.0) * (up[t.name] - lo[t.name])) for t in quantized)
        return n / max(1, sum(t.n_params for t in quantized))

    def ev(n: float, r: float) -> float:
        return p.load_s + p.tokenize_s + n * (N * p.token_s * r + p.score_s)

    def qpass(types: Mapping[str, T]) -> tuple[float, int]:
        ws, size = written(plan, types), file_bytes(plan, types)
        sec = p.header_s + sum(t.n_params * (p.quant_s.get(quant_key(ws[t.name], has_imatrix(plan, t)), 0.0)
                                             + src_deq / p.n_threads) for t in quantized)
        return sec + size / p.copy_bps, size

    def memq(types: Mapping[str, T]) -> float:
        """Seconds the in-memory cache spends making `types`' bytes (its base type is on disk)."""
        if not plan.in_memory:
            return 0.0
        ws = {t.name: written_type(types.get(t.name, cc.base), t.n_per_row) for t in searched}
        return sum(t.n_params * p.quant_s.get(quant_key(ws[t.name], has_imatrix(plan, t)), 0.0)
                   for t in searched if types.get(t.name, cc.base) != cc.base)

    m = plan_mixes(plan, presets, p.type_error)
    cands, passes, target, choice = m.cands, quantizer_passes(plan, presets), m.target, m.choice
    r_choice, r_hi = rel(m.below, m.above, m.frac), p.decode.get("hi", rel(m.hi))
    if "below" in p.decode and "above" in p.decode:  # measured: greedy's file a share of the way up
        n_q = max(1, sum(t.n_params for t in quantized))
        up = sum(t.n_params * m.frac.get(t.name, 0.0) for t in quantized) / n_q
        r_choice = p.decode["below"] + up * (p.decode["above"] - p.decode["below"])
    out: list[StagePlan] = []
    held = needs.held

    def add(stage: str, wall: float, ram: int, written: int, grows: int = 0, E: float = 0.0,
            passes: int = 0, note: str = "") -> None:
        nonlocal held
        held += grows
        out.append(StagePlan(stage, wall, p.rss_base + ram, written, held, E, passes, note))

    loaded = file + p.ctx_bytes
    sha = known_sha256(plan.model_path)
    hash_s = 0.0 if sha else file / p.hash_bps
    if plan.calib is None and not (plan.run_dir / CALIB).is_file():
        c = cfg.calib
        stats = 12 * sum(t.n_per_row for t in info.tensors if t.searched or t.role == "output"
                         or (t.role == "token_embd" and info.tied_output))
        add("calibrate", p.load_s + p.tokenize_s + c.samples * c.ctx * p.token_s * CALIB_DECODE + hash_s,
            loaded, stats, stats, c.samples * c.ctx / (chunks * N))
        hash_s = 0.0
    # a run resumed after its fold check kept the unfolded model (stages.release_folded) makes no folded files
    freed = plan.fold == "check" and (plan.run_dir / KEPT_UNFOLDED).is_file()
    folds = True in plan.foldings and not freed and not (plan.run_dir / "folded.f16.gguf").is_file()
    if folds:
        lin = sum(t.n_params for t in info.searched)
        # the folded copy's hash (remembered for the stages after), and the source's if calibrate did not
        wall = p.header_s + hash_s + file / p.hash_bps + lin * p.fold_s + file / p.copy_bps
        add("fold", wall, file, file, needs.folded)
        hash_s = 0.0
    ecfg, fcfg = cfg.eval_config, fold_eval_config(plan)
    n_fold, n_g = min(fcfg.n_chunks or 0, p.n_avail), min(plan.gcfg.chunks or chunks, chunks)
    sets = [ecfg, *([fcfg] if plan.fold in ("auto", "check") else []),
            *([replace(ecfg, n_chunks=n_g)] if plan.sensitivity == "measured" and plan.gcfg.chunks else [])]
    missing = {json.dumps(s.key()): s for s in sets if not _base_cached(plan, sha, s)}
    n_of = {k: n_fold if s.up_to else s.n_chunks or 0 for k, s in missing.items()}
    # evaluate.base_logprobs_sets decodes the largest set and cuts the sets that are its first chunks
    big = max(sets, key=lambda s: n_fold if s.up_to else s.n_chunks or 0)
    todo = {k: n_of[k] for k, s in missing.items() if s == big or not is_prefix(s, big)}
    npz = sum(n * (N - N // 2 - 1) * (8 * (ecfg.top_k + ecfg.tail_samples) + 4) for n in n_of.values())
    add("base log-probs", hash_s + sum(ev(n, 1.0) + n * p.base_s for n in todo.values()), loaded * bool(todo),
        npz, E=sum(todo.values()) / chunks, note="" if missing else "cached")
    pre = [(*qpass(t), p.decode.get(f"preset {i}", rel(t))) for i, t in enumerate(passes["presets"])]
    scored = len(dict.fromkeys(presets))  # the first of the presets stage's passes; the --size one last
    add("presets", sum(s + (ev(chunks, r) if i < scored else 0) for i, (s, _, r) in enumerate(pre)),
        loaded, on_disk * sum(b for _, b, _ in pre), E=scored, passes=len(pre))
    cache_s, cache_w, cache_bytes = 0.0, 0, 0

    def measured_params(t: TensorInfo) -> float:
        """The weights the proxy reads of `t`: a linear's sampled rows (proxy.row_spans); embeddings whole."""
        return t.n_params if t.role == "token_embd" else t.n_params / plan.row_sample

    if plan.in_memory:  # the base type's pass only; the proxy quantizes each candidate in memory
        passes["cache"] = passes["cache"][:1]
        cache_s += sum(measured_params(t) * sum(p.quant_s.get(quant_key(w, has_imatrix(plan, t)), 0.0)
                                                for w in cands[t.name] if w != cc.base) for t in searched)
    for types in passes["cache"]:
        sec, size = qpass(types)
        bins = sum(tensor_nbytes(written_type(w, info.tensor(n).n_per_row), info.tensor(n).n_params)
                   for n, w in types.items())
        cache_s += sec + (3 * size + bins) / p.copy_bps
        cache_w, cache_bytes = cache_w + 2 * size + bins, cache_bytes + bins
    cache_s += sum(
        measured_params(t) * (src_deq + sum(p.dequant_s.get(w.name, 0.0) + p.error_s for w in cands[t.name]))
        for t in searched)
    if any(t.role == "token_embd" for t in searched):
        cache_s += p.load_s + p.tokenize_s  # the proxy's token frequencies: the calibration text tokenized
    names = [t.name for t in searched]
    groups = groups_of(info, names, plan.gcfg.n_buckets)
    tree = Tree(groups, {t.name: t.block for t in searched}, names)
    n_refine = min(plan.gcfg.refine_evaluations, tree.capacity([g.name for g in groups]))
    n_probes = 1 + len(groups) + plan.gcfg.pairs + n_refine
    pairs = f"{n_probes} evaluations" + (f" ({plan.gcfg.pairs} pairs at most)" if plan.gcfg.pairs else "")
    pairs += f" ({n_refine} refined at most)" if n_refine else ""
    probe_s = p.tokenize_s + n_probes * (plan.hi / p.copy_bps + p.load_s + n_g * (N * p.token_s * r_hi
                                                                                  + p.score_s))
    probe_s += memq(choice)  # in memory: each group's tensors quantized once for its probe
    # the proxy's arrays (MeasureConfig.chunk_elements weights at a time) stay in the process's heap after
    work, measured = 16 * min(1 << 24, max(t.n_params for t in searched)), plan.sensitivity == "measured"
    full: list[StagePlan] = []  # the measurement's stages as a cold run makes them
    for f in (False,) if freed else plan.measured_first:
        what = "folded" if f else "unfolded"
        built, saved = _resumed(plan, f)
        cache_ram, probe_ram = file + cache_bytes + work, work + cache_bytes + plan.hi + p.ctx_bytes
        n_cache, e_probes = len(passes["cache"]), n_probes * n_g / chunks
        full.append(StagePlan(f"tensor cache + proxy ({what})", cache_s, p.rss_base + cache_ram, cache_w, 0,
                              0.0, n_cache))
        add(full[-1].stage, 0.0 if built else cache_s, cache_ram, 0 if built else cache_w,
            0 if built else cache_bytes, passes=0 if built else n_cache, note="built" if built else "")
        if measured:
            full.append(StagePlan(f"group probes ({what})", probe_s, p.rss_base + probe_ram,
                                  on_disk * n_probes * plan.hi, 0, e_probes, 0, pairs))
            left = max(0, n_probes - saved)  # a resumed run's saved evaluations are not made again
            add(full[-1].stage, probe_s * left / n_probes, probe_ram, on_disk * left * plan.hi,
                E=e_probes * left / n_probes, note=pairs + (f", {saved} saved" if saved else ""))
    maps = len(plan.measured_first) * cache_bytes
    ram, scratch = work + maps + target + p.ctx_bytes, on_disk * target
    if plan.fold == "check" and not freed:
        add("fold decision", qpass(choice)[0] + target / p.copy_bps + 2 * ev(n_fold, r_choice) + memq(choice),
            max(ram, work + maps + file), 2 * scratch, 0, 2 * n_fold / chunks, 1,
            "if the check keeps the unfolded model, the stages marked † follow")
        # the unfolded model measured as the folded one was, only if the check keeps it: after the folded copy
        # and (in the run folder) the folded cache are deleted (stages.release_folded)
        in_run = plan.cache_root.resolve().is_relative_to(plan.run_dir.resolve())
        held_u = held - file + cache_bytes * (not in_run)
        out += [replace(s, stage=s.stage.replace("(folded)", "(unfolded)"), held=held_u, if_unfolded=True)
                for s in full]  # made afresh whatever the folded measurement had saved
    elif plan.fold == "auto":
        add("fold decision", 2 * (target / p.copy_bps + ev(n_fold, r_choice) + memq(choice)), ram,
            2 * scratch, 0, 2 * n_fold / chunks)
    else:
        add("fold decision", 0.0, 0, 0)
    sac, e_sac = plan.sac, 0.0
    if plan.method == "sac":  # every evaluation real (memo hits are free), the second look's too
        e_sac = sac.evaluations + (sac.rescore_top > 0) * (sac.rescore_top + 1) * sac.rescore_chunks / chunks
    note = f"{FIT_TRIES} fits assumed" + (", SAC's evaluations at most, not its updates" if e_sac else "")
    # the fold decision assembled greedy's file just before: what of it the memo still holds is not made again
    made = {t.name: written_type(choice[t.name], t.n_per_row) for t in searched}
    choice_bytes = sum(tensor_nbytes(made[t.name], t.n_params) for t in searched)
    decided = plan.fold in ("auto", "check") and not freed
    kept = min(1.0, MEMO_BYTES / max(1, choice_bytes)) if decided else 0.0
    fit = FIT_TRIES * (2 * target / p.copy_bps + p.header_s + (1 - kept) * memq(choice))
    add("allocate", fit + e_sac * (target / p.copy_bps + ev(chunks, r_choice) - p.tokenize_s), ram,
        FIT_TRIES * (target + scratch), target, e_sac, note=note)
    # greedy's types are not known before it runs, and their decode is not their bits': measured mixes span
    # 0.85x (the preset) to 2.7x (every tensor just below the target) F16's on Qwen2.5-Coder-0.5B
    span = [v for k, v in p.decode.items() if k in ("below", "above") or k.startswith("preset")]
    add("evaluate", ev(chunks, r_choice), ram, 0, E=1.0,
        note=f"{ev(chunks, min(span)):.0f}-{ev(chunks, max(span)):.0f} s by the types chosen" if span else "")
    return out


def total(stages: list[StagePlan], unfolded: bool = False) -> StagePlan:
    """Sums, and the maxima of peak RSS and disk held (as costs.total), of the stages the run makes when the
    fold check keeps the folded model (`unfolded`: the unfolded one)."""
    held, grown = 0, 0
    for s in stages:  # the unfolded model's cache stays to the end of the run: held after it, by as much
        if s.if_unfolded and not unfolded:
            continue
        if s.if_unfolded:
            grown = max(grown, s.held - held)
        held = max(held, s.held + (0 if s.if_unfolded else grown))
    stages = [s for s in stages if unfolded or not s.if_unfolded]
    return StagePlan("total", sum(s.wall_s for s in stages), max(s.peak_rss for s in stages),
                     sum(s.written for s in stages), held, sum(s.E for s in stages),
                     sum(s.quant_passes for s in stages))

