"""Issue 37 item 3: what the calibration's size (16, 32, 64 windows of 512 tokens of wikitext2-valid) and text
(`mixed-code-prose`: wikitext2-valid articles and Python sources, 16 × 512) change in the imatrix-weighted
error and the held-out KLD, at Q4_K_M's and Q3_K_M's whole-file sizes.

Recipes `calib/bench.toml` (the benchmark's), `bench-32`, `bench-64`, `bench-mixed`. Per recipe, on the
off-grid base, `bench/compare.py` cells of the benchmark's protocol (held-out `wikitext2-test` chunks 0–15 of
512 against the unfolded base):

- `preset + imatrix` (unfolded): llama.cpp's preset with the recipe's own imatrix;
- `greedy-measured` with the recipe's folding (`--fold`, default on: the folded copy made from the recipe's
  own scales), its own proxy, tensor cache and group probes (on the reward chunks of wikitext2-valid).

Every row is at one size per preset: the target is the whole-file bytes of the *default* recipe's preset +
imatrix cell (an imatrix changes no tensor type of a preset, so each recipe's own preset file has the same
bytes; the study does not rely on it). The default recipe's cells are `bench/results/<model>.json`'s, reused
as they are; another recipe's go to `bench/results/calib-<recipe>/<model>.json`, and its calibration, folded
copies and tensor cache to `bench/out/<model>/offgrid-s0/recipe-<recipe>/` (`compare.prepare`).

Per greedy cell the row keeps `proxy_error`, the imatrix-weighted error sum Σ E‖(W − Ŵ)x‖² of the chosen
allocation under the recipe's *own* calibration (on its own folded weights): comparable between sizes of
one recipe, not between recipes (another imatrix weighs other columns, another folding moves the error
between tensors); and `predicted_kld`, the group probes' calibrated sum, the KLD above the reference (every
searched tensor at its highest option) on the reward chunks that the measurement predicts: in KLD units, so
comparable across recipes, though each recipe's probes run on its own folded copy. A default
recipe's cell stored before the harness kept them gets them filled in (the allocation recomputed from the
kept measurement and probes, no new evaluation, checked against the cell's type counts). The calibration's
wall time is what `prepare` recorded when it made the calibration ("-" for one made before it did).

    .venv/bin/python -m bench.studies.calibsize smollm2 qwen0.5b                  # runs the missing cells
    .venv/bin/python -m bench.studies.calibsize smollm2 qwen0.5b --table          # only the summary

and writes `bench/results/calibsize.json` and `calibsize.md`. A cell that has not run shows as "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from bench.compare import (
    BENCH_RECIPE,
    Base,
    Cell,
    Fold,
    Results,
    add_executor_args,
    allocation,
    calib_path,
    executor_of,
    fan_out,
    log,
    prepare,
    warm,
)
from bench.models import MODELS
from bench.paths import BENCH
from bench.table import dash
from ramp_cpp.calibration.collect import load_recipe
from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path

RECIPES = (BENCH_RECIPE, "bench-32", "bench-64", "bench-mixed")
SIZES = ("Q4_K_M", "Q3_K_M")
METHOD = "greedy-measured"
PRESET = "preset+imatrix"
KEEP = ("mib", "file_bytes", "kld_mean", "kld_stderr", "kld_p99", "kld_p999", "same_top_pct", "proxy_error",
        "predicted_kld", "reward_kld", "calib_seconds", "calib_text_sha256")


def folder(recipe: str) -> str | None:
    """The recipe's results folder (None: bench/results, the benchmark's own)."""
    return None if recipe == BENCH_RECIPE else str(BENCH / "results" / f"calib-{recipe}")


def key(fold: Fold, method: str, size: str, chunks: int) -> str:
    """A cell's key in a results file (compare.py's: base|fold|method|size|chunks), off-grid base."""
    return f"offgrid-s0|{fold.tag}|{method}|{size}|{chunks}"


def targets(model: str, sizes: list[str], chunks: int, ex: Any) -> dict[str, int]:
    """Each size's target: the default recipe's unfolded preset + imatrix file bytes (run where missing)."""
    res = Results(model)
    rows = {s: res.get(key(Fold(None), PRESET, s, chunks)) for s in sizes}
    missing = [s for s, r in rows.items() if r is None]
    if missing:
        b = prepare(model, "offgrid", 0, BENCH_RECIPE)
        cells = [Cell.of(b, BENCH_RECIPE, "preset", s, 0, Fold(None), chunks) for s in missing]
        rows |= dict(zip(missing, fan_out(ex, cells), strict=True))
    return {s: int(r["file_bytes"]) for s, r in rows.items() if r is not None}


def fill_errors(
    res: Results, b: Base, sizes: list[str], target: dict[str, int], fold: Fold, chunks: int
) -> None:
    """Give the recipe's greedy cells stored without them their proxy_error and predicted_kld: the
    allocation recomputed from the kept measurement and probes, kept only when its types are the cell's."""
    for s in sizes:
        k = key(fold, METHOD, s, chunks)
        row = res.get(k)
        if row is None or "proxy_error" in row:
            continue
        choice, _, extra = allocation(b, METHOD, target[s], fold)
        got = dict(sorted(Counter(t.name for t in choice.values()).items()))
        if got != row.get("types"):
            log(f"{k}: recomputed types {got} differ from the cell's {row.get('types')}: not filled in")
            continue
        res.put(k, {**row, **{f: extra[f] for f in ("proxy_error", "predicted_kld") if f in extra}})


