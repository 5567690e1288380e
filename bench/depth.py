"""Where the bits go along depth (the paper's Fig. 9 and Table 16's depth rows), across models: each
allocation of the transfer table re-derived from what the benchmark already holds, never evaluated again.

    .venv/bin/python -m bench.depth [smollm2,qwen0.5b,gemma270m]

Allocations per model (at `SETTINGS`' size and folding, the cells of the transfer table):
- greedy on the proxy and greedy on the measured sensitivity: recomputed from the cached measurement and
  group calibration (both deterministic, the same as the benchmark's cells);
- SAC: the best evaluated allocation and the final policy's mean-action rollout, read from the search's
  checkpoint (`bench/out/<model>/offgrid-s0/sac/<fold>-<method>-<size>/sac.safetensors`);
- transfer: SmolLM2's Q4_K_M policy rolled out zero-shot on the model (as `compare.py`'s transfer cells).

Per allocation: bits per weight of each searched tensor, 8·nbytes/n_params with the bytes llama.cpp writes
(the measurement's), the mean over the first and the last 10 block tensors in file order, and Spearman's ρ
between a block tensor's bpw and its block index (token_embd/output excluded from ρ, shown apart).
Writes bench/results/depth.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare import HERE, Fold, calibrated, prepare
from bench.table import spearman
from ramp_cpp.model.arch import classify
from ramp_cpp.store.atomic import atomic_path

#: model -> (folding, size, SAC method): the transfer table's settings. Gemma at Q2_K's size because at
#: Q4_K_M's every searched tensor already sits at Q8_0 (the budget does not bind, nothing to compare).
SETTINGS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("on", "Q4_K_M", "sac"),
    "qwen0.5b": ("on", "Q4_K_M", "sac-e40"),
    "gemma270m": ("off", "Q2_K", "sac-e30"),
}
EDGE = 10  # Fig. 9: the first and last 10 tensors


def _target(model: str, size: str) -> int:
    cells = json.loads((HERE / "results" / f"{model}.json").read_text())["cells"]
    return int(cells[f"offgrid-s0|nofold|preset+imatrix|{size}|16"]["file_bytes"])


def allocations(model: str, recipe: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(measured sensitivity, label -> {tensor name: GGMLQuantizationType}) for one model."""
    from gguf import GGMLQuantizationType

    from ramp_cpp.allocate.allocators import greedy
    from ramp_cpp.allocate.sac.policyfile import load_sized_policy
    from ramp_cpp.allocate.sac.scoring import policy_episode
    from ramp_cpp.allocate.sac.search import CHECKPOINT, CHECKPOINT_KIND
    from ramp_cpp.measure.proxy import measure
    from ramp_cpp.store import stfile

    fold, size, sac = SETTINGS[model]
    b = prepare(model, "offgrid", 0, recipe)
    folded = Fold.parse(fold)
    src, cal = b.model(folded)
    target = _target(model, size)
    proxy = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    sens, _ = calibrated(b, src, cal, proxy)
    out: dict[str, dict[str, Any]] = {
        "greedy (proxy)": greedy(proxy, target),
        "greedy (measured)": greedy(sens, target),
    }
    ckpt = b.out / "sac" / f"{folded.tag}-{sac}-{size}" / CHECKPOINT
    if ckpt.is_file():
        _, h = stfile.read(ckpt, CHECKPOINT_KIND, "search checkpoint", framework="pt")
        st = h["state"]
        for key, label in (("best", "best"), ("final", "policy")):
            if st.get(key):
                out[f"{sac} {label}"] = {k: GGMLQuantizationType[v] for k, v in st[key]["types"].items()}
    if model != "smollm2":
        pol = load_sized_policy(HERE / "out" / "smollm2" / "offgrid-s0" / "sac" / "fold-sac-Q4_K_M" /
                                "policy.safetensors")
        out["transfer (SmolLM2 policy)"] = policy_episode(pol, src, cal, sens, target).choice
    return sens, out


