"""What every command module shares: the two consoles, the option types more than one command takes, and the
output and progress helpers. It imports no command module and is imported by all of them (and by app.py), so
the command modules never import each other or app.py: no circle, and app.py alone decides what is registered.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.folddecision import Fold

out = Console()
err = Console(stderr=True)

ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: all cores).")]
GpuOpt = Annotated[
    int, typer.Option("--gpu-layers", "-ngl", help="Layers offloaded to the GPU (CUDA/Metal build).")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1,
        help="Run the tensor cache's quantizer passes, the group probes and the fold decision as N "
        "parallel jobs on a local Ray cluster (pip install 'ramp-cpp\\[ray]'); each gets --threads CPUs, "
        "default cores / N.",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray", envvar="RAY_ADDRESS",
        help="Join the Ray cluster at this address (auto, host:6379, ray://host:10001) for those jobs; "
        "every node must see the model, the cache and the run folder at the same paths.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]

# search, paper-search and apply: the budget, folding and calibration
BudgetOpt = Annotated[
    float | None,
    typer.Option("--budget", "-b", help="Bit ceiling (Eq. 20; target = ceiling - 0.25). Default 4.25."),
]
BudgetModeOpt = Annotated[
    str, typer.Option("--budget-mode", help="weighted (real bpw of searched tensors), nominal (paper), size.")
]
SIZE_HELP = (
    "Whole-file target: bytes (95MiB, 3.6GB) or a llama.cpp preset's name (Q4_K_M) for that preset's size "
    "with the same imatrix."
)
SizeOpt = Annotated[str | None, typer.Option("--size", help=SIZE_HELP)]
GpuSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-size", show_default=False,
        help="A second cap, for experts offloaded with llama.cpp's -ot exps=CPU: the bytes of every tensor "
        "left on the GPU (all but the *_exps experts) plus the KV cache (--kv-size / --kv-ctx), e.g. 6GiB.",
    ),
]
KvSizeOpt = Annotated[
    str | None, typer.Option("--kv-size", show_default=False, help="KV cache bytes counted in --gpu-size.")
]
KvCtxOpt = Annotated[
    int | None,
    typer.Option(
        "--kv-ctx", show_default=False,
        help="Tokens of context whose F16 KV cache (from the model's layers and KV heads) counts in "
        "--gpu-size.",
    ),
]
FoldOpt = Annotated[
    Fold | None,
    typer.Option(
        "--fold", case_sensitive=False, show_default=False,
        help="Scale Folding (paper §4.3): check (the folded model measured, its allocation also quantized "
        "from the unfolded model, fold unless that is clearly better), auto (both measured), on, off. "
        "Default: check, or on where nothing else in the run evaluates (a zero-evaluation sensitivity "
        "and no SAC search).",
    ),
]
ForceAllocationOpt = Annotated[
    bool,
    typer.Option(
        "--force-allocation",
        help="Write the allocation even where llama.cpp's preset of the same size scores better on the "
        "reward text (default: write the preset's file then, and say so).",
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        "--split-max-size", show_default=False,
        help="Write the GGUF as a split set (llama.cpp's gguf-split convention: NAME-00001-of-0000N.gguf, "
        "load the first) with each shard's file at most this size (50GB, 4GiB); a tensor larger than it "
        "gets a shard of its own.",
    ),
]
NoImatrixOpt = Annotated[bool, typer.Option("--no-imatrix", help="Quantize without the importance matrix.")]
CalibOpt = Annotated[
    Path | None, typer.Option("--calib", help="Reuse a calibration artifact instead of calibrating.")
]


def recipe_opt(default: str, more: str = "", panel: str | None = None) -> Any:
    """--recipe, its help naming the command's true default."""
    return typer.Option(
        "--recipe", show_default=False, rich_help_panel=panel,
        help=f"Calibration recipe in calib/ (paper, bench, fast) or a TOML file; default: {default}{more}.",
    )


def in_panel(opt: Any, panel: str) -> Any:
    """The typer.Option inside the option type `opt` (an `Annotated[T, typer.Option(...)]` above), shown under
    the help panel `panel`: `Annotated[T, in_panel(ThreadsOpt, "Runtime")]` is ThreadsOpt in that panel."""
    info = copy.copy(opt.__metadata__[0])
    info.rich_help_panel = panel
    return info