def run(
    model: str, recipes: list[str], sizes: list[str], fold: Fold, chunks: int, a: argparse.Namespace
) -> None:
    ex = executor_of(a)
    try:
        target = targets(model, sizes, chunks, ex)
        for r in recipes:
            res = Results(model, folder(r))
            want = [(PRESET, Fold(None), s) for s in sizes] + [(METHOD, fold, s) for s in sizes]
            missing = [(m, f, s) for m, f, s in want if res.get(key(f, m, s, chunks)) is None]
            greedy = [res.get(key(fold, METHOD, s, chunks)) for s in sizes]
            unfilled = any(row is not None and "proxy_error" not in row for row in greedy)
            # a fill recomputes from the kept measurement and probes: without the calibration the stored
            # cells were made from, it would measure all over again and need not find the cells' types
            kept = calib_path(model, "offgrid", 0, r).is_file()
            if not missing and not (unfilled and kept):
                continue
            res.command(sys.argv[1:], "-m bench.studies.calibsize")
            b = prepare(model, "offgrid", 0, r)
            warm(b, [fold], [METHOD], chunks)
            fan_out(ex, [Cell.of(b, r, "preset", s, 0, f, chunks, folder(r)) if m == PRESET else
                         Cell.of(b, r, m, s, target[s], f, chunks, folder(r)) for m, f, s in missing])
            if kept:
                fill_errors(Results(model, folder(r)), b, sizes, target, fold, chunks)
            elif unfilled:
                log(f"{model}/{r}: no kept calibration, so the stored cells' proxy errors are not filled in")
    finally:
        ex.close()


def stored(model: str, recipe: str) -> dict[str, Any]:
    p = Results(model, folder(recipe)).path
    return json.loads(p.read_text())["cells"] if p.is_file() else {}


def summary(cells: dict[str, dict[str, Any]], sizes: list[str], fold: Fold, chunks: int) -> dict[str, Any]:
    """Per recipe (`cells`: recipe -> its results file's cells; the first recipe is the reference): its
    tokens and, per size, its preset + imatrix and greedy figures (None: not run) and their KLD over the
    reference recipe's."""
    ref = next(iter(cells))
    out: dict[str, Any] = {}
    for r, cs in cells.items():
        cfg = load_recipe(r)
        got: dict[str, Any] = {"text": cfg.text, "samples": cfg.samples, "ctx": cfg.ctx,
                               "tokens": cfg.samples * cfg.ctx, "sizes": {}}
        for s in sizes:
            row: dict[str, Any] = {}
            for m, f in ((PRESET, Fold(None)), (METHOD, fold)):
                c, c0 = cs.get(key(f, m, s, chunks)), cells[ref].get(key(f, m, s, chunks))
                row[m] = {k: c.get(k) for k in KEEP} if c else None
                row[f"{m}_over_{ref}"] = c["kld_mean"] / c0["kld_mean"] if c and c0 else None
            got["sizes"][s] = row
        out[r] = got
    return out


