"""What each role received: the tensor types per role (the expert tensors' among them) of the allocators'
cells in `bench/results/<model>.json`, beside each group's measured damage per byte.

Cells written before the harness kept its allocation (`alloc_cell`'s `allocation`, `types_by_role`) are filled
in here by recomputing the allocation from what the cell was made of: the same base, folding, proxy
sensitivity and (for the measured methods) the group probes kept beside the tensor cache, so nothing is
evaluated again; a recomputed allocation is stored only when its type counts equal the cell's `types` (else
the line says so and the cell is left as it is).

    .venv/bin/python -m bench.studies.roles smollm2-moe            # fill in, then write the table
    .venv/bin/python -m bench.studies.roles smollm2-moe --table    # only the table

Writes `bench/results/roles-<model>.md`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from bench.compare import Fold, Results, allocation, by_role, log, prepare
from bench.models import MODELS
from bench.paths import BENCH, ROOT
from ramp_cpp.store.atomic import atomic_path

METHODS = ("uniform", "greedy", "greedy-measured")


def target_of(cells: dict[str, Any], base: str, size: str, chunks: int) -> int | None:
    """A size's target: the whole-file bytes of the unfolded preset + imatrix on the same base (bench.run)."""
    row = cells.get(f"{base}|nofold|preset+imatrix|{size}|{chunks}")
    return None if row is None else int(row["file_bytes"])


def fill(model: str, recipe: str) -> None:
    """Recompute and store the allocation of every allocator cell of the off-grid base that lacks one."""
    res = Results(model)
    b = prepare(model, "offgrid", 0, recipe)
    for key, row in sorted(res.data["cells"].items()):
        base, tag, method, size, chunks = key.split("|")
        if base != "offgrid-s0" or method not in METHODS or "allocation" in row:
            continue
        target = target_of(res.data["cells"], base, size, int(chunks))
        if target is None:
            log(f"{key}: no preset + imatrix cell at {size}: its target is unknown, skipped")
            continue
        fold = Fold.parse({"nofold": "off", "fold": "on"}.get(tag) or tag.removeprefix("fold-"))
        choice, _, _ = allocation(b, method, target, fold)
        got = dict(sorted(Counter(t.name for t in choice.values()).items()))
        if got != row.get("types"):
            log(f"{key}: recomputed types {got} differ from the cell's {row.get('types')}: not stored")
            continue
        kept = {"types_by_role": by_role(choice), "allocation": {n: t.name for n, t in choice.items()}}
        res.put(key, {**row, **kept})
        log(f"{key}: allocation recomputed (types equal the cell's)")


def damage_per_byte(row: dict[str, Any]) -> dict[str, float]:
    """Each role's largest measured group ratio (KLD per proxy unit), from the cell's group probes."""
    out: dict[str, float] = {}
    for g in (row.get("kld_groups") or {}).get("groups", []):
        out[g["role"]] = max(out.get(g["role"], 0.0), float(g["ratio"]))
    return out


def table(model: str) -> str:
    cells = Results(model).data["cells"]
    lines = [f"# What each role received: {model} (written by `bench/studies/roles.py`)", "",
             "Tensor counts per type, per role, of each allocator cell (off-grid base, held-out KLD as in "
             "the benchmark's table). `ratio`: the role's largest measured group ratio (KLD on the reward "
             "chunks per proxy unit): how much the probes found the proxy under- or over-rates it.", ""]
    for key, row in sorted(cells.items()):
        base, tag, method, size, _ = key.split("|")
        if base != "offgrid-s0" or method not in METHODS or "types_by_role" not in row:
            continue
        ratio = damage_per_byte(row)
        head = f"## {method} ({tag}) at {size}'s size: KLD {row['kld_mean']:.4f}, {row['mib']:.2f} MiB"
        lines += [head, "",
                  "| role | tensors | types | ratio |", "|---|---|---|---|"]
        for role, types in sorted(row["types_by_role"].items()):
            mix = ", ".join(f"{t} {n}" for t, n in types.items())
            r = f"{ratio[role]:.3g}" if role in ratio else "-"
            lines.append(f"| {role} | {sum(types.values())} | {mix} | {r} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=list(MODELS))
    ap.add_argument("--recipe", default=str(ROOT / "calib" / "bench.toml"))
    ap.add_argument("--table", action="store_true", help="write the table from the stored cells only")
    a = ap.parse_args()
    for m in a.models:
        if not a.table:
            fill(m, a.recipe)
        with atomic_path(BENCH / "results" / f"roles-{m}.md", force=True) as tmp:
            tmp.write_text(table(m))


if __name__ == "__main__":
    main()