def emit(obj: Any) -> None:
    """`--json`: the object as indented JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def bar(desc: str) -> Progress:
    """A transient progress display on stderr (stdout stays the command's output)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def chunk_progress(p: Progress, desc: str) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback that drives one bar of `p`."""
    task = p.add_task(desc, total=None)

    def cb(done: int, total: int) -> None:
        p.update(task, completed=done, total=total)

    return cb


def stage_progress(p: Progress) -> Callable[[str, int, int], None]:
    """A `progress(stage, done, total)` callback: one bar of `p` per stage, added when the stage starts."""
    tasks: dict[str, Any] = {}

    def cb(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = p.add_task(stage, total=total)
        p.update(tasks[stage], completed=done, total=total)

    return cb


def cost_line(c: Any) -> str:
    """One stage's costs (costs.StageCost) as the progress display shows them."""
    gib = 1 << 30
    return (
        f"{c.stage}: {c.wall_s:.1f} s (CPU {c.cpu_s:.1f} s), peak RSS {c.peak_rss / gib:.2f} GiB, "
        f"wrote {c.written / gib:.2f} GiB, disk held {c.held / gib:.2f} GiB, {c.E:.2f} E, "
        f"{c.quant_passes} quantizer passes"
        + (f", {c.quant_weights / 1e6:,.0f}M weights quantized in memory" if c.quant_weights else "")
    )


@contextlib.contextmanager
def executor_for(workers: int | None, address: str | None, threads: int | None, gpu_layers: int) -> Any:
    """The executor --workers/--ray ask for (serial without either), closed when the command ends."""
    from ramp_cpp.executor import make_executor

    ex = make_executor(workers, address, threads, gpu_layers)
    if ex.workers > 1 or address:
        err.print(f"evaluations: {ex.describe()}", highlight=False)
    try:
        yield ex
    finally:
        ex.close()


def cost_printer(p: Progress) -> Callable[[Any], None]:
    """run_direct's `on_cost`: a line per finished stage above the bars."""
    return lambda c: p.console.print(cost_line(c), highlight=False, soft_wrap=True)


def parse_bits(spec: str) -> tuple[int, ...]:
    """`--bits 3,4,5,6`: the paper ladder's nominal bits, sorted, each once."""
    try:
        return tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise RampError(f"--bits takes comma-separated integers such as 3,4,5,6, not {spec!r}") from None


def parse_split(spec: str | None) -> int | None:
    """--split-max-size as bytes (None: one file), refused before any work when it is not a positive size."""
    from ramp_cpp.allocate.budget import parse_size

    if spec is None:
        return None
    n = parse_size(spec, "--split-max-size")
    if n < 1:
        raise RampError(f"--split-max-size must be a positive size, not {spec!r}")
    return n


def parse_presets(spec: str | None, no_presets: bool, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """--presets Q4_K_M,Q3_K_M / --no-presets as llama.cpp preset names, checked before any work."""
    from ramp_cpp.llama.quantize import presets

    if no_presets and spec:
        raise RampError("--no-presets contradicts --presets")
    if no_presets or not spec:
        return () if no_presets else default
    names = tuple(dict.fromkeys(p.strip().upper() for p in spec.split(",") if p.strip()))
    bad = [n for n in names if n not in presets()]
    if bad or not names:
        what = bad[0] if bad else spec
        raise RampError(f"unknown preset {what!r} in --presets (known: {', '.join(presets())})")
    return names


def gpu_fields(gpu_size: str | None, kv_size: str | None, kv_ctx: int | None) -> dict[str, Any]:
    """The request's --gpu-size fields (pipeline/request.SizedRequest), the byte sizes parsed here."""
    from ramp_cpp.allocate.budget import parse_size

    return {
        "gpu_bytes": None if gpu_size is None else parse_size(gpu_size, "--gpu-size"),
        "kv_bytes": None if kv_size is None else parse_size(kv_size, "--kv-size"),
        "kv_ctx": kv_ctx,
    }