def markdown(data: dict[str, dict[str, Any]], fold: Fold, chunks: int) -> str:
    ref = BENCH_RECIPE
    lines = [
        "# Calibration size and text (written by `bench/studies/calibsize.py`)",
        "",
        f"Off-grid bases, held-out `wikitext2-test` chunks 0–{chunks - 1} × 512; each recipe's own "
        f"calibration, imatrix, folding ({fold.tag} for the greedy) and group probes; every file at the size "
        f"of the `{ref}` recipe's preset + imatrix. KLD: mean ± stderr and p99; ratios: KLD over the `{ref}` "
        "recipe's at the same size. Proxy error: Σ E‖(W − Ŵ)x‖² of the allocation under the recipe's own "
        "imatrix, comparable only within a recipe; predicted KLD: the group probes' estimate on the reward "
        "chunks (KLD units, comparable across recipes).",
        "",
        "| model | recipe | tokens | size | MiB | preset + imatrix KLD | / " + ref + " | greedy KLD | p99 | "
        "/ " + ref + " | proxy error | predicted KLD | calibration s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, recipes in data.items():
        for r, got in recipes.items():
            for s, row in got["sizes"].items():
                pre, g = row[PRESET], row[METHOD]
                secs = next((x["calib_seconds"] for x in (pre, g) if x and x.get("calib_seconds")), None)
                cols = [
                    model, r, f"{got['tokens']:,}", s, dash((g or pre or {}).get("mib"), ".2f"),
                    dash(pre and pre["kld_mean"], ".4f"), dash(row[f"{PRESET}_over_{ref}"], ".3f"),
                    f"{g['kld_mean']:.4f} ± {g['kld_stderr']:.4f}" if g else "-",
                    dash(g and g.get("kld_p99"), ".3f"), dash(row[f"{METHOD}_over_{ref}"], ".3f"),
                    dash(g and g.get("proxy_error"), ".4g"), dash(g and g.get("predicted_kld"), ".4f"),
                    dash(secs, ".0f"),
                ]
                lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "Calibration s: the wall time of the recipe's calibration where `bench.compare.prepare` "
              "made and timed it (\"-\": made before it recorded the time).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=list(MODELS))
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help=f"calib/ recipe names, comma-separated; {BENCH_RECIPE} (the reference) always runs")
    ap.add_argument("--sizes", default=",".join(SIZES), help="presets whose whole-file size is each target")
    ap.add_argument("--fold", default="on", help="folding of the greedy cells: off, on or pX")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--table", action="store_true", help="write the summary from the stored cells only")
    add_executor_args(ap)
    a = ap.parse_args()
    recipes = [BENCH_RECIPE, *(r for r in a.recipes.split(",") if r and r != BENCH_RECIPE)]
    for r in recipes:
        try:
            load_recipe(r)  # an unknown recipe stops here, before any cell
        except RampError as e:
            raise SystemExit(str(e)) from None
    sizes, fold = a.sizes.split(","), Fold.parse(a.fold)
    data = {}
    for model in a.models:
        if not a.table:
            run(model, recipes, sizes, fold, a.chunks, a)
        data[model] = summary({r: stored(model, r) for r in recipes}, sizes, fold, a.chunks)
    md = markdown(data, fold, a.chunks)
    for name, text in (("calibsize.json", json.dumps(data, indent=1)), ("calibsize.md", md)):
        with atomic_path(BENCH / "results" / name, force=True) as tmp:
            tmp.write_text(text)
    print(md)


if __name__ == "__main__":
    main()
