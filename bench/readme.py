"""Rewrite, from bench/results/*.json, every results table the documentation shows: no table by hand.

- `docs/results.md`, between `<!-- results:begin -->` and `<!-- results:end -->`: every results table, with
  the prose of bench/summary.md on top (links made relative to docs/);
- `README.md`, between `<!-- headline:begin -->` and `<!-- headline:end -->`: the table at Q4_K_M's
  whole-file size and one line of SAC against greedy;
- every model's `bench/results/<model>.md` / `.png` (unless `--no-reports`).

    .venv/bin/python -m bench.readme [--no-reports]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from bench.compare import Fold
from bench.depth import SETTINGS as TRANSFER
from bench.run import _longest_sac, report
from bench.table import HERE, calibration_table, fold_choice, sac_table

README = HERE.parent / "README.md"
RESULTS = HERE.parent / "docs" / "results.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"
SUMMARY_TITLE = (
    "**At Q4_K_M's whole-file size** (KLD, and its ratio to Q4_K_M + imatrix on the unfolded model):"
)
MODELS = (
    ("smollm2", "SmolLM2-135M (demo)"),
    ("qwen0.5b", "Qwen2.5-Coder-0.5B"),
    ("gemma270m", "Gemma-3-270M"),
)
INTRO = (
    "Every table below is printed by `bench/readme.py` from `bench/results/<model>.json` (the cells of "
    "`bench/compare.py` / `bench/run.py`, with the commands that made them); each model's file "
    "`bench/results/<model>.md` has every cell, its Pareto plot and its commands. Off-grid bases, "
    "held-out `wikitext2-test` chunks 0–15 of 512, mean KLD against the F16 base ± its standard error. "
    "`greedy` is the knapsack on the measured sensitivity (the default of `--method greedy`), "
    "`greedy (proxy)` on the proxy alone, `SAC` the search warm-started from greedy (150 evaluations where "
    "not stated), `transfer` SmolLM2's SAC policy applied zero-shot (no search; rolled out on the model's "
    "measured sensitivity, for which its group probes ran first)."
)
ROWS = (
    ("Q4_K_M", "nofold", "preset"),
    ("Q4_K_M + imatrix", "nofold", "preset+imatrix"),
    ("uniform", None, "uniform"),
    ("greedy (proxy)", None, "greedy"),
    ("greedy", None, "greedy-measured"),
    ("SAC", None, "sac"),
    ("transfer", None, "transfer-smollm2"),
)


def cells_of(model: str) -> dict[str, Any]:
    return json.loads((HERE / "results" / f"{model}.json").read_text())["cells"]


def fold_tag(model: str, size: str, cells: dict[str, Any]) -> str:
    """The folding of a model's allocator rows: `--fold auto`'s choice where measured, else folded when its
    cells exist."""
    auto, _ = fold_choice(model, size, cells)
    if auto is not None:
        return "fold" if auto else "nofold"
    folded = any(c.startswith(f"offgrid-s0|fold|greedy-measured|{size}|") for c in cells)
    return "fold" if folded else "nofold"


def summary_table(size: str = "Q4_K_M") -> str:
    """Per model at one whole-file size: every method's KLD and its ratio to the preset + imatrix."""
    head = [label for label, _, _ in ROWS]
    lines = [f"| model (folding of the allocators) | {' | '.join(head)} |", "|---" * (len(head) + 1) + "|"]
    for key, title in MODELS:
        cells = cells_of(key)
        tag = fold_tag(key, size, cells)
        ref = cells.get(f"offgrid-s0|nofold|preset+imatrix|{size}|16")
        row = [f"{title} ({'folded' if tag == 'fold' else 'unfolded'})"]
        for _, fixed, method in ROWS:
            r = (_longest_sac(cells, Fold(None if tag == "nofold" else 0.5), size, 16) if method == "sac"
                 else cells.get(f"offgrid-s0|{fixed or tag}|{method}|{size}|16"))
            if r is None:
                row.append("-")
                continue
            ratio = f" ({r['kld_mean'] / ref['kld_mean']:.2f}×)" if ref else ""
            n = r.get("evaluations")
            extra = f", {n} evaluation{'s' * (n != 1)}" if method == "sac" and n != 150 else ""
            row.append(f"{r['kld_mean']:.4f}{ratio}{extra}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def smallest_table(ref_size: str = "Q4_K_M") -> str:
    """Per model: the smallest greedy file and the smallest SAC file whose KLD is at or below the preset +
    imatrix's at `ref_size` (at the folding of each size's allocator rows)."""
    kinds = (("greedy", lambda m: m == "greedy-measured"), ("SAC", lambda m: m.split("-")[0] == "sac"))
    lines = [f"| model | {ref_size} + imatrix | " + " | ".join(
        f"smallest {k} file at or below its KLD" for k, _ in kinds) + " |", "|---|---|---|---|"]
    for key, title in MODELS:
        cells = cells_of(key)
        ref = cells.get(f"offgrid-s0|nofold|preset+imatrix|{ref_size}|16")
        if ref is None:
            continue
        row = [title, f"{ref['mib']:.2f} MiB, {ref['kld_mean']:.4f}"]
        for _, ours in kinds:
            best = None
            for c, r in cells.items():
                b, tag, method, size, n = c.split("|")
                if b != "offgrid-s0" or n != "16" or tag != fold_tag(key, size, cells) or not ours(method):
                    continue
                if r["kld_mean"] <= ref["kld_mean"] and (best is None or r["mib"] < best[1]["mib"]):
                    best = (f"{method} at {size}'s size", r)
            if best is None:
                row.append("none among the sizes run")
                continue
            label, r = best
            row.append(f"{r['mib']:.2f} MiB ({100 * (r['mib'] / ref['mib'] - 1):+.1f}%), {r['kld_mean']:.4f} "
                       f"({label})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def transfer_table() -> str:
    """Tables 13/15/16 in spirit: SmolLM2's SAC policy applied zero-shot to each model, next to the direct
    search, greedy and uniform on that model at the same size and folding (`depth.SETTINGS`: where the
    budget binds)."""
    cols = (("preset + imatrix", "nofold", "preset+imatrix"), ("uniform", None, "uniform"),
            ("greedy", None, "greedy-measured"), ("direct SAC", None, "sac"),
            ("transfer", None, "transfer-smollm2"))
    lines = ["| model | size (folding) | " + " | ".join(c for c, _, _ in cols) + " | transfer / greedy |",
             "|---" * (len(cols) + 3) + "|"]
    for key, title in MODELS:
        fold, size, _ = TRANSFER[key]
        cells = cells_of(key)
        tag = "fold" if fold == "on" else "nofold"
        got: dict[str, Any] = {}
        row = [title, f"{size} ({'folded' if fold == 'on' else 'unfolded'})"]
        for label, fixed, method in cols:
            r = (_longest_sac(cells, Fold.parse(fold), size, 16) if method == "sac"
                 else cells.get(f"offgrid-s0|{fixed or tag}|{method}|{size}|16"))
            got[label] = r
            if r is None:
                row.append("- (trained here)" if key == "smollm2" and method.startswith("transfer") else "-")
                continue
            se = f" ± {r['kld_stderr']:.4f}" if method in ("sac", "transfer-smollm2") else ""
            ev = f", {r['evaluations']} evals" if method == "sac" else ""
            row.append(f"{r['kld_mean']:.4f}{se}{ev}")
        t, g = got["transfer"], got["greedy"]
        row.append(f"{t['kld_mean'] / g['kld_mean']:.2f}×" if t and g else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sac_ratios() -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """Every plain SAC run (`sac`, `sac-eN`: no ablation variant) of every model with a measured greedy at the
    same size and folding: (model title, size, fold tag, SAC cell, greedy cell)."""
    out = []
    for key, title in MODELS:
        cells = cells_of(key)
        for c, r in sorted(cells.items()):
            b, tag, method, size, n = c.split("|")
            if b != "offgrid-s0" or n != "16" or not re.fullmatch(r"sac(-e\d+)?", method):
                continue
            g = cells.get(f"{b}|{tag}|greedy-measured|{size}|{n}")
            if g is not None:
                out.append((title, size, tag, r, g))
    return out


def sac_ratio_table() -> str:
    """Every plain SAC run of every model as a multiple of the measured greedy it starts from, held out: its
    result and its final policy's mean-action rollout."""
    lines = ["| model | size (folding) | evaluations | SAC / greedy | final policy / greedy |",
             "|---|---|---|---|---|"]
    for title, size, tag, r, g in sac_ratios():
        lines.append(
            f"| {title} | {size} ({'folded' if tag == 'fold' else 'unfolded'}) | {r['evaluations']} | "
            f"{r['kld_mean'] / g['kld_mean']:.3f}× | {r['policy']['kld_mean'] / g['kld_mean']:.3f}× |"
        )
    return "\n".join(lines)


def sac_line() -> str:
    """One line for the README: the range of SAC / greedy over every plain SAC run (as `sac_ratio_table`
    rounds it)."""
    runs = sac_ratios()
    ratios = [r["kld_mean"] / g["kld_mean"] for _, _, _, r, g in runs]
    models = len({title for title, *_ in runs})
    return (f"**SAC against greedy**: over every plain SAC run ({len(runs)} runs on {models} models), the "
            f"held-out KLD of SAC's file is {min(ratios):.3f}× to {max(ratios):.3f}× that of the greedy "
            "allocation it is warm-started from.")


def sac_tables() -> list[str]:
    """`table.sac_table` of every model with a SAC cell, one after the other."""
    out: list[str] = []
    for key, title in MODELS:
        if any(c.split("|")[2].startswith("sac") for c in cells_of(key)):
            out += [f"*{title}*", "", sac_table(key, "offgrid-s0", 16), ""]
    return out


def relink(text: str, prefix: str) -> str:
    """Markdown links relative to the repository root made relative to a folder `prefix` (e.g. "../"): every
    `](path)` that is not a URL, an anchor or absolute."""
    return re.sub(r"\]\((?!https?:|#|/)", f"]({prefix}", text)


def headline() -> str:
    """The README's headline: the table at Q4_K_M's whole-file size and SAC against greedy in one line."""
    return "\n".join([SUMMARY_TITLE, "", summary_table(), "", sac_line()])


def block() -> str:
    """Every results table, links relative to the repository root (`relink` for another folder)."""
    links = ", ".join(
        f"[{k}](bench/results/{k}.md)" for k, _ in MODELS if (HERE / "results" / f"{k}.md").is_file()
    )
    parts = [
        INTRO, "", (HERE / "summary.md").read_text().strip(), "",
        SUMMARY_TITLE, "",
        summary_table(), "",
        "**SAC against the greedy it starts from**, held out (every plain SAC run; all runs below):", "",
        sac_ratio_table(), "",
        "**The smallest file that matches Q4_K_M + imatrix** (among the sizes run):", "",
        smallest_table(), "",
        "**Proxy vs calibrated greedy, folded or not** (issue 14; bold: `--fold auto`'s choice):", "",
        calibration_table([k for k, _ in MODELS]), "",
        "**Every SAC run in detail** (same calibration, folding, imatrix and tensor cache as its greedy):",
        "", *sac_tables(),
        "**Transfer**: SmolLM2's SAC policy (Q4_K_M) applied zero-shot (no search; rolled out on each "
        "model's measured sensitivity, for which its group probes ran first), against the direct search on "
        "each model (Gemma at Q2_K's size: at Q4_K_M's every searched tensor already fits at Q8_0). Where "
        "the bits go along depth in each: [bench/results/depth.md](bench/results/depth.md).", "",
        transfer_table(), "",
        f"Per model, every cell, plot and command: {links}. Downstream accuracy: "
        "[bench/results/downstream.md](bench/results/downstream.md); llama.cpp's own tools as referee: "
        "[bench/results/referee.md](bench/results/referee.md); `--fold auto` against held-out text: "
        "[bench/results/smollm2.fold.md](bench/results/smollm2.fold.md).",
    ]
    return "\n".join(parts)


def write_between(path: Path, begin: str, end: str, content: str) -> None:
    """Replace what stands between the markers `begin` and `end` in `path` (both must be there)."""
    text = path.read_text()
    i, j = text.index(begin) + len(begin), text.index(end)
    path.write_text(text[:i] + "\n" + content + "\n" + text[j:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-reports", action="store_true",
                    help="only docs/results.md and the README's headline, not bench/results/<model>.md/.png")
    args = ap.parse_args()
    if not args.no_reports:
        for key, _ in MODELS:
            fold = "on" if fold_tag(key, "Q4_K_M", cells_of(key)) == "fold" else "off"
            report(key, Fold.parse(fold), 150, 16)
    write_between(RESULTS, BEGIN, END, relink(block(), "../"))
    write_between(README, HEADLINE_BEGIN, HEADLINE_END, headline())


if __name__ == "__main__":
    main()
