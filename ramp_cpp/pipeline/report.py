"""The search report: report.json and the paper's figures as PNGs, from the search's episode log.

The only module that draws. It uses matplotlib's object API (`matplotlib.figure.Figure`, rendered by the
Agg canvas when saved as PNG), never pyplot, so it needs no display and changes no global backend state.
Every file is written through `atomic_path`: a report is either complete or the previous one.

Inputs (plain dicts, as the search loop logs them):
- `log`: one dict per episode with the keys in `LOG_KEYS` (see there).
- `tensors`: the searched tensors in model order, {name, role, block, n_params}.
- `best`: the best in-budget configuration {episode, bits, types, bpw, file_bytes, quality}, or None.
- `points`: size-vs-quality points {label, file_bytes, quality, kind: "preset" | "ramp"}.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path

#: What each episode record must hold. bpw is the parameter-weighted real bits per weight of the searched
#: tensors (what the budget charges); bits the nominal bit-width per searched tensor, in model order.
LOG_KEYS: tuple[str, ...] = (
    "episode",
    "random",
    "reward",
    "r_q",
    "r_b",
    "metric",
    "quality",
    "ppl",
    "kld",
    "bpw",
    "bpw_nominal",
    "file_bytes",
    "in_budget",
    "best_quality",
    "t_assemble",
    "t_load",
    "t_eval",
    "t_update",
    "memo",
    "bits",
)
TENSOR_KEYS: tuple[str, ...] = ("name", "role", "block", "n_params")
BEST_KEYS: tuple[str, ...] = ("episode", "bits", "types", "bpw", "file_bytes", "quality")
POINT_KEYS: tuple[str, ...] = ("label", "file_bytes", "quality", "kind")
#: Per-episode time split, log key -> report name.
PHASES: dict[str, str] = {"t_assemble": "assemble", "t_load": "load", "t_eval": "eval", "t_update": "update"}
METRIC_LABEL: dict[str, str] = {"ppl": "perplexity", "kld": "mean KLD vs base"}
#: The `meta` key of the unquantized model's value of the metric, drawn as the "unquantized" line
#: (the base's PPL, or 0 for KLD); the search writes it under this name.
BASE_QUALITY = "base_quality"
DPI = 120


def _check(records: Sequence[dict[str, Any]], keys: tuple[str, ...], what: str) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise RampError(f"{what} entry {i} is not a dict")
        missing = [k for k in keys if k not in r]
        if missing:
            raise RampError(f"{what} entry {i} lacks {', '.join(missing)}")


def validate(
    log: Sequence[dict[str, Any]],
    tensors: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    points: Sequence[dict[str, Any]],
) -> None:
    """One RampError line for an input the report cannot be drawn from."""
    if not log:
        raise RampError("the episode log is empty: nothing to report")
    _check(log, LOG_KEYS, "episode log")
    _check(tensors, TENSOR_KEYS, "tensor list")
    _check(points, POINT_KEYS, "size/quality points")
    if best is not None:
        _check([best], BEST_KEYS, "best result")
        if len(best["bits"]) != len(tensors):
            raise RampError(f"best result has {len(best['bits'])} bit-widths for {len(tensors)} tensors")


def _role_bits(tensors: Sequence[dict[str, Any]], bits: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per role, in first-appearance order: count, plain mean bits (paper Fig. 14) and the
    parameter-weighted mean sum(bits * n_params) / sum(n_params)."""
    out: dict[str, dict[str, float]] = {}
    for role in dict.fromkeys(t["role"] for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t["role"] == role]
        b = np.array([bits[i] for i in idx], float)
        w = np.array([tensors[i]["n_params"] for i in idx], float)
        out[role] = {
            "n": len(idx),
            "mean_bits": float(b.mean()),
            "weighted_bits": float((b * w).sum() / w.sum()) if w.sum() > 0 else float(b.mean()),
        }
    return out


def summarize(
    log: Sequence[dict[str, Any]], tensors: Sequence[dict[str, Any]], best: dict[str, Any] | None
) -> dict[str, Any]:
    """The numbers report.json carries. Time means are per episode over all episodes (memoized ones
    skipped assemble/load/eval and count with their near-zero times) and, separately, over the episodes
    that really evaluated a model (`memo` false)."""
    n = len(log)

    def times(rows: Sequence[dict[str, Any]], agg: Any) -> dict[str, float] | None:
        if not rows:
            return None
        t = {name: float(agg([float(r[k]) for r in rows])) for k, name in PHASES.items()}
        t["total"] = float(sum(t.values()))
        return t

    evaluated = [r for r in log if not r["memo"]]
    in_budget = [r for r in log if r["in_budget"]]
    rewards = np.array([float(r["reward"]) for r in log])
    tail = rewards[-min(20, n) :]
    return {
        "episodes": n,
        "random_episodes": sum(bool(r["random"]) for r in log),
        "in_budget_episodes": len(in_budget),
        "memo_episodes": n - len(evaluated),
        "first_in_budget_episode": int(in_budget[0]["episode"]) if in_budget else None,
        "metric": log[-1]["metric"],
        "best": best,
        "reward_max": float(rewards.max()),
        "reward_mean_last_20": float(tail.mean()),
        "time_mean_s": times(log, np.mean),
        "time_mean_s_evaluated": times(evaluated, np.mean),
        "time_total_s": times(log, np.sum),
        "bits_by_role": _role_bits(tensors, best["bits"]) if best is not None else None,
    }


