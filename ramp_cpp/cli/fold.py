"""`fold`: Scale Folding (paper §4.3) of an F16 model with its calibration, the folded model's calibration
written too when asked (ramp_cpp/fold/folding.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import ForceOpt, JsonOpt, bar, chunk_progress, emit, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model
from ramp_cpp.errors import RampError


def fold(
    model: Annotated[Path, typer.Argument(help=f"Model to fold: {MODEL_HELP}.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration of MODEL from `ramp-cpp calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded GGUF.")],
    calib_out: Annotated[
        Path | None,
        typer.Option("--calib-out", help="Also write the calibration of the folded model (x/s inputs)."),
    ] = None,
    f32: Annotated[bool, typer.Option("--f32", help="Store the folded linears as F32.")] = False,
    fold_power: Annotated[
        str,
        typer.Option(
            "--fold-power",
            help="Exponent of max|x| in s: a number (0.5, the paper's), or `search`: per norm group the one "
            "of 0, 0.25, 0.5, 0.75, 1 whose Q4_K rounding has the least imatrix-weighted error.",
        ),
    ] = "0.5",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Scale folding (paper §4.3): W <- W·diag(s), norm <- norm/s with s = sqrt(max|x|)/mean + 1e-5."""
    from ramp_cpp.calibration.artifact import load_calibration, save_calibration
    from ramp_cpp.fold.folding import fold as run_fold
    from ramp_cpp.fold.folding import parse_fold_power
    from ramp_cpp.store.atomic import check_output

    cfg = parse_fold_power(fold_power)
    check_output(output, force)
    if calib_out is not None:
        check_output(calib_out, force)
        if calib_out.resolve() == output.resolve():
            raise RampError("--calib-out and --output name the same file")
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    cal = load_calibration(calib)
    with bar("fold") as p:
        r = run_fold(model, cal, output, force=force, progress=chunk_progress(p, "tensors"), f32=f32, cfg=cfg)
    if calib_out is not None:
        save_calibration(r.calibration, calib_out, force)
    s = r.summary()
    if as_json:
        emit({**s, "calib_out": str(calib_out) if calib_out else None})
        return
    out.print(
        f"wrote {output}: {s['groups']} norm groups, {s['linears']} linears ({s['linear_type']}) folded, "
        f"s in [{s['s_min']:.3g}, {s['s_max']:.3g}], exponent {s['power']}"
        + (f" (groups per exponent: {s['power_counts']})" if s["search_errors"] else "")
        + f", {s['seconds']:.1f} s"
        + (f"; folded calibration {calib_out}" if calib_out else ""),
        soft_wrap=True,
    )
