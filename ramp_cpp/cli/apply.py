"""`apply`: a trained policy rolled out zero-shot on another model (paper §5.6). The pipeline opens the policy
and dispatches on its kind (pipeline/apply.py): a sized policy runs like `search --size` (the same defaults,
fold rule, cost lines, `--dry-run` and never-worse rule, in a run folder the same command resumes), a policy
of the paper's search at a `--budget`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ramp_cpp.cli.common import (
    BudgetModeOpt,
    BudgetOpt,
    CalibOpt,
    FoldOpt,
    ForceAllocationOpt,
    ForceOpt,
    GpuOpt,
    NoImatrixOpt,
    RayOpt,
    SizeOpt,
    SplitOpt,
    ThreadsOpt,
    WorkersOpt,
    bar,
    out,
    parse_split,
    recipe_opt,
    stage_progress,
)
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model


def apply(
    policy: Annotated[Path, typer.Argument(help="Policy file (.policy.safetensors).")],
    model: Annotated[Path, typer.Argument(help=f"Model to apply it to: {MODEL_HELP}.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output GGUF (default: MODEL.ramp-SIZE.gguf beside MODEL, a checkpoint folder too).",
            show_default=False,
        ),
    ] = None,
    size: SizeOpt = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Sized policies: the run folder, resumed by the same command (default: "
            "OUTPUT.run beside the output).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Sized policies: print each stage's expected cost; run nothing.")
    ] = False,
    budget: BudgetOpt = None,
    budget_mode: BudgetModeOpt = "weighted",
    fold: FoldOpt = None,
    force_allocation: ForceAllocationOpt = False,
    sensitivity: Annotated[
        str | None,
        typer.Option(
            "--sensitivity",
            show_default=False,
            help="Sized policies: measured, proxy or transferred "
            "(no evaluation); default: the one the policy was trained with.",
        ),
    ] = None,
    text: Annotated[
        str,
        typer.Option(
            "--text",
            help="Sized policies: the reward text of the measured sensitivity, the fold "
            "check and the never-worse rule (never wikitext2-test).",
        ),
    ] = "wikitext2-valid",
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            show_default=False,
            help="Sized policies: the candidate types, as for search: full (default), portable (no IQ "
            "types) or a list.",
        ),
    ] = None,
    no_imatrix: NoImatrixOpt = False,
    calib: CalibOpt = None,
    recipe: Annotated[
        str | None, recipe_opt("bench for a sized policy (as search), paper for a --budget one")
    ] = None,
    force: ForceOpt = False,
    split: SplitOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
    workers: WorkersOpt = None,
    ray_address: RayOpt = None,
) -> None:
    """Apply a trained policy zero-shot to another model (paper §5.6) and write its GGUF: a sized policy at
    --size, like search (a run folder the same command resumes); a --budget policy at its bit budget."""
    from ramp_cpp.cli.sized import plan_sized
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.apply import ApplyRequest, open_apply

    split_max = parse_split(split)  # before a checkpoint folder's conversion
    opened = open_apply(
        ApplyRequest(
            policy,
            resolved_model(model),  # a checkpoint folder converted, once
            size=size,
            budget=budget,
            budget_mode=budget_mode,
            output=output,
            run_dir=run_dir,
            text=text,
            recipe=recipe,
            calib=calib,
            imatrix=not no_imatrix,
            fold=fold,
            sensitivity=sensitivity,
            force=force,
            force_allocation=force_allocation,
            split_max=split_max,
            types=types,
            beside=Path(os.path.abspath(model)).parent if model.is_dir() else None,  # not the cache's folder
        )
    )
    ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    if opened.sized is None:
        _apply_budget(opened, ropts, dry_run, workers, ray_address)
    elif dry_run:
        plan_sized(opened.sized, ropts, "policy")
    else:
        _apply_sized(opened, ropts, workers, ray_address)


def _apply_sized(opened: Any, ropts: Any, workers: int | None, ray: str | None) -> None:
    from ramp_cpp.cli.sized import report_sized, run_sized
    from ramp_cpp.pipeline.apply import run_apply

    r = run_sized(opened.sized, ropts, workers, ray, lambda hooks, ex: run_apply(opened, ropts, hooks, ex))
    report_sized(r.sized, r.output)


def _apply_budget(opened: Any, ropts: Any, dry_run: bool, workers: int | None, ray: str | None) -> None:
    """A --budget policy: the paper's apply, serial, with a bar."""
    from ramp_cpp.errors import RampError
    from ramp_cpp.pipeline.apply import run_apply
    from ramp_cpp.pipeline.request import Hooks

    if dry_run or workers or ray:
        raise RampError(
            "--workers/--ray and --dry-run apply to a sized policy; a --budget policy runs serially"
        )
    with bar("apply") as p:
        applied = run_apply(opened, ropts, Hooks(progress=stage_progress(p)))
    r = applied.paper
    m, m0 = r.measures, r.policy_measures
    out.print(
        f"{applied.output}: {r.file_size / 2**20:.1f} MiB, bpw {m.bpw:.3f} (nominal {m.bpw_nominal:.2f}); "
        f"policy gave {m0.bpw:.3f}, {r.n_repaired} tensors repaired to fit the budget"
        + (f"; {applied.split.describe()}" if applied.split else "")
    )
