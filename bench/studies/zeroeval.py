"""Screening zero-evaluation allocators offline, with each model's measured sensitivity as the judge.

For every benchmark model whose folded sensitivity is cached (`bench/compare.py` made it) and every size, each
candidate sensitivity below is allocated by greedy (uniform by itself), and the allocation is scored by the
*measured* sensitivity of that model (its proxy rescaled by its own 33 group probes, stored in
`bench/results/<model>.json`): predicted ΔKLD = Σ_t ratio_g(t) · (error_t(τ_t) − error_t(highest)), the sum
`groups.py` calibrates (additive within 2–3% on the pairs it checks). No model is evaluated here: the
candidates that look best are then run for real through `bench/compare.py` (held-out KLD), which decides.

Candidates (all zero evaluations on the target but `measured`):
    uniform        no errors read
    proxy          the proxy as it is (greedy's `--sensitivity proxy`)
    transferred    the proxy × the other two models' centred group ratios (bench/ratios.py)
    relative-w     each tensor's errors divided by its error at its highest option (≈ relative error, since
                   the highest type's relative error is about the same everywhere), times n_params^w
    pattern        no errors read either: each tensor at the option nearest L + o_k bits per weight, o_k the
                   mean offset from the linears' mean bpw of group k (role × depth quarter) in the other
                   models' measured greedy allocations at the same size; L the highest level that fits
    pattern-own    the same with this model's own offsets (what the pattern alone can carry, not zero-eval)
    learned        a per-tensor pattern: each tensor's offset from the linears' mean bpw in the other models'
                   measured greedy allocations at the same size, regressed (ridge, standardized features) on
                   what costs no evaluation: role, relative depth (and its square), log row length and row
                   count, the proxy's log error ratio lowest/highest option and its log error at the
                   highest option centred on the model's median; behaviour cloning of the measured greedy
    learned-half   the same offsets halved (towards uniform)

    .venv/bin/python -m bench.studies.zeroeval [--models smollm2,qwen0.5b,gemma270m]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from bench.compare import HERE
from bench.judge import SIZES, group_keys, judged
from bench.ratios import leave_out
from ramp_cpp.allocate.allocators import ALLOCATORS
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.measure.transfer import TIED_EMBD


def relative(sens: Sensitivity, w: float) -> Sensitivity:
    return sens.scaled({t.name: t.n_params**w / t.options[-1].error for t in sens.tensors})


def offsets(sens: Sensitivity, keys: dict[str, Any], choice: dict[str, Any]) -> dict[Any, float]:
    """Mean bpw of each group in `choice` minus the linears' parameter-weighted mean bpw."""
    bpw = {t.name: 8 * t.option(choice[t.name]).nbytes / t.n_params for t in sens.tensors}
    lin = [t for t in sens.tensors if keys[t.name][1] is not None]
    mean = sum(bpw[t.name] * t.n_params for t in lin) / sum(t.n_params for t in lin)
    per: dict[Any, list[float]] = {}
    for t in sens.tensors:
        per.setdefault(keys[t.name], []).append(bpw[t.name] - mean)
    return {k: sum(v) / len(v) for k, v in per.items()}


def pattern(sens: Sensitivity, keys: dict[str, Any], off: dict[Any, float], target: int) -> dict[str, Any]:
    """Each tensor at the option nearest L + off[its group] bpw, L bisected to the highest that fits."""
    def picks(level: float) -> list[int]:
        out = []
        for t in sens.tensors:
            want = level + off.get(keys[t.name], 0.0)
            bp = [8 * o.nbytes / t.n_params for o in t.options]
            out.append(min(range(len(bp)), key=lambda k: (abs(bp[k] - want), bp[k])))  # noqa: B023
        return out

    def nbytes(p: list[int]) -> int:
        return sens.fixed_bytes + sum(t.options[k].nbytes for t, k in zip(sens.tensors, p, strict=True))

    lo, hi = -10.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if nbytes(picks(mid)) <= target else (lo, mid)
    return {t.name: t.options[k].ggml_type for t, k in zip(sens.tensors, picks(lo), strict=True)}


RIDGE = 1.0


