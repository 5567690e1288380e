"""Write one of a model's benchmark allocations (as `bench/depth.py` rebuilds them from the caches, no
evaluation) as a GGUF assembled by ramp-cpp's tensor cache, for llama.cpp's own tools
(`bench/studies/referee.py`).

    .venv/bin/python -m bench.export qwen0.5b "sac-e40 best" [--out PATH]

The file is the one the benchmark cell evaluated (the cache's bytes are llama.cpp's quantizer's for the
same source, type map and imatrix); default path `bench/out/<model>/offgrid-s0/export/<model>.<label>.gguf`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench.compare import HERE, Fold, prepare, tensor_cache
from bench.depth import SETTINGS, allocations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(SETTINGS))
    ap.add_argument("label", help="an allocation of bench/depth.py, e.g. 'greedy (measured)'")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    a = ap.parse_args()
    from ramp_cpp.measure.tensorcache import assemble

    sens, allocs = allocations(a.model, a.recipe)
    if a.label not in allocs:
        raise SystemExit(f"{a.label!r}: not one of {', '.join(map(repr, allocs))}")
    b = prepare(a.model, "offgrid", 0, a.recipe)
    src, cal = b.model(Fold.parse(SETTINGS[a.model][0]))
    cache = tensor_cache(b, src, cal, sens)
    label = re.sub(r"[^A-Za-z0-9.-]+", "_", a.label).strip("_")
    dst = a.out or b.out / "export" / f"{a.model}.{label}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    r = assemble(cache, allocs[a.label], dst, force=True)
    print(f"{dst} {r.file_size} bytes")


if __name__ == "__main__":
    main()
