"""Commands on a calibration, the activation statistics llama.cpp measures on calibration text:
`calibrate` writes one, `imatrix` exports it for llama-quantize, `fold` applies Scale Folding with it (and
writes the folded model's calibration), `features` prints the layer embeddings it gives the SAC policy.
Together because each takes or makes a calibration artifact and nothing else of the search.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ramp_cpp.cli.common import ForceOpt, GpuOpt, JsonOpt, ThreadsOpt, bar, chunk_progress, emit, out
from ramp_cpp.errors import RampError


def calibrate(
    model: Annotated[Path, typer.Argument(help="F16/F32 GGUF to measure.")],
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


def fold(
    model: Annotated[Path, typer.Argument(help="F16/BF16/F32 GGUF to fold.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration of MODEL from `ramp-cpp calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded GGUF.")],
    calib_out: Annotated[
        Path | None,
        typer.Option("--calib-out", help="Also write the calibration of the folded model (x/s inputs)."),
    ] = None,
    f32: Annotated[bool, typer.Option("--f32", help="Store the folded linears as F32.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Scale folding (paper §4.3): W <- W·diag(s), norm <- norm/s with s = sqrt(max|x|)/mean + 1e-5."""
    from ramp_cpp.calibration.artifact import load_calibration, save_calibration
    from ramp_cpp.fold.folding import fold as run_fold
    from ramp_cpp.store.atomic import check_output

    check_output(output, force)
    if calib_out is not None:
        check_output(calib_out, force)
        if calib_out.resolve() == output.resolve():
            raise RampError("--calib-out and --output name the same file")
    cal = load_calibration(calib)
    with bar("fold") as p:
        r = run_fold(model, cal, output, force=force, progress=chunk_progress(p, "tensors"), f32=f32)
    if calib_out is not None:
        save_calibration(r.calibration, calib_out, force)
    s = r.summary()
    if as_json:
        emit({**s, "calib_out": str(calib_out) if calib_out else None})
        return
    out.print(
        f"wrote {output}: {s['groups']} norm groups, {s['linears']} linears ({s['linear_type']}) folded, "
        f"s in [{s['s_min']:.3g}, {s['s_max']:.3g}], {s['seconds']:.1f} s"
        + (f"; folded calibration {calib_out}" if calib_out else ""),
        soft_wrap=True,
    )


FeaturesOpt = Annotated[
    str, typer.Option("--features", help="Layer embeddings: 'ramp' (default, unsaturated) or 'paper'.")
]


def features(
    model: Path,
    calib: Annotated[Path, typer.Option("--calib", help="Calibration artifact from `ramp-cpp calibrate`.")],
    variant: FeaturesOpt = "ramp",
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (raw dims 1-9) instead of a table.")] = False,
) -> None:
    """Print the 11-dim layer embeddings (paper Table 24) of the searched tensors and which dims saturate."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.calibration.features import DIM_NAMES, N_STATIC, FeatureConfig, model_features, saturation

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
