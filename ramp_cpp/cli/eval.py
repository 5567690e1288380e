"""`eval`: perplexity (llama-perplexity's protocol) or KLD against a base of any GGUF, measured in process by
llama.cpp, or with --tasks zero-shot downstream accuracy through lm-evaluation-harness.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ramp_cpp.cli.common import GpuOpt, JsonOpt, ThreadsOpt, bar, chunk_progress, emit, out
from ramp_cpp.cli.modelarg import MODEL_HELP, resolved_model
from ramp_cpp.errors import RampError


def eval_(
    model: Annotated[Path, typer.Argument(help=f"Model to evaluate: {MODEL_HELP}.")],
    text: Annotated[str, typer.Option("--text", help="Text file or corpus name.")] = "wikitext2-test",
    ppl: Annotated[bool, typer.Option("--ppl", help="Perplexity (default when --kld is not given).")] = False,
    kld: Annotated[bool, typer.Option("--kld", help="KL divergence against --base.")] = False,
    base: Annotated[
        Path | None, typer.Option("--base", help=f"Base (F16) model for --kld: {MODEL_HELP}.")
    ] = None,
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
    from ramp_cpp.llama.evaluate import EvalConfig
    from ramp_cpp.store.texts import load_text

    if kld and base is None:
        raise RampError("--kld needs --base BASE.gguf")
    task_names: tuple[str, ...] = ()
    if tasks is not None:
        from ramp_cpp.llama.downstream import check_available, parse_tasks

        task_names = parse_tasks(tasks)
        check_available(task_names)
    model = resolved_model(model)  # a checkpoint folder converted once, a split set checked whole
    base = None if base is None else resolved_model(base)
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
        emit(result)
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
    with bar("eval") as p:
        r = evaluate_downstream(
            model,
            cfg,
            RuntimeOptions(n_threads=threads, n_gpu_layers=gpu),
            chunk_progress(p, "lm-eval requests"),
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

    with bar("eval") as p:
        if kld:
            assert base is not None
            r = run_kld(
                model,
                base,
                body,
                cfg,
                opts,
                progress=chunk_progress(p, "KLD"),
                base_progress=chunk_progress(p, "base log-probs"),
            )
            result["kld"] = asdict(r)
        if ppl:
            result["ppl"] = asdict(perplexity(model, body, cfg, opts, chunk_progress(p, "PPL")))


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
            ("99.9th pct KLD", f"{k['kld_p999']:.5f}"),
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
