"""`pad`: a model with zero channels so that every row length is a multiple of 256 (ramp_cpp/fold/pad.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import ForceOpt, bar, chunk_progress, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model


def pad_(
    model: Annotated[Path, typer.Argument(help=f"Model (llama or qwen2): {MODEL_HELP}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Padded GGUF.")],
    multiple: Annotated[int, typer.Option("--multiple", help="Row lengths become multiples of this.")] = 256,
    force: ForceOpt = False,
) -> None:
    """The same model with zero channels added so that every row length is a multiple of 256 (hidden size,
    query heads, FFN width): llama.cpp's presets then pick K-quants. Function-preserving."""
    from ramp_cpp.fold.pad import PadConfig, pad, plan_pad
    from ramp_cpp.store.atomic import check_output

    check_output(output, force)
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    plan = plan_pad(model, PadConfig(multiple))
    with bar("pad") as p:
        pad(model, output, PadConfig(multiple), force=force, progress=chunk_progress(p, "tensors"))
    how = ", ".join(
        f"{what} {len(d.pos)} -> {d.size}"
        for what, d in (("hidden", plan.residual), ("query channels", plan.query), ("FFN", plan.ffn))
    )
    out.print(f"wrote {output} ({how})", soft_wrap=True)
