"""How many validation chunks `--fold auto` needs to make the choice the held-out text confirms.

For each size, the measured greedy allocation of the folded and of the unfolded model (the cells of
`bench/compare.py ... --methods greedy-measured --fold off,on`, same calibration, imatrix and tensor cache)
is scored on `wikitext2-valid` chunks 0..N-1 (validation text: what the tool may look at), per chunk. The
decision rule of `ramp_cpp.pipeline.folddecision.choose_fold` is then replayed on the first 4, 8 and N
chunks and set against the held-out `wikitext2-test` KLDs of the two cells: a choice is wrong when the other
setting is better on held-out text by more than the larger of the two cells' standard errors.

    .venv/bin/python -m bench.studies.fold_decision smollm2 --sizes Q3_K_M,Q4_K_S,Q4_K_M [--chunks 16]

Resumable: each (size, fold) scoring is kept in bench/results/<model>.fold.json; the table goes to
bench/results/<model>.fold.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.compare import HERE, Fold, Results, calibrated, log, prepare
from ramp_cpp.allocate.allocators import greedy
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.measure.proxy import MeasureConfig, measure
from ramp_cpp.measure.tensorcache import assemble, build_cache
from ramp_cpp.pipeline.folddecision import FoldEvidence, choose_fold
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.texts import load_text


def score(b: Any, folded: bool, target: int, chunks: int) -> list[float]:
    """Per-chunk mean KLD on wikitext2-valid of the measured greedy allocation at `target` bytes."""
    src, cal = b.model(Fold.parse("on" if folded else "off"))
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    sens, _ = calibrated(b, src, cal, sens)
    choice = greedy(sens, target)
    cc = MeasureConfig().candidates
    cache = build_cache(src, cc.requested(), b.out / "cache", imatrix=cal.imatrix(), base=cc.base,
                        searched=[t.name for t in sens.tensors])
    q = b.out / "fold-decision.gguf"
    assemble(cache, choice, q, force=True)
    try:
        r = kld(q, b.path, load_text("wikitext2-valid")[0], EvalConfig(n_chunks=chunks))
    finally:
        q.unlink(missing_ok=True)
    return list(r.chunk_kld)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sizes", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    a = ap.parse_args()
    res = Results(a.model)
    out = HERE / "results" / f"{a.model}.fold.json"
    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    b = prepare(a.model, "offgrid", 0, a.recipe)
    lines = [
        f"{a.model}: `--fold auto` replayed on wikitext2-valid chunks (measured greedy of each setting) "
        "vs the held-out wikitext2-test KLD of the same two files (16 chunks)\n",
        "| size | valid chunks | KLD off | KLD on | paired Δ (on − off) ± se | choice | held-out off "
        "| held-out on | choice right? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in a.sizes.split(","):
        held = {f: res.get(f"offgrid-s0|{'fold' if f else 'nofold'}|greedy-measured|{size}|16")
                for f in (0, 1)}
        if held[0] is None or held[1] is None:
            raise SystemExit(f"{size}: run bench/compare.py {a.model} --methods greedy-measured "
                             "--fold off,on first")
        target = res.get(f"offgrid-s0|nofold|preset+imatrix|{size}|16")["file_bytes"]  # type: ignore[index]
        per: dict[bool, list[float]] = {}
        for folded in (False, True):
            key = f"{size}|{'fold' if folded else 'nofold'}|{a.chunks}"
            if key not in data:
                log(f"{a.model}: {size} {'folded' if folded else 'unfolded'} on {a.chunks} valid chunks")
                data[key] = score(b, folded, target, a.chunks)
                with atomic_path(out, force=True) as tmp:
                    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            per[folded] = data[key]
        h_off, h_on = held[0]["kld_mean"], held[1]["kld_mean"]  # type: ignore[index]
        se = max(held[0]["kld_stderr"], held[1]["kld_stderr"])  # type: ignore[index]
        for n in sorted({4, 8, a.chunks}):
            ev = FoldEvidence.of(per[True][:n], per[False][:n])
            on = choose_fold(ev)
            chosen, other = (h_on, h_off) if on else (h_off, h_on)
            right = "yes" if chosen <= other + se else f"no (+{chosen - other:.4f})"
            lines.append(
                f"| {size} | 0–{n - 1} | {ev.off:.5f} | {ev.on:.5f} | {ev.delta:+.5f} ± {ev.stderr:.5f} | "
                f"{'on' if on else 'off'} | {h_off:.4f} | {h_on:.4f} | {right} |"
            )
    lines.append(f"\nCommand: `.venv/bin/python -m bench.studies.fold_decision {' '.join(sys.argv[1:])}`")
    md = HERE / "results" / f"{a.model}.fold.md"
    with atomic_path(md, force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
