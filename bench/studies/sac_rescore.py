"""A second look at a finished SAC cell (`sacsearch.rescore`): greedy's allocation and the search's `--top`
best allocations by reward KLD, scored again on other chunks of the validation text (`wikitext2-valid`
chunks 4-11 by default; the reward used 0-3), the best of them evaluated on the held-out chunks. Stored in
`bench/results/<model>.rescored.json` under the cell's key (a file of its own: compare.py may be writing the
cells' file meanwhile).

    .venv/bin/python -m bench.studies.sac_rescore smollm2 'offgrid-s0|fold|sac|Q4_K_M|16' [--top 5]
"""

from __future__ import annotations

import argparse
import json

from bench.compare import HERE, REWARD, Fold, Results, calibrated, evaluate, log, prepare
from ramp_cpp.allocate.allocators import greedy
from ramp_cpp.allocate.sac.scoring import RewardScorer
from ramp_cpp.allocate.sac.search import CHECKPOINT, load_checkpoint, rescore
from ramp_cpp.fold.source import cleanup, workdir
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.measure.proxy import MeasureConfig, measure
from ramp_cpp.measure.tensorcache import assemble, build_cache
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.texts import load_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("cell")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--first-chunk", type=int, default=REWARD.n_chunks)
    ap.add_argument("--chunks", type=int, default=8)
    a = ap.parse_args()
    res = Results(a.model)
    row = res.get(a.cell)
    if row is None:
        raise SystemExit(f"no cell {a.cell}")
    base, fold, method, preset, n = a.cell.split("|")
    name, seed = base.split("-s")
    b = prepare(a.model, name, int(seed), str(HERE.parent / "calib" / "bench.toml"))
    src, cal = b.model(Fold.parse("on" if fold == "fold" else "off"))
    sens, _ = calibrated(b, src, cal, measure(src, cal, cal.imatrix(), cache_root=b.out / "cache"))
    target = res.get(f"{base}|nofold|preset+imatrix|{preset}|{n}")["file_bytes"]  # type: ignore[index]
    cc = MeasureConfig().candidates
    cache = build_cache(src, cc.requested(), b.out / "cache", imatrix=cal.imatrix(), base=cc.base,
                        searched=[t.name for t in sens.tensors])
    _, st = load_checkpoint(b.out / "sac" / f"{fold}-{method}-{preset}" / CHECKPOINT)
    wd = workdir()
    try:
        ecfg = EvalConfig(n_ctx=REWARD.n_ctx, first_chunk=a.first_chunk, n_chunks=a.chunks)
        scorer = RewardScorer(cache, b.path, load_text("wikitext2-valid")[0], ecfg, RuntimeOptions(), wd)
        log(f"{a.cell}: rescoring greedy and the top {a.top} on wikitext2-valid chunks "
            f"{a.first_chunk}-{a.first_chunk + a.chunks - 1}")
        choice, kld, table = rescore(sens, st, scorer, a.top, target, greedy(sens, target))
        q = b.out / f"{method}.{preset}.rescored.gguf"
        assemble(cache, choice, q, force=True)
        size = q.stat().st_size
        ev = evaluate(q, b, int(n))
        q.unlink(missing_ok=True)
    finally:
        cleanup(wd)
    out = {
        "top": a.top, "chunks": [a.first_chunk, a.chunks], "table": table, "kld": kld,
        "kept_reference": bool(next(r for r in table if r["rescored_kld"] == kld)["reference"]),
        "file_bytes": size, **ev,
    }
    path = HERE / "results" / f"{a.model}.rescored.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[a.cell] = out
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
