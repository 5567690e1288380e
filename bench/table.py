"""Markdown tables from bench/results/<model>.json (written by bench/compare.py): no figure typed by hand.

    .venv/bin/python bench/table.py smollm2 [--base offgrid] [--chunks 16]

One table per target size: each row a method (preset + imatrix, uniform, greedy), unfolded and folded, with
file MiB, bpw over the file and over the searched linears, PPL, mean KLD ± stderr, same-top %, and KLD as a
ratio of the preset + imatrix on the unfolded model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = {"preset+imatrix": 0, "uniform": 1, "greedy": 2, "greedy-measured": 3, "sac": 4}


def rows(data: dict[str, Any], base: str, chunks: int) -> dict[str, list[tuple[str, bool, dict[str, Any]]]]:
    """size preset -> [(method, folded, row)] for one base and chunk count."""
    out: dict[str, list[tuple[str, bool, dict[str, Any]]]] = {}
    for cell, r in data["cells"].items():
        b, fold, method, size, n = cell.split("|")
        if b != base or int(n) != chunks:
            continue
        out.setdefault(size, []).append((method, fold == "fold", r))
    for v in out.values():
        v.sort(key=lambda x: (x[1], ORDER.get(x[0], 9)))
    return out


def table(model: str, base: str, chunks: int) -> str:
    data = json.loads((HERE / "results" / f"{model}.json").read_text())
    lines = []
    for size, rs in sorted(rows(data, base, chunks).items(), key=lambda kv: -kv[1][0][2]["file_bytes"]):
        ref = next((r for m, f, r in rs if m == "preset+imatrix" and not f), None)
        where = f"{size}'s whole-file size ({chunks} chunks of wikitext2-test)"
        lines.append(f"\n{model}, {base} base, at {where}\n")
        lines.append(
            "| method | folded | MiB | bpw file | bpw linears | PPL | mean KLD | same top % | KLD / preset |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m, f, r in rs:
            label = f"{size} + imatrix" if m == "preset+imatrix" else m
            ratio = f"{r['kld_mean'] / ref['kld_mean']:.2f}×" if ref else "-"
            lines.append(
                f"| {label} | {'yes' if f else 'no'} | {r['mib']:.2f} | {r['bpw_file']:.3f} | "
                f"{r['bpw_searched']:.3f} | {r['ppl']:.3f} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
                f"{r['same_top_pct']:.1f} | {ratio} |"
            )
    base_ppl = next(iter(data["cells"].values()))["base_ppl"]
    lines.append(f"\nBase PPL {base_ppl:.3f}. Commands: " + "; ".join(f"`{c}`" for c in data["commands"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--base", default="offgrid-s0")
    ap.add_argument("--chunks", type=int, default=16)
    a = ap.parse_args()
    print(table(a.model, a.base, a.chunks))


if __name__ == "__main__":
    main()