def profile(sens: Any, choice: dict[str, Any]) -> dict[str, Any]:
    """bpw per searched tensor along the file, and the depth statistics of the module docstring."""
    names, bpw, blocks = [], [], []
    edges: dict[str, float] = {}
    for t in sens.tensors:
        b = 8 * t.option(choice[t.name]).nbytes / t.n_params
        role, blk = classify(t.name)
        if blk is None:
            edges[t.name] = b
            continue
        names.append(t.name)
        bpw.append(b)
        blocks.append(blk)
    x, y = np.array(blocks, dtype=float), np.array(bpw)
    per_block = {int(k): float(y[x == k].mean()) for k in np.unique(x)}
    return {
        "first10": float(y[:EDGE].mean()),
        "last10": float(y[-EDGE:].mean()),
        "middle": float(y[EDGE:-EDGE].mean()),
        "rho_depth": spearman(x.tolist(), y.tolist()),
        "edges": edges,
        "per_block": per_block,
        "tensors": dict(zip(names, bpw, strict=True)),
    }


GRID = 24  # relative depths the per-block profiles are resampled to before models are compared


def _resampled(p: dict[str, Any]) -> np.ndarray:
    ks = sorted(int(k) for k in p["per_block"])
    return np.interp(np.linspace(0, 1, GRID), np.array(ks) / max(ks[-1], 1), [p["per_block"][k] for k in ks])


def across_models(data: dict[str, Any]) -> list[tuple[str, str, str, float | None]]:
    """The paper's "depth-wise correlation across models" (§5.6): Spearman's ρ between two models' per-block
    mean bpw, each resampled to `GRID` relative depths, for every allocation label both models have."""
    out = []
    models = list(data)
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            for label in data[a]:
                if label not in data[b] or not label.startswith("greedy"):
                    continue
                x, y = _resampled(data[a][label]), _resampled(data[b][label])
                out.append((a, b, label, spearman(x.tolist(), y.tolist())))
    return out


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Depth-wise bits (Fig. 9): where each allocation spends its bits",
        "",
        "Written by `bench/depth.py` from the cached measurements, group calibrations and SAC checkpoints of "
        "the benchmark (no evaluation). bpw of a tensor = 8·bytes/params as llama.cpp writes it; first/last "
        "10 = the first/last 10 block tensors in file order; ρ = Spearman's correlation of a block tensor's "
        "bpw with its block index (embeddings and output excluded, shown apart). \"-\": every block tensor "
        "at one width.",
        "",
        "| model | size (fold) | allocation | bpw first 10 | bpw middle | bpw last 10 | ρ(bpw, depth) | "
        "token_embd / output bpw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, d in data.items():
        fold, size, _ = SETTINGS[model]
        for label, p in d.items():
            rho = "-" if p["rho_depth"] is None else f"{p['rho_depth']:+.2f}"
            edges = " / ".join(f"{v:.2f}" for v in p["edges"].values()) or "-"
            lines.append(
                f"| {model} | {size} ({fold}) | {label} | {p['first10']:.2f} | {p['middle']:.2f} | "
                f"{p['last10']:.2f} | {rho} | {edges} |"
            )
    pairs = across_models(data)
    if pairs:
        lines += [
            "",
            f"Across models (the paper's §5.6 reports ρ ≈ 0.9): Spearman's ρ between two models' per-block "
            f"mean bpw, each resampled to {GRID} relative depths.",
            "",
            "| models | allocation | ρ across models |",
            "|---|---|---|",
            *(f"| {a} vs {b} | {label} | {'-' if r is None else f'{r:+.2f}'} |" for a, b, label, r in pairs),
        ]
    lines += ["", "![depth-wise bits](depth.png)", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], dst: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.6), squeeze=False)
    for ax, (model, d) in zip(axes[0], data.items(), strict=True):
        for label, p in d.items():
            ks = sorted(int(k) for k in p["per_block"])
            depth = np.array(ks) / max(ks[-1], 1)
            ax.plot(depth, [p["per_block"][k] for k in ks], marker=".", label=label)
        fold, size, _ = SETTINGS[model]
        ax.set_title(f"{model}, {size}'s size ({fold})")
        ax.set_xlabel("relative depth (block / last block)")
        ax.set_ylabel("mean bpw of the block's linears")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(dst, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="?", default=",".join(SETTINGS))
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    a = ap.parse_args()
    data: dict[str, Any] = {}
    for model in a.models.split(","):
        if model not in SETTINGS:
            raise SystemExit(f"{model}: not one of {', '.join(SETTINGS)}")
        sens, allocs = allocations(model, a.recipe)
        data[model] = {label: profile(sens, c) for label, c in allocs.items()}
    res = HERE / "results"
    for name, text in (("depth.json", json.dumps(data, indent=1)), ("depth.md", markdown(data))):
        with atomic_path(res / name, force=True) as tmp:
            tmp.write_text(text)
    plot(data, res / "depth.png")


if __name__ == "__main__":
    main()
