"""Rewrite the README's results block (between `<!-- results:begin -->` and `<!-- results:end -->`) from
bench/results/*.json through bench/table.py, with the prose of bench/summary.md on top: no table by hand.

    .venv/bin/python bench/readme.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import HERE, groups_table, sac_table, table  # noqa: E402

README = HERE.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GROUPS = "offgrid-s0|nofold|greedy-measured|Q4_K_M|16"
GROUPS_HEAD = (
    "Group calibration of the measured sensitivity (unfolded, reward text `wikitext2-valid`, 4 chunks):"
)
DEQUANT = {
    "smollm2": "The same protocol on the **dequantized** base (on the Q4_1 grid), for contrast: the "
    "allocators re-emit the source's Q4_1 and look far better than they would on a real checkpoint.",
    "qwen0.5b": "Dequantized base (on the Q4_K_M grid):",
    "gemma270m": "Dequantized base (on the Q4_K_M grid):",
}
MODELS = (
    ("smollm2", "SmolLM2-135M (demo model)", GROUPS),
    ("qwen0.5b", "Qwen2.5-Coder-0.5B", None),
    ("gemma270m", "Gemma-3-270M", None),
)
INTRO = (
    "Every table below is printed by `bench/table.py` from `bench/results/<model>.json` (this block by "
    "`bench/readme.py`); the commands that made the cells are listed under each. `greedy` is the knapsack on "
    "the proxy alone (`--sensitivity proxy`), `greedy-measured` on the measured sensitivity (the default of "
    "`--method greedy`), `sac` the SAC search warm-started from it (150 evaluations), `transfer-smollm2` "
    "SmolLM2's SAC policy applied zero-shot. KLD / preset is relative to the preset + imatrix on the "
    "unfolded model."
)


def has_base(model: str, base: str) -> bool:
    cells = json.loads((HERE / "results" / f"{model}.json").read_text())["cells"]
    return any(c.startswith(base + "|") for c in cells)


def block() -> str:
    parts = ["### Results", "", INTRO, "", (HERE / "summary.md").read_text().strip()]
    for key, title, groups in MODELS:
        parts += ["", f"#### {title}", table(key, "offgrid-s0", 16)]
        if has_base(key, "dequant-s0"):
            parts += ["", DEQUANT[key], table(key, "dequant-s0", 16)]
        if groups:
            parts += ["", GROUPS_HEAD, groups_table(key, groups)]
        if key == "smollm2":
            head = "SAC against the measured greedy it starts from (same base, size, folding, cache):"
            parts += ["", head, "", sac_table(key, "offgrid-s0", 16)]
    return "\n".join(parts)


def main() -> None:
    text = README.read_text()
    i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:i] + "\n" + block() + "\n" + text[j:])


if __name__ == "__main__":
    main()
