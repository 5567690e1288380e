"""Screening a residual-relative proxy, offline, with each model's measured sensitivity as the judge (issue
23).

The proxy weights a linear's squared output error by E[x_j²] (the imatrix), summed over every calibration
token alike. A token whose residual-stream row h_t is large (the BOS token's "massive activations":
SmolLM2's mean ‖h‖² jumps 50× at block 11) takes a perturbation δ_t with little effect, since the next
RMSNorm divides by rms(h_t); the proxy counts it in full. The relative proxy weights each token by 1 /
ms(h_t), ms the mean square of that token's residual row where the linear's branch adds into it (the
attention's input residual for q, k, v and o; the FFN's for gate, up and down), measured by llama.cpp's eval
callback (native `rel_sq`):

    m̃_j = (1/T) Σ_t x_tj² / ms(h_t)        error_t = Σ_j m̃_j · Σ_i (W − Ŵ_t)²_ij

over the same calibration windows as the proxy (calib/bench.toml, on the folded model `bench/compare.py`
measured). Candidates (all zero evaluations on the target but `measured`), allocated by greedy at the
whole-file sizes of Q4_K_M and Q3_K_M + imatrix, scored by the measured sensitivity (zeroeval.py's judge):

    uniform        no errors read
    proxy          the proxy as it is
    rel            the relative proxy
    rel^α          the proxy × (relative proxy / proxy)^α per tensor (α = 0.25, 0.5, 0.75)
    rel-roles      the relative proxy × each role's factor (measured / relative proxy) in the other models,
                   their geometric mean, each model centred on its own median (a leave-one-out transfer)
    rel-groups     the same per (role, depth quarter)
    proxy±k, rel±k greedy on the proxy (the relative proxy) with each tensor's options cut to those within k
                   steps of uniform's choice (k = 1, 2): a trust region around uniform
    measured       the judge itself (the measured greedy: what the zero-evaluation rules are to reach)

    .venv/bin/python -m bench.studies.relproxy [--models smollm2,qwen0.5b,gemma270m]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.compare import HERE
from bench.judge import SIZES, group_keys, judged
from ramp_cpp.allocate.allocators import ALLOCATORS
from ramp_cpp.calibration.artifact import Calibration
from ramp_cpp.calibration.collect import windows
from ramp_cpp.llama.backend import InputStats, RuntimeOptions
from ramp_cpp.llama.native import ActivationCollector, stats_model
from ramp_cpp.measure.proxy import measure
from ramp_cpp.measure.sensitivity import Sensitivity, TensorOptions
from ramp_cpp.store.texts import load_text

#: graph nodes that are the residual stream, by the names llama.cpp's graph gives them: the embeddings (the
#: callback meets them as "embd"; gemma3 scales them: inp_scaled), the residual after the attention's add
#: (llama/qwen2: ffn_inp, gemma3: sa_out) and after a block
RESIDUAL = ("embd", "inp_scaled", "ffn_inp-", "sa_out-", "l_out-")
#: the proxy × (relative proxy / proxy)^α per tensor: between the two weightings
ALPHAS = (0.25, 0.5, 0.75)


def relative_stats(src: Path, cal: Calibration, out: Path) -> dict[str, np.ndarray]:
    """m̃ per weight (module doc), over the calibration's own windows; cached in `out` (npz)."""
    if out.is_file():
        with np.load(out) as z:
            return {k: z[k] for k in z.files}
    cfg = cal.config
    with stats_model(src, RuntimeOptions(n_ctx=cfg.ctx), residual=RESIDUAL) as m:
        ws = windows(m.tokenize(load_text(cfg.text)[0]), cfg, m.bos if m.add_bos else None)
        m.reset()
        for w in ws:
            m.run(w)
        rel = cast(ActivationCollector, m.collector).relative()
    got = {n: r / k for n, (r, k) in rel.items() if n.endswith(".weight") and k > 0}
    lost = sorted(n for n in cal.stats if n.startswith("blk.") and n not in got)
    if lost:
        raise SystemExit(f"{src.name}: no residual row met before {lost[0]} (a residual node not named)")
    tmp = out.with_suffix(".tmp.npz")
    cast(Any, np.savez)(tmp, **got)
    tmp.replace(out)
    return got


def relative_calibration(cal: Calibration, rel: dict[str, np.ndarray]) -> Calibration:
    """`cal` with each weight's E[x²] replaced by m̃ (sum_sq = m̃ · count), where m̃ was measured."""
    stats = {n: InputStats(max_abs=s.max_abs, sum_sq=rel[n] * s.count, count=s.count) if n in rel else s
             for n, s in cal.stats.items()}
    return replace(cal, stats=stats, extra={**cal.extra, "relative_to_residual": True})


