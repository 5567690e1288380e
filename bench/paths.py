"""Where the benchmark keeps its files: the harness sits in bench/, the studies in bench/studies/, and both
write under bench/results/ (kept in git) and bench/out/ (scratch, ignored), so a study names the folder
through `BENCH` rather than through its own location."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
