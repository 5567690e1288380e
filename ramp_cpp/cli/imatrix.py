"""`imatrix`: a calibration exported as llama.cpp's importance matrix (llama-imatrix's GGUF format), for
`quantize --imatrix` and llama-quantize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import ForceOpt, out


def imatrix_(
    calib: Annotated[Path, typer.Argument(help="Calibration artifact from `ramp-cpp calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="imatrix GGUF for llama-quantize.")],
    force: ForceOpt = False,
) -> None:
    """Export a calibration as a llama.cpp importance matrix (llama-imatrix's GGUF format)."""
    from ramp_cpp.calibration.artifact import load_calibration, write_imatrix
    from ramp_cpp.llama.ggufio import read_imatrix

    cal = load_calibration(calib)
    write_imatrix(cal, output, force)
    out.print(f"wrote {output}: {len(read_imatrix(output))} tensors from {cal.describe()}", soft_wrap=True)