def same_types(sens: Sensitivity, like: Sensitivity) -> Sensitivity:
    """`sens` with each tensor's options cut to the types `like` keeps (both compare the same candidates)."""
    keep = {t.name: {o.ggml_type for o in t.options} for t in like.tensors}
    return replace(sens, tensors=tuple(
        TensorOptions(t.name, t.n_params, tuple(o for o in t.options if o.ggml_type in keep[t.name]))
        for t in sens.tensors))


def around(sens: Sensitivity, base: dict[str, Any], k: int) -> Sensitivity:
    """`sens` with each tensor's options cut to those within k steps of its type in `base`."""
    out = []
    for t in sens.tensors:
        i = [o.ggml_type for o in t.options].index(base[t.name])
        out.append(TensorOptions(t.name, t.n_params, t.options[max(0, i - k) : i + k + 1]))
    return replace(sens, tensors=tuple(out))


def log_factors(
    judge: Sensitivity, rel: Sensitivity, keys: dict[str, Any], by_bucket: bool
) -> dict[Any, float]:
    """Per role (or role × depth quarter): mean log(judge error / relative error) at each tensor's middle
    option, less the model's median over tensors."""
    errs = {t.name: t.options[len(t.options) // 2] for t in judge.tensors}
    lf = {t.name: float(np.log(errs[t.name].error / t.option(errs[t.name].ggml_type).error))
          for t in rel.tensors}
    med = float(np.median(list(lf.values())))
    per: dict[Any, list[float]] = {}
    for n, v in lf.items():
        per.setdefault(keys[n] if by_bucket else keys[n][0], []).append(v - med)
    return {k: float(np.mean(v)) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen0.5b,gemma270m")
    a = ap.parse_args()
    models = a.models.split(",")
    loaded = {}
    for key in models:
        j = judged(key)
        cells, sens, judge, names = j.cells, j.sens, j.judge, j.names
        relcal = relative_calibration(j.cal, relative_stats(j.src, j.cal, j.base.out / "relstats.npz"))
        rel = same_types(measure(j.src, relcal, j.cal.imatrix(), cache_root=j.base.out / "cache"), judge)
        info = j.info
        loaded[key] = (cells, sens, judge, rel, group_keys(info, names))
    rows = []
    for key in models:
        cells, sens, judge, rel, keys = loaded[key]
        top = {t.name: t.options[-1].ggml_type for t in sens.tensors}
        cands: dict[str, Sensitivity] = {"proxy": sens, "rel": rel}
        # log(rel / proxy) per tensor
        k = log_factors(rel, sens, {n: (n, None) for n in keys}, by_bucket=False)
        for alpha in ALPHAS:
            cands[f"rel^{alpha:g}"] = sens.scaled({n: float(np.exp(alpha * k[n])) for n in keys})
        for name, by_bucket in (("rel-roles", False), ("rel-groups", True)):
            others = [log_factors(j, r, k, by_bucket) for m, (_, _, j, r, k) in loaded.items() if m != key]
            if not others:
                continue
            mean = {g: float(np.mean([o[g] for o in others if g in o])) for g in set().union(*others)}
            cands[name] = rel.scaled({n: float(np.exp(mean.get(keys[n] if by_bucket else keys[n][0], 0.0)))
                                      for n in keys})
        cands["measured"] = judge
        for size in SIZES:
            target = cells[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"]
            row: dict[str, Any] = {"model": key, "size": size}
            uniform = ALLOCATORS["uniform"](sens, target)
            row["uniform"] = judge.error(uniform) - judge.error(top)
            for n, s in cands.items():
                row[n] = judge.error(ALLOCATORS["greedy"](s, target)) - judge.error(top)
            for steps in (1, 2):
                for n, s in (("proxy", sens), ("rel", rel)):
                    near = ALLOCATORS["greedy"](around(s, uniform, steps), target)
                    row[f"{n}±{steps}"] = judge.error(near) - judge.error(top)
            rows.append(row)
            ref = row["measured"]
            print(f"{key:9s} {size}: " + "  ".join(f"{n} {v / ref:.2f}×" for n, v in row.items()
                                                     if n not in ("model", "size")), flush=True)
        # does the relative proxy's error follow the measured one more closely than the proxy's?
        for name, s in (("proxy", sens), ("rel", rel)):
            by = {t.name: t for t in s.tensors}
            lin = [j for j in judge.tensors if keys[j.name][1] is not None]  # the linears
            mid = [j.options[len(j.options) // 2] for j in lin]
            lf = [np.log(o.error / by[j.name].option(o.ggml_type).error)
                  for j, o in zip(lin, mid, strict=True)]
            print(f"{key:9s} log(measured / {name}) over the linears: std {np.std(lf):.2f}, "
                  f"span ×{np.exp(np.ptp(lf)):.3g}", flush=True)
    (HERE / "results" / "relproxy.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
