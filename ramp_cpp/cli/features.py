"""`features`: the layer embeddings (paper Table 24) a calibration gives the SAC policy, and which of their
dims saturate (ramp_cpp/calibration/features.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ramp_cpp.cli.common import out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model

FeaturesOpt = Annotated[
    str, typer.Option("--features", help="Layer embeddings: 'ramp' (default, unsaturated) or 'paper'.")
]


def features(
    model: Annotated[Path, typer.Argument(help=f"Model: {MODEL_HELP}.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration artifact from `ramp-cpp calibrate`.")],
    variant: FeaturesOpt = "ramp",
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (raw dims 1-9) instead of a table.")] = False,
) -> None:
    """Print the 11-dim layer embeddings (paper Table 24) of the searched tensors and which dims saturate."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.calibration.features import DIM_NAMES, N_STATIC, FeatureConfig, model_features, saturation

    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    f = model_features(model, load_calibration(calib), FeatureConfig(variant=variant))
    if csv:
        sys.stdout.write(",".join(["tensor", *DIM_NAMES[:N_STATIC]]) + "\n")
        for name, row in zip(f.names, f.raw, strict=True):
            sys.stdout.write(",".join([name, *(f"{v:.6g}" for v in row[:N_STATIC])]) + "\n")
        return
    title = f"{model.name}: layer embeddings ({variant}), raw dims 1-9"
    t = Table("tensor", *DIM_NAMES[:N_STATIC], title=title)
    for name, row in zip(f.names, f.raw, strict=True):
        t.add_row(name, *(f"{v:.4g}" for v in row[:N_STATIC]))
    out.print(t)
    s = Table("dim", "name", "min", "max", "std", "at clip", "useless", title="saturation over tensors")
    for d in saturation(f):
        s.add_row(
            str(d.dim), d.name, f"{d.lo:.4g}", f"{d.hi:.4g}", f"{d.std:.3g}", f"{d.at_clip:.0%}",
            "yes" if d.useless else "",
        )
    out.print(s)
    n_bad = sum(d.useless for d in saturation(f))
    out.print(f"{n_bad} of {N_STATIC} static dims are constant or saturated (dims 10-11 fill during search)")
