"""`paper-search`: the paper's search as published, for comparison (paper §3, Algorithm 1): SAC on a bit
ceiling `--budget` (Eq. 19-21) over the paper's ladder of nominal bits, resumable with `--resume`; the run is
ramp_cpp/pipeline/paper/run.py. The whole-file product is `search` (search.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ramp_cpp.cli.common import (
    BudgetModeOpt,
    BudgetOpt,
    CalibOpt,
    GpuOpt,
    NoImatrixOpt,
    ThreadsOpt,
    bar,
    err,
    out,
    parse_bits,
    parse_presets,
    recipe_opt,
    stage_progress,
)
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model
from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.folddecision import Fold

PRESETS = ("Q4_K_M", "Q3_K_M")  # the presets its report compares with


def paper_search(
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help=f"Model to search: {MODEL_HELP}.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("ramp-run"),
    budget: BudgetOpt = None,
    budget_mode: BudgetModeOpt = "weighted",
    metric: Annotated[str, typer.Option("--metric", help="Reward quality: ppl (paper) or kld.")] = "ppl",
    bits: Annotated[str, typer.Option("--bits", help="Ladder of nominal bits (2,3,4,5,6,8).")] = "3,4,5,6",
    include_embeddings: Annotated[
        bool, typer.Option("--include-embeddings", help="Also search token_embd / output.")
    ] = False,
    episodes: Annotated[int, typer.Option("--episodes", help="Episodes (paper: 200-300).")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", help="Random warm-up episodes (paper: 20).")] = 20,
    updates: Annotated[int, typer.Option("--updates", help="SAC updates per episode.")] = 64,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Also score the mean action every N episodes (0: never).")
    ] = 10,
    features_: Annotated[str, typer.Option("--features", help="Layer embeddings: ramp or paper.")] = "ramp",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the search.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    presets_: Annotated[
        str | None,
        typer.Option(
            "--presets",
            help="llama.cpp presets scored beside the result, with the same "
            "imatrix (default: Q4_K_M,Q3_K_M).",
            show_default=False,
        ),
    ] = None,
    no_presets: Annotated[bool, typer.Option("--no-presets", help="Score no preset.")] = False,
    fold: Annotated[
        Fold | None,
        typer.Option(
            "--fold", case_sensitive=False, help="Scale Folding: on (default) or off.", show_default=False
        ),
    ] = None,
    text: Annotated[
        str, typer.Option("--text", help="Reward text: a corpus name or file (never wikitext2-test).")
    ] = "wikitext2-valid",
    chunks: Annotated[int, typer.Option("--chunks", help="Reward chunks of the reward text.")] = 4,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per reward chunk.")] = 512,
    calib: CalibOpt = None,
    recipe: Annotated[str | None, recipe_opt("paper", " (128 x 2048 tokens)")] = None,
    no_imatrix: NoImatrixOpt = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
) -> None:
    """The paper's search as published, for comparison: SAC on a bit ceiling --budget (Eq. 19-21,
    Algorithm 1); writes policy, allocation, GGUF and report to --out; --resume continues it."""
    from ramp_cpp.allocate.paper.search import SearchConfig
    from ramp_cpp.allocate.sac.agent import SACConfig
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.paper.run import SETTINGS, resolve_budget

    if fold is not None and fold.decided_by_run:
        raise RampError(f"--fold {fold} applies to the whole-file search; paper-search takes on or off")
    if model is None:
        if not resume or not (out_dir / SETTINGS).is_file():
            raise RampError("--model is required (or --resume with --out naming an existing run)")
        model = Path(json.loads((out_dir / SETTINGS).read_text())["model_path"])
    model = resolved_model(model)
    b, mode = resolve_budget(model, budget, budget_mode, None)
    cfg = SearchConfig(
        budget=b,
        budget_mode=mode,
        metric=metric,
        bits=parse_bits(bits),
        include_embeddings=include_embeddings,
        n_ctx=ctx,
        chunks=chunks,
        text=text,
        features=features_,
        fold=fold is not Fold.OFF,
        imatrix=not no_imatrix,
        eval_every=eval_every,
        calib=load_recipe(recipe or "paper"),
    )
    sac = SACConfig(episodes=episodes, warmup_episodes=warmup, updates_per_episode=updates, seed=seed)
    presets = parse_presets(presets_, no_presets, PRESETS)
    _run(
        model,
        out_dir,
        cfg,
        sac,
        RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers),
        resume,
        calib,
        presets,
    )


def _run(
    model: Path,
    out_dir: Path,
    cfg: Any,
    sac: Any,
    ropts: Any,
    resume: bool,
    calib: Path | None,
    presets: tuple[str, ...],
) -> None:
    """The search with a bar and a line per episode; Ctrl-C keeps the checkpoint."""
    from ramp_cpp.cli.sized import interrupts
    from ramp_cpp.pipeline.paper.run import search as run_search

    q = "PPL" if cfg.metric == "ppl" else "KLD"
    with bar("search") as p, interrupts() as interrupted:
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
                model,
                out_dir,
                cfg,
                sac,
                ropts,
                resume=resume,
                calib=calib,
                presets=presets,
                progress=stage_progress(p),
                on_episode=on_episode,
            )
        except KeyboardInterrupt:
            err.print(
                f"interrupted: the checkpoint in {out_dir} holds every finished episode; "
                "continue with the same command plus --resume"
            )
            raise typer.Exit(130) from None
    _report(res, q)


def _report(res: Any, q: str) -> None:
    best = res.state.best
    if best is None:
        out.print(f"no allocation within the budget after {res.state.episode} episodes; run on with --resume")
        return
    out.print(
        f"best: episode {best['episode']}, {q} {best['quality']:.4f}, bpw {best['bpw']:.3f} "
        f"(nominal {best['bpw_nominal']:.2f}), {res.gguf}"
    )
    out.print(f"policy {res.policy}, allocation {res.allocation}, report {res.run_dir / 'report.json'}")
