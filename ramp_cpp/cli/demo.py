"""`demo`: the main job on the demo model (demo_model.py fetches it) end to end: greedy and SAC at Q4_K_M's
size, then both files against llama.cpp's presets on held-out text (ramp_cpp/pipeline/demo.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ramp_cpp.cli.common import ThreadsOpt, bar, err, out, stage_progress


def demo_table(rows: list[Any], title: str) -> Table:
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
    from ramp_cpp.llama.evaluate import EvalConfig
    from ramp_cpp.pipeline.demo import (
        EVAL_TEXT,
        DemoFile,
        compare,
        fetch_demo_base,
        preset_files,
        run_demo_search,
    )
    from ramp_cpp.store.texts import load_text

    base = fetch_demo_base(lambda m: err.log(m), n_threads=threads)
    body, _ = load_text(EVAL_TEXT)  # a missing text is found before the search, not after it
    work = base.parent
    opts = RuntimeOptions(n_threads=threads)
    with bar("demo search") as p:
        ev = p.add_task("SAC evaluations", total=evaluations)

        def on_episode(r: dict[str, Any]) -> None:
            p.update(ev, completed=r["evaluations"])

        runs = run_demo_search(base, work, evaluations, opts, stage_progress(p), on_episode)
    files = [DemoFile("RAMP (SAC)", runs.sac.gguf), DemoFile("greedy", runs.greedy.gguf)]
    files += preset_files(base, runs.greedy.run_dir, threads, lambda m: err.log(m))
    ecfg = EvalConfig(n_chunks=chunks)
    rows = compare(files, base, body, ecfg, opts, lambda m: err.log(m))
    title = f"{EVAL_TEXT} (held out), {chunks} chunks of {ecfg.n_ctx}; base PPL {rows[0].base_ppl:.3f}"
    out.print(demo_table(rows, title))
    out.print(f"files in {work}:", soft_wrap=True)
    for r in rows:
        out.print(f"  {r.label:<15} {r.path.relative_to(work)}", soft_wrap=True, highlight=False)
    out.print(
        f"runs: {runs.sac.run_dir} (report.json, policy.safetensors), {runs.greedy.run_dir}; "
        "`ramp-cpp search --method sac --size ...` for a full run",
        soft_wrap=True,
    )
