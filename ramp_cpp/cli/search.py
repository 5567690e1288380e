"""`search`: the whole-file product. A per-tensor allocation of one model at a whole-file `--size` (uniform,
greedy knapsack or the SAC search warm-started from greedy, on the measured sensitivity), written as
allocation, GGUF and report (and for SAC a policy) to a run folder that the same command resumes. The paper's
bit-budget search is its own command (paper_search.py); what a sized run shows is sized.py's, shared with
`apply`.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import (
    SIZE_HELP,
    CalibOpt,
    FoldOpt,
    ForceAllocationOpt,
    GpuOpt,
    GpuSizeOpt,
    KvCtxOpt,
    KvSizeOpt,
    NoImatrixOpt,
    RayOpt,
    SplitOpt,
    ThreadsOpt,
    WorkersOpt,
    gpu_fields,
    in_panel,
    parse_presets,
    parse_split,
    recipe_opt,
)
from ramp_cpp.cli.modelarg import resolved_model
from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.folddecision import Fold

# `search --help`: --model, --out, --size, --method on top (the unnamed panel), then these panels, in order
ALLOC = "Allocation"
SAC = "SAC (--method sac)"
TEXT = "Reward text and calibration"
RUNTIME = "Runtime"
_alloc = functools.partial(typer.Option, rich_help_panel=ALLOC)
_sac = functools.partial(typer.Option, rich_help_panel=SAC)
_text = functools.partial(typer.Option, rich_help_panel=TEXT)


def search(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", show_default=False,
            help="F16/BF16 GGUF to search (or a split GGUF's first shard, or a Hugging Face checkpoint "
            "folder).",
        ),
    ],
    size: Annotated[str, typer.Option("--size", help=SIZE_HELP, show_default=False)],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder; the same command resumes it.")
    ] = Path("ramp-run"),
    method: Annotated[
        str, typer.Option("--method", help="sac, or greedy / uniform on the measured sensitivity.")
    ] = "sac",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print each stage's expected cost (time, RAM, disk, evaluation units, "
            "quantizer passes); run and write nothing.",
        ),
    ] = False,
    presets_: Annotated[
        str | None,
        _alloc(
            "--presets",
            help="More llama.cpp presets to score beside the result, with the same imatrix "
            "(the preset a --size names is always scored).",
        ),
    ] = None,
    no_presets: Annotated[bool, _alloc("--no-presets", help="Score no presets but the --size one.")] = False,
    force_allocation: Annotated[bool, in_panel(ForceAllocationOpt, ALLOC)] = False,
    gpu_size: Annotated[str | None, in_panel(GpuSizeOpt, ALLOC)] = None,
    kv_size: Annotated[str | None, in_panel(KvSizeOpt, ALLOC)] = None,
    kv_ctx: Annotated[int | None, in_panel(KvCtxOpt, ALLOC)] = None,
    sensitivity: Annotated[
        str | None,
        _alloc(
            "--sensitivity",
            show_default=False,
            help="measured (default: the proxy rescaled per role x depth group by KLD measured on the reward "
            "chunks), proxy, or transferred (rescaled by the shipped table of other models' groups: no "
            "evaluation).",
        ),
    ] = None,
    refine_probes: Annotated[
        int,
        _alloc(
            "--refine-probes",
            help="With the measured sensitivity: up to N more evaluations after the group probes, on the "
            "layers, then the tensors, of the groups whose measured damage per byte is largest "
            "(docs/search.md).",
        ),
    ] = 0,
    types: Annotated[
        str | None,
        _alloc(
            "--types",
            help="Candidate types: full (default), portable (K-quants and legacy types, no IQ: for engines "
            "without IQ kernels), or a list such as Q4_K,IQ4_NL,Q8_0.",
        ),
    ] = None,
    split: Annotated[str | None, in_panel(SplitOpt, ALLOC)] = None,
    no_embeddings: Annotated[
        bool, _alloc("--no-embeddings", help="Keep token_embd / output at Q8_0.")
    ] = False,
    fold: Annotated[Fold | None, in_panel(FoldOpt, ALLOC)] = None,
    fold_power: Annotated[
        str,
        _alloc(
            "--fold-power",
            help="Scale Folding's exponent of max|x|: a number (0.5, the paper's) or search (per norm group, "
            "the one of 0, 0.25, 0.5, 0.75, 1 whose Q4_K rounding has the least imatrix-weighted error).",
        ),
    ] = "0.5",
    tensor_cache: Annotated[
        str,
        _alloc(
            "--tensor-cache",
            help="Where the candidate types' bytes live: disk (all of them), memory (the "
            "base type on disk, the others quantized when asked: the same bytes) or auto (memory; disk for "
            "sac when it fits).",
        ),
    ] = "auto",
    row_sample: Annotated[
        int | None,
        _alloc(
            "--row-sample",
            show_default=False,
            help="Measure each linear's proxy error on every Nth span of "
            "16 rows (1: all rows; default 4, docs/costs.md).",
        ),
    ] = None,
    evaluations: Annotated[int, _sac("--evaluations", help="Real evaluations of the reward chunks.")] = 150,
    reward: Annotated[
        str, _sac("--reward", help="relative (ln greedy's KLD / KLD) or paper (Eq. 19-21).")
    ] = ("relative"),
    no_projection: Annotated[
        bool, _sac("--no-projection", help="Do not project episodes onto the size.")
    ] = False,
    no_warm_start: Annotated[
        bool, _sac("--no-warm-start", help="Start from random actions, not greedy.")
    ] = False,
    rescore: Annotated[int, _sac("--rescore", help="Re-score greedy and the N best on 8 more chunks.")] = 0,
    features_: Annotated[str, _sac("--features", help="Layer embeddings: ramp or paper.")] = "ramp",
    seed: Annotated[int, _sac("--seed", help="Seed of the search.")] = 0,
    rollouts: Annotated[
        int,
        _sac(
            "--rollouts",
            min=1,
            help="Episodes per round, scored together (with --workers/--ray: at "
            "once); another K is its own search (docs/workers.md).",
        ),
    ] = 1,
    text: Annotated[
        str, _text("--text", help="Reward text: a corpus name or file (never wikitext2-test).")
    ] = ("wikitext2-valid"),
    chunks: Annotated[int, _text("--chunks", help="Reward chunks of the reward text.")] = 4,
    ctx: Annotated[int, _text("--ctx", help="Tokens per reward chunk.")] = 512,
    calib: Annotated[Path | None, in_panel(CalibOpt, TEXT)] = None,
    recipe: Annotated[str | None, recipe_opt("bench", " (16 x 512 tokens)", TEXT)] = None,
    no_imatrix: Annotated[bool, in_panel(NoImatrixOpt, TEXT)] = False,
    threads: Annotated[int | None, in_panel(ThreadsOpt, RUNTIME)] = None,
    gpu_layers: Annotated[int, in_panel(GpuOpt, RUNTIME)] = 0,
    workers: Annotated[int | None, in_panel(WorkersOpt, RUNTIME)] = None,
    ray_address: Annotated[str | None, in_panel(RayOpt, RUNTIME)] = None,
) -> None:
    """Search a per-tensor allocation at a whole-file --size (e.g. Q4_K_M for that preset's size, or 95MiB):
    SAC warm-started from greedy, or greedy / uniform; write allocation, GGUF and report to --out. A file that
    scores worse than the preset of the same size is replaced by the preset's (--force-allocation keeps
    it)."""
    from ramp_cpp.allocate.sac.search import SizedSearchConfig
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.cli.sized import plan_sized, report_sized, run_sized
    from ramp_cpp.fold.folding import parse_fold_power
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.measure.candidates import CandidateConfig, parse_types
    from ramp_cpp.pipeline.request import search_request
    from ramp_cpp.pipeline.run import run_direct
    from ramp_cpp.pipeline.sizedconfig import SEARCH_GROUPS, SEARCH_RECIPE, SizedConfig

    if rollouts != 1 and method != "sac":
        raise RampError(f"--rollouts applies to --method sac (the search's rounds), not {method}")
    split_max = parse_split(split)  # before a checkpoint folder's conversion
    req = search_request(
        resolved_model(model),  # a checkpoint folder is converted once (cached), a split set read as one
        out_dir,
        method,
        size,
        SizedConfig(
            text=text,
            n_ctx=ctx,
            chunks=chunks,
            imatrix=not no_imatrix,
            calib=load_recipe(recipe or SEARCH_RECIPE),
            fold_power=parse_fold_power(fold_power).power,
        ),
        sensitivity,
        fold,
        cc=CandidateConfig(types=parse_types(types or "full"), embeddings=not no_embeddings),
        sac=SizedSearchConfig(
            evaluations=evaluations,
            reward=reward,
            projection=not no_projection,
            warm_start=not no_warm_start,
            rescore_top=rescore,
            variant=features_,
            seed=seed,
            rollouts=rollouts,
        ),
        presets=parse_presets(presets_, no_presets),
        calib=calib,
        tensor_cache=tensor_cache,
        force_allocation=force_allocation,
        **gpu_fields(gpu_size, kv_size, kv_ctx),
        split_max=split_max,
        **({} if row_sample is None else {"row_sample": row_sample}),
        **({"gcfg": replace(SEARCH_GROUPS, refine_evaluations=refine_probes)} if refine_probes else {}),
    )
    ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    if dry_run:
        plan_sized(req, ropts, method)
        return
    r = run_sized(req, ropts, workers, ray_address, lambda hooks, ex: run_direct(req, ropts, hooks, ex))
    report_sized(r)
