"""Issue 23's leave-one-out table: per held-out model and size, the held-out KLD of the zero-evaluation
allocators beside the measured greedy and llama.cpp's preset + imatrix, with each one's evaluations on the
target model.

Every row is a cell of `bench/compare.py` (same off-grid base, calibration `calib/bench.toml`, folding and
imatrix; held-out `wikitext2-test` chunks 0–15): run the missing ones first,

    .venv/bin/python -m bench.compare MODEL --bases offgrid --fold on --sizes Q4_K_M,Q3_K_M \\
        --methods greedy,greedy-transferred,greedy-measured,transfer-across
    .venv/bin/python -m bench.studies.transfer            # prints the table, writes bench/results/transfer.md

`greedy-transferred` reads the other two models' measured groups only (bench/ratios.py: leave-one-out);
`transfer-across` is the policy `bench/studies/across.py` trained on the other two (run it first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.paths import BENCH

HERE = BENCH
MODELS = ("smollm2", "qwen0.5b", "gemma270m")
SIZES = ("Q4_K_M", "Q3_K_M")
#: (label, cell method, folding tag, evaluations on the target model: a number, or a cell key to read)
ROWS = (
    ("preset + imatrix (llama.cpp, unfolded)", "preset+imatrix", "nofold", 0),
    ("uniform", "uniform", "fold", 0),
    ("proxy greedy", "greedy", "fold", 0),
    ("transferred-ratio greedy (leave-one-out)", "greedy-transferred", "fold", 0),
    ("zero-evaluation policy (SAC across the other two)", "transfer-across", "fold", 0),
    ("measured greedy", "greedy-measured", "fold", "kld_groups"),
)


def cell(cells: dict[str, Any], base: str, method: str, fold: str, size: str) -> dict[str, Any] | None:
    return cells.get(f"{base}|{fold}|{method}|{size}|16")


def table(
    results: Path = HERE / "results", base: str = "offgrid-s0", models: tuple[str, ...] = MODELS
) -> str:
    lines = [
        f"# Zero-evaluation allocators, leave-one-out, base `{base}` (written by "
        "`bench/studies/transfer.py`)",
        "",
        "Held-out `wikitext2-test` chunks 0–15 × 512, off-grid bases, calibration `calib/bench.toml`, folded "
        "(but the preset row: llama.cpp as users run it). Evaluations: forward passes over the reward chunks "
        "on the target model before its file is written (the fold decision not counted: every row folds). "
        "The zero-evaluation policy is `bench/studies/across.py`'s, trained without the model of its row.",
        "",
        "| model | size | method | MiB | mean KLD | × measured greedy | × proxy greedy | evaluations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in models:
        cells = json.loads((results / f"{key}.json").read_text())["cells"]
        for size in SIZES:
            got = {label: cell(cells, base, m, f, size) for label, m, f, _ in ROWS}
            ref = got["measured greedy"]
            proxy = got["proxy greedy"]
            for label, _, _, ev in ROWS:
                r = got[label]
                if r is None:
                    lines.append(f"| {key} | {size} | {label} | - | (not run) | - | - | - |")
                    continue
                n = r[ev]["evaluations"] if isinstance(ev, str) else ev
                rel = lambda o, r=r: f"{r['kld_mean'] / o['kld_mean']:.2f}×" if o else "-"  # noqa: E731
                lines.append(
                    f"| {key} | {size} | {label} | {r['mib']:.2f} | {r['kld_mean']:.4f} ± "
                    f"{r['kld_stderr']:.4f} | {rel(ref)} | {rel(proxy)} | {n} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--base", default="offgrid-s0", help="offgrid-s0, or permuted-s0 (issue 23 item 5)")
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    md = table(Path(a.results), a.base, tuple(a.models.split(",")))
    print(md)
    name = "transfer.md" if a.base == "offgrid-s0" else f"transfer.{a.base}.md"
    (Path(a.results) / name).write_text(md)


if __name__ == "__main__":
    main()