# ------------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, dst: Path) -> Path:
    fig.tight_layout()
    with atomic_path(dst, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)  # format given: the temp name has no .png suffix
    return dst


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _maybe_log(ax: Axes, values: Sequence[float]) -> None:
    """Log y-axis when positive values span more than 20x: early episodes' broken quantizations would
    otherwise flatten the interesting part of the curve."""
    v = np.array([x for x in values if math.isfinite(x)])
    if v.size and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_yscale("log")


def _shade_warmup(ax: Axes, log: Sequence[dict[str, Any]]) -> None:
    warm = [int(r["episode"]) for r in log if r["random"]]
    if warm:
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0, label="random warm-up")


def _budget_lines(ax: Axes, meta: dict[str, Any]) -> None:
    for key, style in (("budget", "-"), ("target", ":")):
        if meta.get(key) is not None:
            ax.axhline(float(meta[key]), color="crimson", ls=style, lw=1, label=key)


def _base_line(ax: Axes, meta: dict[str, Any]) -> None:
    if meta.get(BASE_QUALITY) is not None:
        ax.axhline(float(meta[BASE_QUALITY]), color="k", ls="--", lw=1, label="unquantized")


def plot_training(log: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Figure:
    """Reward, quality metric and bits per weight per episode (paper Fig. 3)."""
    ep = np.array([int(r["episode"]) for r in log])
    metric = str(log[-1]["metric"])
    fig = Figure(figsize=(9, 8))
    ax_r, ax_q, ax_b = fig.subplots(3, 1, sharex=True)
    for ax in (ax_r, ax_q, ax_b):
        _shade_warmup(ax, log)
    ax_r.plot(ep, [r["reward"] for r in log], lw=1.2, label="reward R")
    ax_r.plot(ep, [r["r_q"] for r in log], lw=0.8, alpha=0.7, label="quality r_q")
    ax_r.plot(ep, [r["r_b"] for r in log], lw=0.8, alpha=0.7, label="budget r_b")
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=8, loc="lower right")
    q = [_nan(r["quality"]) for r in log]
    ok = np.array([bool(r["in_budget"]) for r in log])
    ax_q.plot(ep, q, lw=0.8, color="0.5")
    ax_q.scatter(ep[ok], np.array(q)[ok], s=10, color="tab:green", label="in budget", zorder=3)
    _base_line(ax_q, meta)
    _maybe_log(ax_q, q)
    ax_q.set_ylabel(METRIC_LABEL.get(metric, metric))
    ax_q.legend(fontsize=8, loc="upper right")
    ax_b.plot(ep, [r["bpw"] for r in log], lw=1.2, label="real bpw")
    ax_b.plot(ep, [r["bpw_nominal"] for r in log], lw=0.8, alpha=0.7, label="nominal bpw")
    _budget_lines(ax_b, meta)
    ax_b.set_ylabel("bits per weight")
    ax_b.set_xlabel("episode")
    ax_b.legend(fontsize=8, loc="best")
    fig.suptitle(f"RAMP search: {meta.get('model', '')}".rstrip(": "))
    return fig


