"""`measure`: bytes and importance-weighted error of every searched tensor at every candidate type, and with
--kld-groups the KLD per unit of that error per role x depth group, printed (or as JSON). The measurement
stays in the tensor cache (`--cache-dir`), the artifact a search with the same cache reuses; no command read
the SENS.json it used to write, so it writes none (issue 38).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ramp_cpp.cli.common import (
    JsonOpt,
    RayOpt,
    ThreadsOpt,
    WorkersOpt,
    bar,
    chunk_progress,
    emit,
    executor_for,
    out,
    parse_bits,
)
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model
from ramp_cpp.errors import RampError

REWARD_TEXT = "wikitext2-valid"  # the search's reward text; wikitext2-test stays held out


def measure(
    model: Annotated[Path, typer.Argument(help=f"Model whose tensors are measured: {MODEL_HELP}.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration of MODEL from `ramp-cpp calibrate`.")],
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            help="Candidate types: full (default: Q2_K-Q6_K, IQ4_XS/NL, Q4_0-Q5_1, Q8_0), portable (the "
            "same without IQ types), or a list such as Q4_K,IQ4_XS,Q8_0.",
        ),
    ] = None,
    ladder: Annotated[
        str, typer.Option("--ladder", help="types (per-tensor candidates) or paper (--bits with fallbacks).")
    ] = "types",
    bits: Annotated[str, typer.Option("--bits", help="The paper ladder's nominal bits.")] = "3,4,5,6",
    use_imatrix: Annotated[
        bool, typer.Option("--imatrix/--no-imatrix", help="Quantize with the calibration's imatrix.")
    ] = True,
    no_embeddings: Annotated[
        bool, typer.Option("--no-embeddings", help="Measure the blk.N linears only (embeddings: Q8_0).")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Tensor cache root (default: the ramp-cpp cache).")
    ] = None,
    kld_groups: Annotated[
        bool,
        typer.Option(
            "--kld-groups",
            help="Also calibrate the error per role x depth group with KLD against MODEL on wikitext2-valid "
            "(what search --sensitivity measured does); printed, kept beside the measurement.",
        ),
    ] = False,
    chunks: Annotated[int, typer.Option("--chunks", help="--kld-groups: chunks of wikitext2-valid.")] = 4,
    ctx: Annotated[int, typer.Option("--ctx", help="--kld-groups: tokens per chunk.")] = 512,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    ray_address: RayOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bytes and importance-weighted error of every searched tensor at every candidate type, measured on the
    bytes llama.cpp writes, printed (--json: as JSON) and kept in the tensor cache, where a search with the
    same cache reuses it. With --kld-groups, also the KLD each role x depth group costs per unit of that error
    (resumable too)."""
    import time

    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.measure.candidates import DEFAULT_TYPES, CandidateConfig, parse_types

    cc = CandidateConfig(
        types=parse_types(types) if types is not None else DEFAULT_TYPES,
        ladder=ladder,
        bits=parse_bits(bits),
        embeddings=not no_embeddings,
    )
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    cal = load_calibration(calib)
    reward_text = _reward_text(model, chunks, ctx, threads) if kld_groups else ""
    t0 = time.perf_counter()
    with bar("measure") as p, executor_for(workers, ray_address, threads, 0) as ex:
        sens, report = _measure(model, cal, use_imatrix, cc, cache_dir, threads, p, ex,
                                (reward_text, chunks, ctx) if kld_groups else None)
    summary = {
        "model": str(model),
        "tensors": len(sens.tensors),
        "options": sum(len(t.options) for t in sens.tensors),
        "min_bytes": sens.min_bytes(),
        "max_bytes": sens.max_bytes(),
        "fixed_bytes": sens.fixed_bytes,
        "seconds": time.perf_counter() - t0,
        **({"kld_groups": report.to_json()} if report is not None else {}),
    }
    if as_json:
        emit(summary)
        return
    out.print(
        f"{model.name}: {summary['tensors']} tensors, {summary['options']} undominated options, file "
        f"{sens.min_bytes() / 2**20:.2f}-{sens.max_bytes() / 2**20:.2f} MiB "
        f"({sens.fixed_bytes / 2**20:.2f} MiB fixed), {summary['seconds']:.1f} s",
        soft_wrap=True,
    )
    if report is not None:
        _print_groups(report, f"{REWARD_TEXT}, {chunks} chunks of {ctx}")


