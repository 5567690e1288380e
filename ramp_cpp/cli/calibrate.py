"""`calibrate`: the activation statistics llama.cpp measures on calibration windows, written as a calibration
artifact (CALIB.safetensors) that `imatrix`, `fold`, `features` and `measure` read.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ramp_cpp.cli.common import ForceOpt, GpuOpt, JsonOpt, ThreadsOpt, bar, chunk_progress, emit, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model
from ramp_cpp.errors import RampError


def calibrate(
    model: Annotated[Path, typer.Argument(help=f"Model to measure: {MODEL_HELP}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Calibration artifact (.safetensors).")],
    recipe: Annotated[
        str, typer.Option("--recipe", help="Recipe name in calib/ (paper, fast) or a .toml path.")
    ] = "paper",
    text: Annotated[str | None, typer.Option("--text", help="Text file or corpus name.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="Windows of text.")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help="Tokens per window.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the window draw.")] = None,
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="Also write a llama.cpp imatrix GGUF.")
    ] = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Activation statistics of every weight tensor, measured by llama.cpp on calibration text."""
    import time

    from ramp_cpp.calibration.artifact import save_calibration, write_imatrix
    from ramp_cpp.calibration.collect import calibrate as run_calibrate
    from ramp_cpp.calibration.collect import check_config, config_from_mapping, load_recipe
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.store.texts import load_text

    given = {"text": text, "samples": samples, "ctx": ctx, "seed": seed}
    overrides = {k: v for k, v in given.items() if v is not None}
    cfg = config_from_mapping({**asdict(load_recipe(recipe)), **overrides}, "command line")
    from ramp_cpp.llama.ggufio import read_inventory

    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    check_config(cfg, read_inventory(model).context_length or None)  # before the text: it may take a download
    check_output(output, force)
    if imatrix is not None:
        check_output(imatrix, force)
        if imatrix.resolve() == output.resolve():
            raise RampError("--imatrix and --output name the same file")
    body, source = load_text(cfg.text)
    t0 = time.perf_counter()
    with bar("calibrate") as p:
        cal = run_calibrate(
            model,
            body,
            cfg,
            RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers),
            chunk_progress(p, f"{cfg.samples} x {cfg.ctx} tokens"),
        )
    seconds = time.perf_counter() - t0
    save_calibration(cal, output, force)
    if imatrix is not None:
        write_imatrix(cal, imatrix, force)
    if as_json:
        emit(
            {
                **cal.header(),
                "text_source": source,
                "n_tensors": len(cal.stats),
                "seconds": seconds,
                "output": str(output),
                "imatrix": str(imatrix) if imatrix else None,
            }
        )
        return
    out.print(
        f"wrote {output}: {cal.n_tokens} tokens ({cal.describe()}), {len(cal.stats)} tensors, "
        f"{seconds:.1f} s" + (f"; imatrix {imatrix}" if imatrix else ""),
        soft_wrap=True,
    )