def plot_best_so_far(log: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Figure:
    """Best in-budget quality found so far (paper Fig. 4), over the in-budget episodes' own values."""
    ep = np.array([int(r["episode"]) for r in log])
    metric = str(log[-1]["metric"])
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    _shade_warmup(ax, log)
    ok = np.array([bool(r["in_budget"]) for r in log])
    q = np.array([_nan(r["quality"]) for r in log])
    best = [_nan(r["best_quality"]) for r in log]
    ax.scatter(ep[ok], q[ok], s=8, color="0.6", label="in-budget episode")
    ax.step(ep, best, where="post", color="tab:blue", lw=1.8, label="best so far")
    _base_line(ax, meta)
    _maybe_log(ax, [*best, *q[ok].tolist()])
    ax.set_xlabel("episode")
    ax.set_ylabel(f"best {METRIC_LABEL.get(metric, metric)}")
    ax.legend(fontsize=8)
    return fig


def plot_bits_depth(tensors: Sequence[dict[str, Any]], best: dict[str, Any]) -> Figure:
    """Nominal bits of the best configuration along depth, one series per role (paper Fig. 6 / 10).
    Tensors outside the blocks are drawn at depth -1."""
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    roles = list(dict.fromkeys(t["role"] for t in tensors))
    offsets = np.linspace(-0.25, 0.25, len(roles)) if len(roles) > 1 else np.zeros(1)
    for off, role in zip(offsets, roles, strict=True):
        idx = [i for i, t in enumerate(tensors) if t["role"] == role]
        x = np.array([-1 if tensors[i]["block"] is None else int(tensors[i]["block"]) for i in idx])
        # a small per-role offset keeps equal bit-widths of different roles apart
        ax.plot(x + off, [best["bits"][i] for i in idx], marker="o", ms=3.5, lw=0.8, label=role)
    ax.set_xlabel("block")
    ax.set_ylabel("nominal bits")
    ax.set_yticks(sorted({int(b) for b in best["bits"]}))
    ax.set_title(f"best configuration: episode {best['episode']}, {float(best['bpw']):.3f} bpw")
    ax.legend(fontsize=8, ncol=min(len(roles), 7), loc="upper center", bbox_to_anchor=(0.5, -0.15))
    return fig


def plot_bits_role(tensors: Sequence[dict[str, Any]], best: dict[str, Any]) -> Figure:
    """Mean nominal bits per role of the best configuration (paper Fig. 14), with the
    parameter-weighted mean beside it."""
    stats = _role_bits(tensors, best["bits"])
    roles = list(stats)
    x = np.arange(len(roles))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    mean = ax.bar(x - 0.2, [stats[r]["mean_bits"] for r in roles], 0.4, label="mean")
    weighted = ax.bar(x + 0.2, [stats[r]["weighted_bits"] for r in roles], 0.4, label="parameter-weighted")
    for bars in (mean, weighted):
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [f"{r}\n({int(stats[r]['n'])})" for r in roles], fontsize=8)
    ax.set_ylabel("nominal bits")
    ax.set_ylim(0, max(best["bits"]) + 1)
    ax.legend(fontsize=8)
    return fig


def plot_pareto(points: Sequence[dict[str, Any]], metric: str, meta: dict[str, Any]) -> Figure:
    """File size vs quality for llama.cpp presets and RAMP results (paper Fig. 5 / 7); the presets'
    Pareto front (no preset both smaller and better) is dashed."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    pre = sorted((p for p in points if p["kind"] != "ramp"), key=lambda p: float(p["file_bytes"]))
    ours = [p for p in points if p["kind"] == "ramp"]
    front, best_q = [], math.inf
    for p in pre:
        if float(p["quality"]) < best_q:
            best_q = float(p["quality"])
            front.append(p)
    mib = 2.0**20
    if front:
        fx, fy = [p["file_bytes"] / mib for p in front], [p["quality"] for p in front]
        ax.plot(fx, fy, "--", color="0.6", lw=1)
    groups = ((pre, "llama.cpp preset", "o", "0.35", 30), (ours, "RAMP", "*", "crimson", 140))
    for group, kind, marker, color, size in groups:
        if not group:
            continue
        xy = [(p["file_bytes"] / mib, float(p["quality"])) for p in group]
        xs, ys = [x for x, _ in xy], [y for _, y in xy]
        ax.scatter(xs, ys, s=size, c=color, marker=marker, label=kind, zorder=3)
        for p, at in zip(group, xy, strict=True):
            ax.annotate(str(p["label"]), at, fontsize=7, xytext=(4, 4), textcoords="offset points")
    _base_line(ax, meta)
    _maybe_log(ax, [float(p["quality"]) for p in points])
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} (lower is better)")
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------ writer


def write_report(
    run_dir: str | os.PathLike[str],
    log: Sequence[dict[str, Any]],
    tensors: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    points: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Path]:
    """Write report.json and the figures into `run_dir` (created if missing, files replaced atomically).

    Returns {"report": report.json, "training", "best_so_far", "bits_depth", "bits_role", "pareto": PNGs}.
    bits_depth/bits_role need a `best` (no in-budget episode yet: skipped), pareto needs `points`.
    `meta` is stored verbatim; the figures read its optional `model`, `budget`, `target` and
    `BASE_QUALITY` (the unquantized model's value of the metric)."""
    validate(log, tensors, best, points)
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    metric = str(log[-1]["metric"])
    out: dict[str, Path] = {}
    report = {"meta": meta, "summary": summarize(log, tensors, best)}
    with atomic_path(d / "report.json", force=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out["report"] = d / "report.json"
    figures: dict[str, Figure] = {
        "training": plot_training(log, meta),
        "best_so_far": plot_best_so_far(log, meta),
    }
    if best is not None:
        figures["bits_depth"] = plot_bits_depth(tensors, best)
        figures["bits_role"] = plot_bits_role(tensors, best)
    if points:
        figures["pareto"] = plot_pareto(points, metric, meta)
    for name, fig in figures.items():
        out[name] = _save(fig, d / f"{name}.png")
    return out


def write_pareto(
    run_dir: str | os.PathLike[str], points: Sequence[dict[str, Any]], metric: str, meta: dict[str, Any]
) -> Path:
    """pareto.png alone: the report of a method without episodes (uniform, greedy)."""
    return _save(plot_pareto(points, metric, meta), Path(run_dir) / "pareto.png")
