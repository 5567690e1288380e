"""Issue 36 item 4: what the portable candidate set (`--types portable`: the K-quants and the legacy types, no
IQ type, for engines without IQ kernels) costs in held-out KLD against the full set, at Q4_K_M's and Q3_K_M's
whole-file sizes.

Each row is two `bench/compare.py` cells of the benchmark's protocol (off-grid base, calibration
`calib/bench.toml`, one folding choice and imatrix, held-out `wikitext2-test` chunks 0–15 of 512, every file
at or under the size of the preset + imatrix on the same base): `greedy-measured` (the full set) and
`greedy-measured-portable`, which reuses the same measurement (the portable rows are cut from the full set's,
and the group probes whose files both sets share are lent, not evaluated again) and allocates over the
portable set at the same size. Cells are kept in `bench/results/portable/<model>.json`, apart from the
benchmark's (both cells of a row from one calibration, folded copy and tensor cache):

    .venv/bin/python -m bench.studies.portable smollm2 qwen0.5b gemma270m   # runs the missing cells
    .venv/bin/python -m bench.studies.portable smollm2 qwen0.5b gemma270m --table   # only the summary

and writes `bench/results/portable.json` (per model and size: both cells' KLD figures and types) and
`portable.md` (the table). A cell that has not run shows as "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.compare import (
    Cell,
    Fold,
    Results,
    add_executor_args,
    executor_of,
    fan_out,
    prepare,
    warm,
)
from bench.models import MODELS
from bench.paths import BENCH, ROOT
from bench.table import dash
from ramp_cpp.store.atomic import atomic_path

SIZES = ("Q4_K_M", "Q3_K_M")
FULL, PORTABLE = "greedy-measured", "greedy-measured-portable"
#: the study's cells, apart from the benchmark's: its full-set cell must come from the same calibration,
#: folded copy and tensor cache as its portable cell, which a benchmark cell made earlier need not (a
#: recalibration moves the measured greedy's KLD by 1-5%)
RESULTS = BENCH / "results" / "portable"
KEEP = ("mib", "file_bytes", "kld_mean", "kld_stderr", "kld_p99", "kld_p999", "same_top_pct", "ppl", "types")


def key(base: str, fold: Fold, method: str, size: str, chunks: int) -> str:
    """A cell's key in a results file (compare.py's: base|fold|method|size|chunks)."""
    return f"{base}|{fold.tag}|{method}|{size}|{chunks}"


def run(model: str, sizes: list[str], fold: Fold, chunks: int, recipe: str, a: argparse.Namespace) -> None:
    """The presets (each size's target) and both methods' cells at each size, on the off-grid base."""
    ex = executor_of(a)
    try:
        res = Results(model, str(RESULTS))
        res.command(sys.argv[1:], "-m bench.studies.portable")
        b = prepare(model, "offgrid", 0, recipe)
        warm(b, [fold], [FULL, PORTABLE], chunks)
        presets = [Cell.of(b, recipe, "preset", s, 0, Fold(None), chunks, str(RESULTS)) for s in sizes]
        target = {c.preset: r["file_bytes"] for c, r in zip(presets, fan_out(ex, presets), strict=True)}
        cells = [Cell.of(b, recipe, m, s, target[s], fold, chunks, str(RESULTS))
                 for s in sizes for m in (FULL, PORTABLE)]
        fan_out(ex, cells)
    finally:
        ex.close()


def summary(cells: dict[str, Any], sizes: list[str], fold: Fold, chunks: int) -> dict[str, Any]:
    """Per size: the preset + imatrix's, the full set's and the portable set's figures (None: not run), the
    portable/full KLD ratio, and the probes the portable cell had lent."""
    out: dict[str, Any] = {}
    for s in sizes:
        got = {m: cells.get(key("offgrid-s0", f, m, s, chunks)) for m, f in
               (("preset+imatrix", Fold(None)), (FULL, fold), (PORTABLE, fold))}
        row: dict[str, Any] = {m: ({k: r.get(k) for k in KEEP} if r else None) for m, r in got.items()}
        full, port = got[FULL], got[PORTABLE]
        row["portable_over_full"] = port["kld_mean"] / full["kld_mean"] if full and port else None
        g = (port or {}).get("kld_groups") or {}
        row["portable_probes"] = {"evaluations": g.get("evaluations"), "lent": g.get("lent")} if g else None
        out[s] = row
    return out


def markdown(data: dict[str, dict[str, Any]], fold: Fold, chunks: int) -> str:
    lines = [
        "# The portable type set's cost (written by `bench/studies/portable.py`)",
        "",
        f"Off-grid bases, calibration `calib/bench.toml`, {fold.tag}, held-out `wikitext2-test` chunks "
        f"0–{chunks - 1} × 512. Full: the measured greedy over the default candidate set (K-quants, IQ4_XS, "
        "IQ4_NL, legacy types); portable: the same measurement over the K-quants and legacy types only "
        "(`--types portable`), at the same whole-file size. KLD: mean ± stderr, p99, p99.9.",
        "",
        "| model | size | preset + imatrix KLD | full: KLD | p99 | p99.9 | portable: KLD | p99 | p99.9 | "
        "portable / full | portable / preset | probes (lent) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, sizes in data.items():
        for size, row in sizes.items():
            pre, full, port = row["preset+imatrix"], row[FULL], row[PORTABLE]

            def k(r: dict[str, Any] | None) -> list[str]:
                if r is None:
                    return ["-", "-", "-"]
                return [f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f}", dash(r.get("kld_p99"), ".3f"),
                        dash(r.get("kld_p999"), ".3f")]

            probes = row["portable_probes"]
            cols = [model, size, dash(pre and pre["kld_mean"], ".4f"), *k(full), *k(port),
                    dash(row["portable_over_full"], ".3f"),
                    dash(port and pre and port["kld_mean"] / pre["kld_mean"], ".3f"),
                    f"{probes['evaluations']} ({probes['lent']})" if probes else "-"]
            lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "Probes: the portable cell's group-probe evaluations, and how many of them the full set's "
              "probes of the same files lent (no new evaluation).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=list(MODELS))
    ap.add_argument("--sizes", default=",".join(SIZES), help="presets whose whole-file size is each target")
    ap.add_argument("--fold", default="on", help="folding of both methods' cells: off, on or pX")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--recipe", default=str(ROOT / "calib" / "bench.toml"))
    ap.add_argument("--table", action="store_true", help="write the summary from the stored cells only")
    add_executor_args(ap)
    a = ap.parse_args()
    sizes, fold = a.sizes.split(","), Fold.parse(a.fold)
    data = {}
    for model in a.models:
        if not a.table:
            run(model, sizes, fold, a.chunks, a.recipe, a)
        p = RESULTS / f"{model}.json"
        cells = json.loads(p.read_text())["cells"] if p.is_file() else {}
        data[model] = summary(cells, sizes, fold, a.chunks)
    md = markdown(data, fold, a.chunks)
    for name, text in (("portable.json", json.dumps(data, indent=1)), ("portable.md", md)):
        with atomic_path(BENCH / "results" / name, force=True) as tmp:
            tmp.write_text(text)
    print(md)


if __name__ == "__main__":
    main()
