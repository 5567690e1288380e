"""`apply`: a trained policy rolled out zero-shot on another model (paper §5.6) at a budget or, for a policy
trained at a whole-file size, at a --size. Its own module beside search.py because it only reads a policy and
writes one GGUF: no run directory, episodes or resume; the budget, folding and calibration options it shares
with `search` live in common.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ramp_cpp.cli.common import (
    BudgetModeOpt,
    BudgetOpt,
    CalibOpt,
    FoldOpt,
    ForceOpt,
    GpuOpt,
    NoFoldOpt,
    NoImatrixOpt,
    RayOpt,
    RecipeOpt,
    SizeOpt,
    ThreadsOpt,
    WorkersOpt,
    bar,
    cost_printer,
    executor_for,
    fold_setting,
    out,
    resolve_budget,
    stage_progress,
)
from ramp_cpp.cli.modelarg import resolved_model
from ramp_cpp.errors import RampError


def apply(
    policy: Path,
    model: Path,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output GGUF (default: MODEL.ramp-BUDGET.gguf beside MODEL)."),
    ] = None,
    budget: BudgetOpt = None,
    budget_mode: BudgetModeOpt = "weighted",
    size: SizeOpt = None,
    no_fold: NoFoldOpt = False,
    fold: FoldOpt = None,
    no_imatrix: NoImatrixOpt = False,
    calib: CalibOpt = None,
    recipe: RecipeOpt = "paper",
    force: ForceOpt = False,
    sensitivity: Annotated[
        str | None,
        typer.Option(
            "--sensitivity",
            help="Sized policies: the sensitivity, measured, proxy or transferred (no evaluation); default: "
            "the one the policy was trained with (measured; proxy for one trained across models).",
        ),
    ] = None,
    text: Annotated[
        str,
        typer.Option("--text", help="Sized policies: the text of the measured sensitivity and of --fold auto "
                     "(a corpus name or file, never wikitext2-test)."),
    ] = "wikitext2-valid",
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
    workers: WorkersOpt = None,
    ray_address: RayOpt = None,
) -> None:
    """Apply a trained policy zero-shot to another model (paper §5.6) and write its GGUF."""
    from ramp_cpp.allocate.sac.policyfile import is_sized, load_policy
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.fold.source import ramp_output_name
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.apply import ApplyConfig, apply_policy

    meta = load_policy(policy).meta
    home, model = model.parent, resolved_model(model)  # outputs beside the file or checkpoint folder given
    if is_sized(meta):
        # the rollout's state reads the sensitivity: apply with the one the policy learned on
        sensitivity = sensitivity or str(meta.get("sensitivity", "measured"))
        if size is None or budget is not None:
            raise RampError(f"{policy} was trained at a whole-file size: give --size (e.g. Q4_K_M or 95MiB)")
        from ramp_cpp.pipeline.plan import default_fold

        fold_mode = fold_setting(fold, no_fold, default_fold(sensitivity, "auto"))
        output = output or home / ramp_output_name(model, "".join(size.split()))
        with executor_for(workers, ray_address, threads, gpu_layers) as ex:
            _apply_sized(policy, model, output, size, sensitivity, fold_mode, no_imatrix, calib, recipe,
                         force, threads, gpu_layers, text, ex)
        return
    if workers or ray_address:
        raise RampError("--workers/--ray spread a sized policy's evaluations; --budget runs serially")
    if fold_setting(fold, no_fold) == "auto":
        raise RampError("--fold auto applies to a sized policy; a --budget policy takes on or off")
    no_fold = fold_setting(fold, no_fold) == "off"
    b, mode = resolve_budget(model, budget, budget_mode, size)
    if output is None:
        output = home / ramp_output_name(model, "".join(size.split()) if size else f"{b:g}")
    cfg = ApplyConfig(
        budget=b, budget_mode=mode, fold=not no_fold, imatrix=not no_imatrix,
        calib=load_recipe(recipe or "paper"),
    )
    opts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    with bar("apply") as p:
        prog = stage_progress(p)
        r = apply_policy(policy, model, output, cfg, opts, calib=calib, force=force, progress=prog)
    m, m0 = r.measures, r.policy_measures
    out.print(
        f"{r.path}: {r.file_size / 2**20:.1f} MiB, bpw {m.bpw:.3f} (nominal {m.bpw_nominal:.2f}); "
        f"policy gave {m0.bpw:.3f}, {r.n_repaired} tensors repaired to fit {mode} budget {b:g}"
    )


def _apply_sized(
    policy: Path, model: Path, output: Path | None, size: str, sensitivity: str, fold: str,
    no_imatrix: bool,
    calib: Path | None, recipe: str | None, force: bool, threads: int | None, gpu_layers: int, text: str,
    executor: Any = None,
) -> None:
    """A sized policy's mean-action rollout on MODEL at --size, through the same stages as search (a run
    directory beside the output, removed afterwards; only the GGUF is kept)."""
    import shutil
    import tempfile

    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.fold.source import ramp_output_name
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.plan import resolve_sensitivity
    from ramp_cpp.pipeline.run import describe, run_direct
    from ramp_cpp.pipeline.sizedconfig import SizedConfig
    from ramp_cpp.store.atomic import check_output

    if output is None:
        output = model.parent / ramp_output_name(model, "".join(size.split()))
    dst = check_output(output, force)
    sens = resolve_sensitivity("policy", sensitivity)
    dcfg = SizedConfig(
        fold=fold != "off", imatrix=not no_imatrix, calib=load_recipe(recipe or "paper"), text=text
    )
    rd = Path(tempfile.mkdtemp(prefix=".ramp-apply-", dir=dst.parent))
    try:
        with bar("apply") as p:
            ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
            r = run_direct(
                model, rd, "policy", size, dcfg, opts=ropts, calib=calib, presets=(),
                progress=stage_progress(p), sensitivity=sens, policy=policy, fold=fold,
                on_cost=cost_printer(p), executor=executor,
            )
        r.gguf.replace(dst)
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    out.print(f"{dst}: " + describe(r).split(": ", 1)[1], soft_wrap=True)
