"""Commands on one model file, before any calibration: `inspect` (what a GGUF holds, and which of its tensors
the search would type), and the function-preserving copies made for benchmarks: `offgrid` (the same model off
any quantization grid, for models that were dequantized from a quantized file); `pad` and `upcycle`, the other
two such copies, have modules of their own. Each reads or writes a GGUF and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ramp_cpp.cli.common import ForceOpt, JsonOpt, bar, chunk_progress, emit, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model


def inspect(
    model: Annotated[Path, typer.Argument(help=f"Model: {MODEL_HELP}.")],
    as_json: JsonOpt = False,
) -> None:
    """Inventory of a GGUF: architecture, blocks, context, experts, and every weight (2-D, and the 3-D expert
    tensors) with its role and type."""
    from ramp_cpp.llama.ggufio import read_inventory

    info = read_inventory(resolved_model(model))
    if as_json:
        emit(info.to_json())
        return
    out.print(
        f"[bold]{model}[/]: arch [cyan]{info.arch}[/], {info.n_blocks} blocks, "
        f"context {info.context_length}, "
        f"{info.n_params_total / 1e6:.1f}M params, output head "
        f"{'tied to token_embd' if info.tied_output else 'separate'}"
        + (f", {info.n_expert} experts, {info.n_expert_used} per token" if info.n_expert else "")
    )
    t = Table("tensor", "role", "block", "shape ([experts x] out x in)", "params", "type", "MiB", "searched")
    for x in info.tensors:
        t.add_row(
            x.name,
            x.role,
            "" if x.block is None else str(x.block),
            (f"{x.n_expert} x " if x.n_expert > 1 else "") + f"{x.rows_per_expert} x {x.n_per_row}",
            f"{x.n_params:,}",
            x.ggml_type,
            f"{x.nbytes / 2**20:.2f}",
            "yes" if x.searched else "",
        )
    out.print(t)
    from ramp_cpp.model.arch import ROLE_BY_NAME

    for role in dict.fromkeys(x.role for x in info.tensors if x.role in ROLE_BY_NAME):
        if ROLE_BY_NAME[role].why_not:
            out.print(f"{role} not searched: {ROLE_BY_NAME[role].why_not}")
    s = info.searched
    n_exp = sum(x.n_params for x in s if x.n_expert > 1)
    out.print(
        f"{len(s)} searched tensors, {sum(x.n_params for x in s) / 1e6:.1f}M params"
        + (f" ({n_exp / 1e6:.1f}M in {sum(x.n_expert > 1 for x in s)} expert tensors)" if n_exp else "")
    )


def offgrid_(
    model: Annotated[
        Path, typer.Argument(help=f"Model, e.g. dequantized from a quantized file: {MODEL_HELP}.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Off-grid GGUF.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random channel factors.")] = 0,
    spread: Annotated[float, typer.Option("--spread", help="Factors exp(U(-spread, spread)).")] = 0.3,
    permute: Annotated[
        bool,
        typer.Option("--permute", help="Also permute the residual stream's channels: moves token_embd and "
                     "output off the source's grid too."),
    ] = False,
    force: ForceOpt = False,
) -> None:
    """The same model off any quantization grid: a function-preserving random channel rescale, for benchmarks
    on models that were dequantized from a quantized file."""
    from ramp_cpp.fold.offgrid import OffgridConfig, offgrid
    from ramp_cpp.store.atomic import check_output

    check_output(output, force)
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    with bar("off-grid") as p:
        cfg = OffgridConfig(seed, spread, permute)
        offgrid(model, output, cfg, force=force, progress=chunk_progress(p, "tensors"))
    how = f"seed {seed}, spread {spread:g}{', permuted' if permute else ''}"
    out.print(f"wrote {output} ({how})", soft_wrap=True)