def features(sens: Sensitivity, info: Any, keys: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """One row of zero-evaluation features per searched tensor (module doc, `learned`)."""
    roles = sorted({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                    "token_embd", "output", TIED_EMBD})
    top = np.log([t.options[-1].error for t in sens.tensors])
    rows = []
    for t, lt in zip(sens.tensors, top, strict=True):
        ti = info.tensor(t.name)
        role = keys[t.name][0]
        d = (ti.block / max(1, info.n_blocks - 1)) if ti.block is not None else -1.0
        rows.append([*(float(role == r) for r in roles), d, d * d, np.log2(ti.n_per_row), np.log2(ti.n_rows),
                     np.log(t.options[0].error / t.options[-1].error), lt - np.median(top)])
    return [t.name for t in sens.tensors], np.array(rows)


def per_tensor_offsets(sens: Sensitivity, keys: dict[str, Any], choice: dict[str, Any]) -> dict[str, float]:
    """Each tensor's own offset (`offsets` with one group per tensor; the bucket kept: the linears' mean)."""
    off = offsets(sens, {n: (n, k[1]) for n, k in keys.items()}, choice)
    return {n: off[n, k[1]] for n, k in keys.items()}


def ridge_offsets(train: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Ridge regression of the offsets on standardized features, fitted on `train`, predicted for `x`."""
    xs = np.vstack([a for a, _ in train])
    ys = np.concatenate([b for _, b in train])
    mu, sd = xs.mean(axis=0), xs.std(axis=0)
    sd[sd == 0] = 1.0
    z = np.hstack([(xs - mu) / sd, np.ones((len(xs), 1))])
    w = np.linalg.solve(z.T @ z + RIDGE * np.eye(z.shape[1]), z.T @ ys)
    return np.hstack([(x - mu) / sd, np.ones((len(x), 1))]) @ w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen0.5b,gemma270m")
    a = ap.parse_args()
    rows = []
    models = a.models.split(",")
    loaded = {}
    for key in models:
        m = judged(key)
        loaded[key] = (m.cells, m.sens, m.info, m.names, m.judge, group_keys(m.info, m.names))
    for key in models:
        cells, sens, info, names, judge, keys = loaded[key]
        top = {t.name: t.options[-1].ggml_type for t in sens.tensors}
        cands = {
            "proxy": sens,
            "transferred": sens.scaled(leave_out(key).factors(info, names)),
            **{f"relative-{w:g}": relative(sens, w) for w in (0.0, 0.5, 1.0)},
            "measured": judge,
        }
        for size in SIZES:
            target = cells[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"]
            row = {"model": key, "size": size}
            pick = {"uniform": ALLOCATORS["uniform"](sens, target)}
            pick |= {n: ALLOCATORS["greedy"](s, target) for n, s in cands.items()}

            def measured_offsets(m: str, size: str = size) -> dict[Any, float]:
                c, s, _, _, j, k = loaded[m]
                t = c[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"]
                return offsets(s, k, ALLOCATORS["greedy"](j, t))

            others = [measured_offsets(m) for m in models if m != key]
            if others:
                mean = {k: sum(o[k] for o in others if k in o) / sum(k in o for o in others)
                        for k in set().union(*others)}
                pick["pattern"] = pattern(sens, keys, mean, target)
            pick["pattern-own"] = pattern(sens, keys, measured_offsets(key), target)
            train = []
            for m in (m for m in models if m != key):
                c, s, inf, _, j, k = loaded[m]
                t = c[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"]
                off = per_tensor_offsets(s, k, ALLOCATORS["greedy"](j, t))
                nm, x = features(s, inf, k)
                train.append((x, np.array([off[n] for n in nm])))
            if train:
                nm, x = features(sens, info, keys)
                pred = dict(zip(nm, ridge_offsets(train, x), strict=True))
                ident = {n: (n, None) for n in nm}
                for name, f in (("learned", 1.0), ("learned-half", 0.5)):
                    pick[name] = pattern(sens, ident, {(n, None): f * v for n, v in pred.items()}, target)
            for n, choice in pick.items():
                row[n] = judge.error(choice) - judge.error(top)
            rows.append(row)
            ref = row["measured"]
            print(f"{key:9s} {size}: " + "  ".join(f"{n} {v / ref:.2f}×" for n, v in row.items()
                                                     if n not in ("model", "size")), flush=True)
    (HERE / "results" / "zeroeval.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
