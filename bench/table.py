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
ORDER = {
    "preset+imatrix": 0, "uniform": 1, "greedy": 2, "greedy-measured": 3, "sac": 4, "transfer-smollm2": 5,
}


def rows(data: dict[str, Any], base: str, chunks: int) -> dict[str, list[tuple[str, bool, dict[str, Any]]]]:
    """size preset -> [(method, folded, row)] for one base and chunk count."""
    out: dict[str, list[tuple[str, bool, dict[str, Any]]]] = {}
    for cell, r in data["cells"].items():
        b, fold, method, size, n = cell.split("|")
        if b != base or int(n) != chunks or method not in ORDER:  # SAC variants: sac_table
            continue
        out.setdefault(size, []).append((method, fold == "fold", r))
    for v in out.values():
        v.sort(key=lambda x: (x[1], ORDER.get(x[0], 9), x[0]))
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
                f"{_f(r.get('bpw_searched'), '.3f')} | {r['ppl']:.3f} | "
                f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
                f"{r['same_top_pct']:.1f} | {ratio} |"
            )
    base_ppl = next(iter(data["cells"].values()))["base_ppl"]
    lines.append(f"\nBase PPL {base_ppl:.3f}. Commands: " + "; ".join(f"`{c}`" for c in data["commands"]))
    return "\n".join(lines)


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def sac_table(model: str, base: str, chunks: int) -> str:
    """Every SAC cell next to the measured greedy of the same base, size and folding: held-out KLD of the
    search's result and of its final policy's mean action, the reward KLDs the search saw, evaluations to
    beat greedy on the reward chunks, wall time and the cost split of an episode."""
    data = json.loads((HERE / "results" / f"{model}.json").read_text())
    cells = data["cells"]
    lines = [
        "| size | run | evals | wall min | held-out KLD: greedy | SAC | SAC / greedy | final policy | "
        "reward KLD: greedy | SAC | policy | evals to beat greedy | s/eval | s/update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, r in sorted(cells.items()):
        b, fold, method, size, n = cell.split("|")
        if b != base or int(n) != chunks or not method.startswith("sac"):
            continue
        g = cells.get(f"{b}|{fold}|greedy-measured|{size}|{n}")
        gk = g["kld_mean"] if g else None
        lines.append(
            f"| {size} | {method}{' (folded)' if fold == 'fold' else ''} | {r['evaluations']} | "
            f"{r['t_search'] / 60:.1f} | {_f(gk, '.4f')} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
            f"{_f(r['kld_mean'] / gk if gk else None, '.3f')} | {r['policy']['kld_mean']:.4f} | "
            f"{r['reward_kld_greedy']:.4f} | {r['reward_kld']:.4f} | {r['reward_kld_policy']:.4f} | "
            f"{_f(r['evals_to_beat_greedy'], 'd')} | {r['t_eval_mean']:.1f} | {r['t_update_mean']:.2f} |"
        )
    return "\n".join(lines)


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected between measured floats)."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def groups_table(model: str, cell: str) -> str:
    """The group calibration of one measured cell: proxy-predicted vs measured ΔKLD per group, their ratio,
    the rank correlation between the two, and the pairs' additivity."""
    data = json.loads((HERE / "results" / f"{model}.json").read_text())
    g = data["cells"][cell]["kld_groups"]
    lines = [
        f"\n{model}: group calibration of `{cell}` ({g['evaluations']} evaluations, {g['seconds']:.0f} s; "
        f"reference KLD {g['reference_kld']:.4f})\n",
        "| group | tensors | Δproxy (predicted) | ΔKLD (measured) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(g["groups"], key=lambda r: -r["ratio"]):
        lines.append(
            f"| {r['name']} | {len(r['tensors'])} | {r['predicted']:.4g} | {r['measured']:.4g} | "
            f"{r['ratio']:.3g}{' (floored)' if r['floored'] else ''} |"
        )
    pred = [r["predicted"] for r in g["groups"]]
    meas = [r["measured"] for r in g["groups"]]
    ratios = [r["ratio"] for r in g["groups"]]
    lines.append(
        f"\nRank correlation (Spearman) of predicted Δproxy and measured ΔKLD over {len(pred)} groups: "
        f"{spearman(pred, meas):.3f}; measured/predicted spans {max(ratios) / min(ratios):.0f}×."
    )
    for p in g["pairs"]:
        lines.append(
            f"- pair {' + '.join(p['groups'])}: ΔKLD {p['increment']:.4f} vs sum of singles "
            f"{p['sum_of_singles']:.4f} ({100 * p['relative_error']:+.1f}%)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--base", default="offgrid-s0")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--groups", help="print the group calibration of this cell instead")
    ap.add_argument("--sac", action="store_true", help="print the SAC runs against greedy instead")
    a = ap.parse_args()
    if a.sac:
        print(sac_table(a.model, a.base, a.chunks))
    else:
        print(groups_table(a.model, a.groups) if a.groups else table(a.model, a.base, a.chunks))


if __name__ == "__main__":
    main()
