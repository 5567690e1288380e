"""One command per model: every cell of the benchmark (resumable), then `bench/results/<model>.md` and
`bench/results/<model>.png`, written from the cells alone.

    .venv/bin/python -m bench.run smollm2 [--stages presets,alloc,sac,report] [--fold on]
        [--sac-evaluations 150] [--workers N | --ray ADDRESS]
    make bench MODEL=smollm2

With `--workers N` (local Ray) or `--ray ADDRESS` the cells run as jobs (`compare.fan_out`): the presets as
one batch, then the allocators' and SAC's cells as another.

The cells are `bench/compare.py`'s (its protocol: off-grid base, one calibration, folding choice and imatrix
per base, held-out `wikitext2-test` chunks 0..15 of 512, whole-file bytes):
- `presets`: llama.cpp's presets `PRESETS` on the unfolded base, without and with the imatrix (the line every
  method is drawn against);
- `alloc`: uniform, greedy on the proxy and greedy on the measured sensitivity at the whole-file sizes of
  `SIZES` (each preset + imatrix on the same base), at `--fold`;
- `sac`: the SAC search warm-started from the measured greedy at the same sizes (`--sac-evaluations`);
- `report`: the tables, the ablations at Q4_K_M's size (issue 11 item 6: imatrix, folding, sensitivity, SAC
  features/reward/projection/warm start; `ABLATIONS`) and the Pareto plot. A cell that has not run shows
  as "-", never as a guess.

Finished cells are skipped; a killed run resumes where it stopped (the SAC search from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.compare import (
    BENCH_RECIPE,
    HERE,
    Cell,
    Fold,
    Results,
    add_executor_args,
    executor_of,
    fan_out,
    log,
    prepare,
    warm,
)
from bench.table import groups_table, sac_table, strength_table, table
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.executor import Executor
from ramp_cpp.store.atomic import atomic_path

PRESETS = ("Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
SIZES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")
ALLOCATORS = ("uniform", "greedy", "greedy-measured")
STAGES = ("presets", "alloc", "sac", "report")
CAVEAT = (
    "These bases were dequantized from the quantized files their PyPI packages ship, then moved off that "
    "grid by a function-preserving channel rescale (`ramp-cpp offgrid`); token_embd/output cannot be "
    "rescaled and keep the source's grid, so a type on the source's grid can be nearly free for them "
    "(Gemma's and Qwen's sources contain Q4_K/Q5_0/Q6_K grids; SmolLM2's is Q4_1)."
)


def sac_method(evaluations: int) -> str:
    return "sac" if evaluations == 150 else f"sac-e{evaluations}"


def run_cells(
    model: str, stages: set[str], fold: Fold, evaluations: int, chunks: int, recipe: str, ex: Executor,
    sizes: tuple[str, ...] = SIZES, presets: tuple[str, ...] = PRESETS,
) -> None:
    """The cells of `stages` on `ex`: the presets (which set each size's target) as one batch, then the
    allocators' and SAC's cells as another."""
    res = Results(model)
    res.command(sys.argv[1:], "-m bench.run")
    b = prepare(model, "offgrid", 0, recipe)
    methods = [*(ALLOCATORS if "alloc" in stages else ())]
    methods += [sac_method(evaluations)] if "sac" in stages else []
    folds = [Fold(None), *([fold] if fold else [])]
    warm(b, [fold] if fold else [Fold(None)], methods, chunks)

    def cell(method: str, preset: str, folded: Fold, target: int = 0) -> Cell:
        return Cell.of(b, recipe, method, preset, target, folded, chunks)

    jobs = [cell(k, p, Fold(None)) for p in presets for k in ("preset-noimatrix", "preset")
            if "presets" in stages]
    jobs += [cell("preset", s, f) for s in sizes for f in folds]
    jobs = list(dict.fromkeys(jobs))  # a size's own preset is one of the sweep's: one job
    rows = fan_out(ex, jobs)
    target = {c.preset: r["file_bytes"] for c, r in zip(jobs, rows, strict=True)
              if c.fold is None and c.kind == "preset"}
    fan_out(ex, [cell(m, s, fold, target[s]) for s in sizes for m in methods])


# -- report -------------------------------------------------------------------------------------------


def _cells(model: str) -> dict[str, Any]:
    return json.loads((HERE / "results" / f"{model}.json").read_text())


def _get(cells: dict[str, Any], fold: str, method: str, size: str, chunks: int) -> dict[str, Any] | None:
    r = cells.get(f"offgrid-s0|{fold}|{method}|{size}|{chunks}")
    return r if isinstance(r, dict) else None


def _fmt(x: Any, f: str) -> str:
    return "-" if x is None else format(x, f)


def size_table(cells: dict[str, Any], size: str, fold: Fold, sac: str, chunks: int) -> str:
    """Tables 12–15 in our protocol: every method at one whole-file size, size and KLD relative to SAC."""
    rows = [
        (f"{size} (llama.cpp)", _get(cells, "nofold", "preset", size, chunks)),
        (f"{size} + imatrix", _get(cells, "nofold", "preset+imatrix", size, chunks)),
        (f"{size} + imatrix, {fold.tag}", _get(cells, fold.tag, "preset+imatrix", size, chunks)),
        *((m, _get(cells, fold.tag, m, size, chunks)) for m in ALLOCATORS),
        ("SAC", _get(cells, fold.tag, sac, size, chunks) or _longest_sac(cells, fold, size, chunks)),
    ]
    s = dict(rows)["SAC"]
    out = [
        "| method | MiB | size vs SAC | bpw file | bpw linears | PPL | mean KLD | p99 KLD | p99.9 KLD | "
        "same top % | KLD vs SAC | search s | evaluations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        if r is None:
            out.append(f"| {label} | " + " | ".join(["-"] * 12) + " |")
            continue
        g = r.get("kld_groups") if "t_search" not in r else None  # greedy-measured: its calibration
        search_s = r.get("t_search", g and g["seconds"])
        evals = r.get("evaluations", g and g["evaluations"])
        out.append(
            f"| {label} | {r['mib']:.2f} | {_fmt(100 * (r['mib'] / s['mib'] - 1) if s else None, '+.1f')}"
            f"{'%' if s else ''} | {r['bpw_file']:.3f} | {_fmt(r.get('bpw_searched'), '.3f')} | "
            f"{r['ppl']:.3f} | "
            f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | {r['kld_p99']:.3f} | "
            f"{_fmt(r.get('kld_p999'), '.3f')} | {r['same_top_pct']:.1f} | "
            f"{_fmt(r['kld_mean'] / s['kld_mean'] if s else None, '.2f')}{'×' if s else ''} | "
            f"{_fmt(search_s, '.0f')} | {_fmt(evals, 'd')} |"
        )
    return "\n".join(out)


def _longest_sac(cells: dict[str, Any], fold: Fold, size: str, chunks: int) -> dict[str, Any] | None:
    """The plain SAC run (`sac` or `sac-eN`, no other variant) with the most evaluations at this size."""
    runs = [
        r for c, r in cells.items()
        if re.fullmatch(rf"offgrid-s0\|{re.escape(fold.tag)}\|sac(-e\d+)?\|{re.escape(size)}\|{chunks}", c)
    ]
    return max(runs, key=lambda r: r["evaluations"], default=None)


#: Item 6's ablations at one size: (factor, setting, fold tag, method); the first row of a factor is the
#: one the others are read against. SAC variants are `compare.sac_settings`' 20-evaluation runs.
ABLATIONS: tuple[tuple[str, str, str, str], ...] = (
    ("imatrix (llama.cpp preset)", "on", "nofold", "preset+imatrix"),
    ("imatrix (llama.cpp preset)", "off", "nofold", "preset"),
    ("folding (preset + imatrix)", "on", "fold", "preset+imatrix"),
    ("folding (preset + imatrix)", "off", "nofold", "preset+imatrix"),
    ("folding (measured greedy)", "on", "fold", "greedy-measured"),
    ("folding (measured greedy)", "off", "nofold", "greedy-measured"),
    ("sensitivity (greedy)", "measured", "fold", "greedy-measured"),
    ("sensitivity (greedy)", "proxy", "fold", "greedy"),
    ("SAC features", "ramp (budget-aware)", "fold", "sac-e20"),
    ("SAC features", "paper (Table 24)", "fold", "sac-e20-tbl24"),
    ("SAC reward", "KLD relative to greedy", "fold", "sac-e20"),
    ("SAC reward", "paper Eq. 19-21", "fold", "sac-e20-paper"),
    ("SAC projection", "on", "fold", "sac-e20"),
    ("SAC projection", "off", "fold", "sac-e20-noproj"),
    ("SAC warm start", "greedy (BC + buffer)", "fold", "sac-e20"),
    ("SAC warm start", "cold", "fold", "sac-e20-cold"),
)


def ablation_table(cells: dict[str, Any], size: str, chunks: int) -> str | None:
    """Issue 11 item 6: each factor's settings side by side: held-out KLD, its ratio to the factor's first
    row, the real evaluations the setting spent (group calibration or search) and, for SAC, the evaluation
    at which a sampled allocation first beat greedy's reward KLD."""
    out = [
        "| factor | setting | held-out KLD | vs first row | evaluations | evaluations to beat greedy |",
        "|---|---|---|---|---|---|",
    ]
    first: dict[str, dict[str, Any] | None] = {}
    n = 0
    for factor, setting, tag, method in ABLATIONS:
        r = _get(cells, tag, method, size, chunks)
        ref = first.setdefault(factor, r)
        if r is None:
            out.append(f"| {factor} | {setting} | - | - | - | - |")
            continue
        n += 1
        g = r.get("kld_groups")
        evals = r.get("evaluations", g["evaluations"] if g else 0)
        beat = r.get("evals_to_beat_greedy") if method.startswith("sac") else None
        out.append(
            f"| {factor} | {setting} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
            f"{_fmt(ref and r['kld_mean'] / ref['kld_mean'], '.3f')} | {evals} | "
            f"{'-' if not method.startswith('sac') else _fmt(beat, 'd') if beat else 'never'} |"
        )
    return "\n".join(out) if n else None


def preset_table(cells: dict[str, Any], chunks: int) -> str:
    out = ["| preset | MiB | KLD, no imatrix | KLD, imatrix | PPL, imatrix |", "|---|---|---|---|---|"]
    for p in PRESETS:
        a, b = _get(cells, "nofold", "preset", p, chunks), _get(cells, "nofold", "preset+imatrix", p, chunks)
        if a is None and b is None:
            continue
        mib = (b or a or {}).get("mib")
        out.append(
            f"| {p} | {_fmt(mib, '.2f')} | {_fmt(a and a['kld_mean'], '.4f')} | "
            f"{_fmt(b and b['kld_mean'], '.4f')} | {_fmt(b and b['ppl'], '.3f')} |"
        )
    return "\n".join(out)


def pareto_png(model: str, cells: dict[str, Any], fold: Fold, sac: str, chunks: int, path: Path) -> None:
    """File size vs mean KLD (log): the presets as two lines (with and without imatrix), every method's
    cells as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("preset", "--"), ("preset+imatrix", "-")):
        pts = sorted(
            (r["mib"], r["kld_mean"], p)
            for p in PRESETS
            if (r := _get(cells, "nofold", kind, p, chunks)) is not None
        )
        if pts:
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, marker=".", color="gray",
                    label=f"llama.cpp {kind.replace('+', ' + ')}")
            if kind == "preset+imatrix":
                for x, y, p in pts:
                    ax.annotate(p, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for m, marker in (("uniform", "s"), ("greedy", "v"), ("greedy-measured", "^"), (sac, "*")):
        def cell(size: str, m: str = m) -> dict[str, Any] | None:
            r = _get(cells, fold.tag, m, size, chunks)
            return r if r is not None or m != sac else _longest_sac(cells, fold, size, chunks)

        xy = sorted((r["mib"], r["kld_mean"]) for s in SIZES if (r := cell(s)) is not None)
        if xy:
            ax.plot(*zip(*xy, strict=True), marker=marker, linestyle="none", markersize=9 if m == sac else 6,
                    label=f"{'SAC' if m == sac else m}{' (folded)' if fold else ''}")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"mean KLD vs F16, wikitext2-test {chunks}×512")
    ax.set_yscale("log")
    ax.set_title(f"{model} (off-grid base): size vs quality")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(model: str, fold: Fold, evaluations: int, chunks: int) -> Path:
    data = _cells(model)
    cells, sac = data["cells"], sac_method(evaluations)
    base_ppl = next((r["base_ppl"] for r in cells.values() if "base_ppl" in r), None)
    png = HERE / "results" / f"{model}.png"
    pareto_png(model, cells, fold, sac, chunks, png)
    parts = [
        f"# {model}: benchmark (written by `bench/run.py` from `bench/results/{model}.json`)",
        "",
        f"Off-grid base, F16 PPL {_fmt(base_ppl, '.3f')} on the same chunks. Held-out `wikitext2-test` "
        f"chunks 0–{chunks - 1} of 512 tokens; calibration `calib/bench.toml` (wikitext2-valid); every "
        f"method at a size uses the same calibration, folding ({fold.tag}) and imatrix. {CAVEAT}",
        "",
        f"![size vs KLD]({png.name})",
        "",
    ]
    for size in [s for s in SIZES if any(f"|{s}|" in c for c in cells)]:
        parts += [f"## At {size}'s whole-file size", "", size_table(cells, size, fold, sac, chunks), ""]
    parts += ["## llama.cpp presets (unfolded base)", "", preset_table(cells, chunks), ""]
    parts += ["## Every cell", "", "Each method unfolded and folded (`bench/table.py`; KLD / preset relative "
              "to the preset + imatrix on the unfolded model).",
              table(model, "offgrid-s0", chunks).split("\nBase PPL")[0], ""]
    if any(c.startswith("dequant-s0|") for c in cells):
        parts += ["On the **dequantized** base (on the source's grid, for contrast only):",
                  table(model, "dequant-s0", chunks).split("\nBase PPL")[0], ""]
    g = "offgrid-s0|nofold|greedy-measured|Q4_K_M|16"
    if g in cells:
        parts += ["## Group calibration of the measured sensitivity", groups_table(model, g), ""]
    if any(c.split("|")[1].startswith("fold-p") for c in cells):
        parts += ["## Folding strength (s = max|x|^power)", "", strength_table(model), ""]
    variants = sorted(c for c in cells if c.split("|")[2].startswith("greedy-measured-"))
    if variants:
        parts += ["## Group-calibration variants (`greedy-measured-bN-probeX`)", "",
                  "| cell | held-out KLD | reward KLD | evaluations | vs default greedy-measured |",
                  "|---|---|---|---|---|"]
        for c in variants:
            r = cells[c]
            b, tag, m, size, n = c.split("|")
            d = cells.get(f"{b}|{tag}|greedy-measured|{size}|{n}")
            parts.append(
                f"| {tag} {m} at {size} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
                f"{_fmt(r.get('reward_kld'), '.5f')} | {r['kld_groups']['evaluations']} | "
                f"{_fmt(d and r['kld_mean'] / d['kld_mean'], '.3f')} |"
            )
        parts.append("")
    abl = ablation_table(cells, "Q4_K_M", chunks)
    if abl:
        parts += ["## Ablations at Q4_K_M's size (issue 11 item 6)", "",
                  "A missing cell shows \"-\" (`bench/compare.py --methods` names each). SAC rows: 20 real "
                  "evaluations each, one seed; their spread over seeds is in the SAC table below.", "",
                  abl, ""]
    if any(c.split("|")[2].startswith("sac") for c in cells):
        parts += ["## SAC runs against the measured greedy they start from", "",
                  sac_table(model, "offgrid-s0", chunks), ""]
    fold_md = HERE / "results" / f"{model}.fold.md"
    if fold_md.is_file():
        parts += [f"`--fold auto` replayed against held-out text: [{fold_md.name}]({fold_md.name}).", ""]
    parts += ["## Commands", "", *(f"- `{c}`" for c in data["commands"]), ""]
    md = HERE / "results" / f"{model}.md"
    with atomic_path(md, force=True) as tmp:
        tmp.write_text("\n".join(parts))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--fold", default="on", help="folding of the allocators' rows: off, on or pX")
    ap.add_argument("--sac-evaluations", type=int, default=150)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    ap.add_argument("--sizes", default=",".join(SIZES), help="the whole-file sizes (presets' names)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="the preset sweep (empty: only --sizes)")
    add_executor_args(ap)
    a = ap.parse_args()
    stages = set(a.stages.split(","))
    if stages - set(STAGES):
        bad = ", ".join(sorted(stages - set(STAGES)))
        raise SystemExit(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    fold = Fold.parse(a.fold)
    if load_recipe(a.recipe) != load_recipe(BENCH_RECIPE):
        # its cells would land in bench/results/<model>.json beside the benchmark's
        raise SystemExit(f"--recipe {a.recipe}: bench.run keeps the benchmark's recipe ({BENCH_RECIPE}); run "
                         "another through bench.compare --results FOLDER or bench.studies.calibsize")
    if stages - {"report"}:
        ex = executor_of(a)
        try:
            run_cells(a.model, stages, fold, a.sac_evaluations, a.chunks, a.recipe, ex,
                      tuple(x for x in a.sizes.split(",") if x), tuple(x for x in a.presets.split(",") if x))
        finally:
            ex.close()
    if "report" in stages:
        log(f"wrote {report(a.model, fold, a.sac_evaluations, a.chunks)}")


if __name__ == "__main__":
    main()
