"""`search`: a per-tensor allocation for one model, written as allocation, GGUF and report (and for SAC a
policy) to a run directory. Its own module: 36 options, two modes and an episode display that no other
command has (`apply` of the policy it trains is apply.py; the options both take are in common.py).

It has two modes, told apart by the options given: the whole-file `--size` mode (uniform, greedy or
SAC on the measured sensitivity, ramp_cpp/pipeline/run.py) and the paper's `--budget` mode (SAC on bits,
ramp_cpp/pipeline/paper.py). Its help shows the options a first run needs on top and the rest in panels by
mode; the command body only turns options into configs, and `_run_sized` / `_run_paper` run and report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ramp_cpp.cli.common import (
    BudgetModeOpt,
    BudgetOpt,
    CalibOpt,
    FoldOpt,
    GpuOpt,
    NoFoldOpt,
    NoImatrixOpt,
    RayOpt,
    RecipeOpt,
    SizeOpt,
    ThreadsOpt,
    WorkersOpt,
    bar,
    cost_line,
    cost_printer,
    err,
    executor_for,
    fold_setting,
    in_panel,
    out,
    parse_bits,
    resolve_budget,
    stage_progress,
)
from ramp_cpp.cli.modelarg import resolved_model
from ramp_cpp.costs import total
from ramp_cpp.errors import RampError

if TYPE_CHECKING:  # the configs _run_sized and _run_paper take; imported where they are built
    from ramp_cpp.allocate.sac.agent import SACConfig
    from ramp_cpp.allocate.sac.paper import SearchConfig
    from ramp_cpp.allocate.sac.search import SizedSearchConfig
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.measure.candidates import CandidateConfig
    from ramp_cpp.measure.groups import GroupConfig
    from ramp_cpp.pipeline.sizedconfig import SizedConfig

# `search --help`: --model, --out, --size, --method on top (the unnamed panel), then these panels, in order
SIZE = "Size mode (--size)"
SAC = "SAC (--method sac)"
PAPER = "Paper mode (--budget)"
TEXT = "Reward text and calibration"
RUNTIME = "Runtime"
_size = functools.partial(typer.Option, rich_help_panel=SIZE)
_sac = functools.partial(typer.Option, rich_help_panel=SAC)
_paper = functools.partial(typer.Option, rich_help_panel=PAPER)
_text = functools.partial(typer.Option, rich_help_panel=TEXT)
PRESETS = ("Q4_K_M", "Q3_K_M")  # the presets a --budget search report compares with


def _presets(spec: str) -> tuple[str, ...]:
    """--presets Q4_K_M,Q3_K_M as llama.cpp preset names, checked before any work."""
    from ramp_cpp.llama.quantize import presets

    names = tuple(dict.fromkeys(p.strip().upper() for p in spec.split(",") if p.strip()))
    bad = [n for n in names if n not in presets()]
    if bad or not names:
        what = bad[0] if bad else spec
        raise RampError(f"unknown preset {what!r} in --presets (known: {', '.join(presets())})")
    return names


def _opt(x: float | None) -> str:
    """A KLD that may not exist yet (a cold search's first episode has no candidate)."""
    return "-" if x is None else f"{x:.5f}"


@contextlib.contextmanager
def _interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered. Python drops an exception raised in
    a finalizer (`__del__`), so a Ctrl-C landing in one would be lost; the `check` this yields, called at
    every episode, raises it again. Where SIGINT is ignored (a background job) nothing changes."""
    seen: list[int] = []
    prev = signal.getsignal(signal.SIGINT)

    def check() -> None:
        if seen:
            raise KeyboardInterrupt

    if prev is not signal.default_int_handler:
        yield check
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, prev)


def search(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="F16/BF16 GGUF to search (or a split "
                     "GGUF's first shard, or a Hugging Face checkpoint folder).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("ramp-run"),
    size: SizeOpt = None,
    method: Annotated[
        str, typer.Option("--method", help="sac (default), or greedy / uniform on the measured sensitivity.")
    ] = "sac",
    presets_: Annotated[
        str | None,
        typer.Option(
            "--presets", help="llama.cpp presets to quantize and score beside the result, with the same "
            "imatrix (default: none with --size, whose own preset is quantized once for its size; "
            "Q4_K_M,Q3_K_M with --budget).",
        ),
    ] = None,
    no_presets: Annotated[bool, typer.Option("--no-presets", help="Skip the preset comparison.")] = False,
    dry_run: Annotated[
        bool,
        _size("--dry-run", help="Print each stage's expected cost (time, RAM, disk, evaluation units, "
              "quantizer passes) from the model's inventory and a short speed probe; run nothing."),
    ] = False,
    evaluations: Annotated[
        int, _size("--evaluations", help="sac: real evaluations of the reward chunks.")
    ] = 150,
    sensitivity: Annotated[
        str | None,
        _size(
            "--sensitivity",
            help="greedy: proxy; measured (default: the proxy rescaled per role x depth group by "
            "KLD measured on the reward chunks); or transferred (rescaled by the shipped table of other "
            "models' measured groups: no evaluation, and --fold on unless --fold says otherwise).",
        ),
    ] = None,
    types: Annotated[
        str | None, _size("--types", help="greedy/uniform: candidate types, e.g. Q4_K,IQ4_NL,Q8_0.")
    ] = None,
    no_embeddings: Annotated[
        bool, _size("--no-embeddings", help="greedy/uniform: keep token_embd / output at Q8_0.")
    ] = False,
    fold: Annotated[str | None, in_panel(FoldOpt, SIZE)] = None,
    no_fold: Annotated[bool, in_panel(NoFoldOpt, SIZE)] = False,
    tensor_cache: Annotated[
        str,
        _size(
            "--tensor-cache",
            help="Where the candidate types' bytes live: disk (all of them, ≈ 61 bits per weight), memory "
            "(the base type on disk, the others quantized when asked: the same bytes) or auto (memory; "
            "disk for sac when it fits).",
        ),
    ] = "auto",
    row_sample: Annotated[
        int | None,
        _size(
            "--row-sample",
            help="Measure each linear's proxy error on every Nth span of 16 rows (1: all rows; default "
            "SEARCH_ROW_SAMPLE, docs/costs.md).",
        ),
    ] = None,
    reward: Annotated[
        str, _sac("--reward", help="--size: relative (ln greedy's KLD / KLD) or paper (Eq. 19-21).")
    ] = "relative",
    no_projection: Annotated[
        bool, _sac("--no-projection", help="--size: do not project episodes onto the budget.")
    ] = False,
    no_warm_start: Annotated[
        bool, _sac("--no-warm-start", help="--size: start from random actions, not from greedy.")
    ] = False,
    rescore: Annotated[
        int, _sac("--rescore", help="--size: re-score greedy and the N best on 8 more chunks.")
    ] = 0,
    features_: Annotated[str, _sac("--features", help="Layer embeddings: ramp or paper.")] = "ramp",
    seed: Annotated[int, _sac("--seed", help="Seed of the search.")] = 0,
    rollouts: Annotated[
        int,
        _sac("--rollouts", min=1, help="--size: episodes per round, scored together (with --workers/--ray: "
             "at once). 1 = one at a time; another K is its own search (docs/workers.md)."),
    ] = 1,
    budget: Annotated[float | None, in_panel(BudgetOpt, PAPER)] = None,
    budget_mode: Annotated[str, in_panel(BudgetModeOpt, PAPER)] = "weighted",
    metric: Annotated[str, _paper("--metric", help="Reward quality: ppl (paper) or kld.")] = "ppl",
    bits: Annotated[str, _paper("--bits", help="Ladder of nominal bits (2,3,4,5,6,8).")] = "3,4,5,6",
    include_embeddings: Annotated[
        bool, _paper("--include-embeddings", help="Also search token_embd / output.")
    ] = False,
    episodes: Annotated[int, _paper("--episodes", help="Episodes (paper: 200-300).")] = 200,
    warmup: Annotated[int, _paper("--warmup", help="Random warm-up episodes (paper: 20).")] = 20,
    updates: Annotated[int, _paper("--updates", help="SAC updates per episode.")] = 64,
    eval_every: Annotated[
        int, _paper("--eval-every", help="Also score the mean action every N episodes (0: never).")
    ] = 10,
    resume: Annotated[bool, _paper("--resume", help="Continue the run in --out.")] = False,
    text: Annotated[
        str, _text("--text", help="Reward text: a corpus name or file (never wikitext2-test).")
    ] = "wikitext2-valid",
    chunks: Annotated[int, _text("--chunks", help="Reward chunks of the reward text.")] = 4,
    ctx: Annotated[int, _text("--ctx", help="Tokens per reward chunk.")] = 512,
    calib: Annotated[Path | None, in_panel(CalibOpt, TEXT)] = None,
    recipe: Annotated[str | None, in_panel(RecipeOpt, TEXT)] = None,
    no_imatrix: Annotated[bool, in_panel(NoImatrixOpt, TEXT)] = False,
    threads: Annotated[int | None, in_panel(ThreadsOpt, RUNTIME)] = None,
    gpu_layers: Annotated[int, in_panel(GpuOpt, RUNTIME)] = 0,
    workers: Annotated[int | None, in_panel(WorkersOpt, RUNTIME)] = None,
    ray_address: Annotated[str | None, in_panel(RayOpt, RUNTIME)] = None,
) -> None:
    """Search a per-tensor allocation (SAC, or greedy/uniform on the measured sensitivity with a whole-file
    --size, e.g. 95MiB or Q4_K_M for that preset's size); write allocation, GGUF and report to --out."""
    from ramp_cpp.allocate.sac.agent import SACConfig
    from ramp_cpp.allocate.sac.paper import SearchConfig
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.paper import SETTINGS

    ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    sized = method != "sac" or (size is not None and budget is None)
    if no_presets and presets_:
        raise RampError("--no-presets contradicts --presets")
    presets = () if no_presets else _presets(presets_) if presets_ else () if sized else PRESETS
    if sized:
        from ramp_cpp.allocate.sac.search import SizedSearchConfig
        from ramp_cpp.measure.candidates import DEFAULT_TYPES, CandidateConfig, parse_types
        from ramp_cpp.pipeline.plan import default_fold, resolve_sensitivity
        from ramp_cpp.pipeline.sizedconfig import (
            SEARCH_FOLD,
            SEARCH_GROUPS,
            SEARCH_RECIPE,
            SEARCH_ROW_SAMPLE,
            SizedConfig,
        )

        sensitivity = resolve_sensitivity(method, sensitivity)
        if rollouts != 1 and method != "sac":
            raise RampError(f"--rollouts applies to --method sac (the search's rounds), not {method}")
        if model is None or size is None:
            raise RampError(f"--method {method} needs --model and a whole-file --size (e.g. 95MiB or Q4_K_M)")
        cand = parse_types(types) if types else DEFAULT_TYPES
        cc = CandidateConfig(types=cand, embeddings=not no_embeddings)
        dcfg = SizedConfig(
            n_ctx=ctx, chunks=chunks, text=text, fold=not no_fold, imatrix=not no_imatrix,
            calib=load_recipe(recipe or SEARCH_RECIPE),
        )
        scfg = SizedSearchConfig(
            evaluations=evaluations, reward=reward, projection=not no_projection,
            warm_start=not no_warm_start, rescore_top=rescore,
            variant=features_, seed=seed, rollouts=rollouts,
        )
        fold_mode = fold_setting(fold, no_fold, default_fold(sensitivity, SEARCH_FOLD, method))
        rows = SEARCH_ROW_SAMPLE if row_sample is None else row_sample
        model = resolved_model(model)  # a checkpoint folder is converted now, after the cheap checks
        if dry_run:
            _plan_sized(model, out_dir, method, size, dcfg, cc, scfg, ropts, calib, presets, sensitivity,
                        fold_mode, SEARCH_GROUPS, tensor_cache, rows)
            return
        with executor_for(workers, ray_address, threads, gpu_layers) as ex:
            _run_sized(model, out_dir, method, size, dcfg, cc, scfg, ropts, calib, presets, sensitivity,
                       fold_mode, SEARCH_GROUPS, ex, tensor_cache, rows)
        return
    if workers or ray_address:
        raise RampError("--workers/--ray spread a --size search's evaluations; --budget runs serially")
    if rollouts != 1:
        raise RampError("--rollouts applies to a --size search (--method sac); --budget runs one at a time")
    if dry_run:
        raise RampError("--dry-run plans a --size search; the --budget search has no plan")
    if sensitivity is not None:
        raise RampError("--sensitivity applies to --method greedy/uniform (SAC measures its own reward)")
    if row_sample is not None:
        raise RampError("--row-sample applies to a --size search; the --budget search measures no proxy")
    if tensor_cache != "auto":
        raise RampError("--tensor-cache applies to a --size search; the --budget search keeps its on disk")
    if fold_setting(fold, no_fold) in ("auto", "check"):
        raise RampError(f"--fold {fold} applies to a --size search; the --budget search takes on or off")
    no_fold = fold_setting(fold, no_fold) == "off"
    if model is None:
        if not resume or not (out_dir / SETTINGS).is_file():
            raise RampError("--model is required (or --resume with --out naming an existing run)")
        model = Path(json.loads((out_dir / SETTINGS).read_text())["model_path"])
    model = resolved_model(model)
    b, mode = resolve_budget(model, budget, budget_mode, size)
    cfg = SearchConfig(
        budget=b, budget_mode=mode, metric=metric, bits=parse_bits(bits),
        include_embeddings=include_embeddings, n_ctx=ctx, chunks=chunks, text=text, features=features_,
        fold=not no_fold, imatrix=not no_imatrix, eval_every=eval_every, calib=load_recipe(recipe or "paper"),
    )
    sac = SACConfig(episodes=episodes, warmup_episodes=warmup, updates_per_episode=updates, seed=seed)
    _run_paper(model, out_dir, cfg, sac, ropts, resume, calib, presets)


def _run_sized(
    model: Path, out_dir: Path, method: str, size: str, dcfg: SizedConfig, cc: CandidateConfig,
    scfg: SizedSearchConfig, ropts: RuntimeOptions, calib: Path | None, presets: tuple[str, ...],
    sensitivity: str | None, fold: str, gcfg: GroupConfig, executor: Any = None, tensor_cache: str = "auto",
    row_sample: int = 1,
) -> None:
    """The --size search with a bar (and for SAC a line per episode); Ctrl-C keeps what is finished."""
    from ramp_cpp.pipeline.run import describe, run_direct

    with bar(method) as p, _interrupts() as interrupted:
        ev_task = p.add_task("evaluations", total=scfg.evaluations) if method == "sac" else None

        def on_sac(r: dict[str, Any]) -> None:
            interrupted()
            if ev_task is not None:
                p.update(ev_task, completed=r["evaluations"])
            p.console.print(
                f"ep {r['episode']:4d} {r['kind']:9s} KLD {r['kld']:.5f}  best {_opt(r['best_kld'])}  "
                f"R {r['reward']:+.4f}  evals {r['evaluations']}{' memo' if r['memo'] else ''}",
                highlight=False,
            )

        try:
            r = run_direct(
                model, out_dir, method, size, dcfg, cc, ropts, calib=calib, presets=presets,
                progress=stage_progress(p), sensitivity=sensitivity, sac=scfg, on_episode=on_sac, fold=fold,
                on_cost=cost_printer(p), gcfg=gcfg, executor=executor, tensor_cache=tensor_cache,
                row_sample=row_sample,
            )
        except KeyboardInterrupt:
            err.print(f"interrupted: {out_dir} keeps every finished stage and episode; run the command again")
            raise typer.Exit(130) from None
    out.print(describe(r), soft_wrap=True)
    out.print(cost_line(total(r.costs)), soft_wrap=True)
    out.print(f"allocation {r.allocation}, report {r.report}", soft_wrap=True)


def _plan_sized(
    model: Path, out_dir: Path, method: str, size: str, dcfg: SizedConfig, cc: CandidateConfig,
    scfg: SizedSearchConfig, ropts: RuntimeOptions, calib: Path | None, presets: tuple[str, ...],
    sensitivity: str | None, fold: str, gcfg: GroupConfig, tensor_cache: str = "auto", row_sample: int = 1,
) -> None:
    """--dry-run: the plan's checks, a speed probe, and each stage's expected cost as a table; nothing is
    written (pipeline/estimate.py)."""
    from rich.table import Table

    from ramp_cpp.pipeline.estimate import estimate, total
    from ramp_cpp.pipeline.plan import plan_run
    from ramp_cpp.pipeline.speedcache import known_speeds

    plan = plan_run(model, out_dir, method, size, dcfg, cc, calib, sensitivity, gcfg, scfg, None, None, fold,
                    tensor_cache=tensor_cache, row_sample=row_sample)
    with err.status("speeds: this machine's measured ones, a probe of what it has not measured yet"):
        probe = known_speeds(plan, ropts, presets)
    stages = estimate(plan, presets, ropts, probe)
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0),
              title=f"{method} at --size {size} on {model.name}: expected costs")
    for col in ("stage", "time", "RAM", "written", "held", "E", "passes"):
        t.add_column(col, no_wrap=True, justify="left" if col == "stage" else "right")
    rows = [*stages, total(stages)]
    if any(s.if_unfolded for s in stages):
        rows.append(replace(total(stages, unfolded=True), stage="total†"))
    for s in rows:
        name = s.stage + ("†" if s.if_unfolded else "") + ("*" if s.note else "")
        t.add_row(name, _seconds(s.wall_s), *map(_bytes, (s.peak_rss, s.written, s.held)), f"{s.E:.2f}",
                  str(s.quant_passes), style="bold" if s.stage.startswith("total") else None)
    out.print(t)
    for s in stages:
        if s.note:
            out.print(f"* {s.stage}: {s.note}", soft_wrap=True, highlight=False)
    if len(rows) > len(stages) + 1:
        out.print("† only if the fold check keeps the unfolded model (total†: the run's cost then)",
                  soft_wrap=True, highlight=False)
    if probe.load > 0.5:
        err.print(f"the CPUs were busy during the speed probe (load {probe.load:.1f} per core): other work "
                  "slows llama.cpp's threads, F16 decoding most, so these times hold only while it goes on; "
                  "plan again on an idle machine", soft_wrap=True, highlight=False)
    out.print(f"held: disk the run holds after the stage; E: passes over the {dcfg.chunks} reward chunks. "
              f"Speed probe {probe.seconds:.1f} s; nothing was run or written (the run would write to "
              f"{out_dir})", soft_wrap=True, highlight=False)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _bytes(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < 1000 << 20 else f"{n / (1 << 30):.1f} GiB"


def _run_paper(
    model: Path, out_dir: Path, cfg: SearchConfig, sac: SACConfig, ropts: RuntimeOptions, resume: bool,
    calib: Path | None, presets: tuple[str, ...],
) -> None:
    """The paper's --budget search with a bar and a line per episode; Ctrl-C keeps the checkpoint."""
    from ramp_cpp.pipeline.paper import search as run_search

    q = "PPL" if cfg.metric == "ppl" else "KLD"
    with bar("search") as p, _interrupts() as interrupted:
        ep_task = p.add_task("episodes", total=sac.episodes)

        def on_episode(r: Any) -> None:
            interrupted()
            p.update(ep_task, completed=r.episode + 1)
            best = "-" if r.best_quality is None else f"{r.best_quality:.4f}"
            p.console.print(
                f"ep {r.episode:4d}{' (random)' if r.random else '         '} R {r.reward:+8.3f}  "
                f"{q} {r.quality:.4f}  bpw {r.bpw:.3f} (nominal {r.bpw_nominal:.2f})  best {best}  "
                f"{r.t_total:.1f}s{' memo' if r.memo else ''}",
                highlight=False,
            )

        try:
            res = run_search(
                model, out_dir, cfg, sac, ropts, resume=resume, calib=calib, presets=presets,
                progress=stage_progress(p), on_episode=on_episode,
            )
        except KeyboardInterrupt:
            err.print(
                f"interrupted: the checkpoint in {out_dir} holds every finished episode; "
                f"continue with the same command plus --resume"
            )
            raise typer.Exit(130) from None
    best = res.state.best
    if best is None:
        out.print(f"no allocation within the budget after {res.state.episode} episodes; run on with --resume")
        return
    out.print(
        f"best: episode {best['episode']}, {q} {best['quality']:.4f}, bpw {best['bpw']:.3f} "
        f"(nominal {best['bpw_nominal']:.2f}), {res.gguf}"
    )
    out.print(f"policy {res.policy}, allocation {res.allocation}, report {res.run_dir / 'report.json'}")