def _reward_text(model: Path, chunks: int, ctx: int, threads: int | None) -> str:
    """--kld-groups' text, checked long enough before the expensive work."""
    from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
    from ramp_cpp.llama.evaluate import EvalConfig, eval_chunks
    from ramp_cpp.store.texts import load_text

    if chunks < 1 or ctx < 8:
        raise RampError("--chunks must be at least 1 and --ctx at least 8")
    reward_text, _ = load_text(REWARD_TEXT)
    with LlamaModel(model, RuntimeOptions(n_ctx=64, n_threads=threads)) as lm:
        eval_chunks(lm, reward_text, EvalConfig(n_ctx=ctx, n_chunks=chunks))
    return reward_text


def _measure(
    model: Path, cal: Any, use_imatrix: bool, cc: Any, cache_dir: Path | None, threads: int | None, p: Any,
    ex: Any, groups: tuple[str, int, int] | None,
) -> tuple[Any, Any]:
    """The measurement, and with `groups` (text, chunks, ctx) the KLD groups on the tensor cache."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.llama.evaluate import EvalConfig
    from ramp_cpp.measure.proxy import MeasureConfig, default_cache_root
    from ramp_cpp.measure.proxy import measure as run_measure

    im = cal.imatrix() if use_imatrix else None
    sens = run_measure(
        model, cal, im, MeasureConfig(candidates=cc, n_threads=threads), cache_dir,
        progress=chunk_progress(p, "tensors"), cache_progress=chunk_progress(p, "tensor cache (types)"),
        executor=ex,
    )
    if groups is None:
        return sens, None
    from ramp_cpp.measure.groups import calibrate_sensitivity
    from ramp_cpp.measure.tensorcache import build_cache

    text, chunks, ctx = groups
    cache = build_cache(
        model, cc.requested(), cache_dir or default_cache_root(), imatrix=im, base=cc.base, n_threads=threads,
        searched=[t.name for t in sens.tensors], executor=ex,
    )
    _, report = calibrate_sensitivity(
        sens, cache, model, text, EvalConfig(n_ctx=ctx, n_chunks=chunks), RuntimeOptions(n_threads=threads),
        progress=chunk_progress(p, "KLD evaluations"), executor=ex,
    )
    return sens, report


def _print_groups(report: Any, where: str) -> None:
    t = Table(
        "group", "tensors", "Δproxy", "ΔKLD", "ratio", title=f"KLD per unit of proxy error ({where}); "
        f"reference KLD {report.reference_kld:.5f}",
    )
    for g in report.groups:
        measured = "-" if g.measured is None else f"{g.measured:.5f}"
        t.add_row(
            g.name, str(len(g.tensors)), f"{g.predicted:.4g}", measured,
            f"{g.ratio:.4g}{' (floor)' if g.floored else ''}",
        )
    out.print(t)
    for pr in report.pairs:
        rel = "-" if pr.relative_error is None else f"{100 * pr.relative_error:+.1f}%"
        out.print(
            f"pair {pr.groups[0]} + {pr.groups[1]}: ΔKLD {pr.increment:.5f}, sum of singles "
            f"{pr.sum_of_singles:.5f} ({rel})",
            highlight=False,
        )
    out.print(
        f"{report.evaluations} evaluations, {report.seconds:.1f} s ({report.evaluated_now} run now)",
        highlight=False,
    )
