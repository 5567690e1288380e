"""`upcycle`: a dense model as a mixture of experts computing the same function (ramp_cpp/fold/upcycle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import ForceOpt, bar, chunk_progress, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model


def upcycle_(
    model: Annotated[Path, typer.Argument(help=f"Dense model (llama or qwen2): {MODEL_HELP}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mixture-of-experts GGUF (llama arch).")],
    experts: Annotated[int, typer.Option("--experts", help="Experts per block.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts used per token.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the router and the experts' factors.")] = 0,
    spread: Annotated[
        float, typer.Option("--spread", help="Each expert's up/down channel factors exp(U(-spread, spread)).")
    ] = 0.3,
    force: ForceOpt = False,
) -> None:
    """A mixture of experts computing the same function as a dense model: every expert a copy of the FFN
    moved off the grid by its own channel rescale, a random router, normalized top-k gating."""
    from ramp_cpp.fold.upcycle import UpcycleConfig, upcycle
    from ramp_cpp.store.atomic import check_output

    check_output(output, force)
    cfg = UpcycleConfig(experts, top_k, seed, spread)
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    with bar("upcycle") as p:
        upcycle(model, output, cfg, force=force, progress=chunk_progress(p, "tensors"))
    how = f"{experts} experts, top-{top_k}, seed {seed}, spread {spread:g}"
    out.print(f"wrote {output} ({how})", soft_wrap=True)
