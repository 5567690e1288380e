"""Zero-shot transfer (paper §5.6) of a policy of the paper's `--budget` search: run it on another model and
write its GGUF (`apply_policy`: `policy_path` a file, or a policyfile.Policy already opened).

The target is calibrated (or `--calib`), folded, and embedded with the policy's feature variant,
standardized over its own layers (Eq. 13). The actor then visits its tensors in model order with its mean
action a_i = tanh(mu(s_i)) (no sampling), dims 10-11 of s_{i+1} following the bits it chose. An allocation
that misses the budget is repaired (allocation.repair), then llama.cpp quantizes the folded file with the
calibration's importance matrix and the output carries ramp.* metadata.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramp_cpp import __version__
from ramp_cpp.allocate.budget import Budget, Measures, costs, repair
from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.llama.backend import RuntimeOptions

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ApplyConfig:
    budget: float = 4.25  # Eq. 20 ceiling, as in search
    margin: float = 0.25
    budget_mode: str = "weighted"
    fold: bool = True
    imatrix: bool = True
    base_type: str = "Q8_0"
    calib: CalibConfig = CalibConfig()


@dataclass
class ApplyResult:
    path: Path
    names: list[str]
    bits: list[int]
    types: dict[str, str]
    actions: list[float]
    measures: Measures
    policy_measures: Measures  # before repair
    n_repaired: int
    file_size: int


def apply_policy(
    policy_path: Any,
    model_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: ApplyConfig = ApplyConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    calib: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ApplyResult:
    from ramp_cpp.allocate.paper.search import policy_rollout
    from ramp_cpp.allocate.sac.policyfile import Policy, load_policy
    from ramp_cpp.calibration.artifact import check_matches, load_calibration
    from ramp_cpp.calibration.collect import calibrate
    from ramp_cpp.calibration.features import FeatureConfig, compute_features
    from ramp_cpp.fold.folding import fold
    from ramp_cpp.fold.source import staged, visited_tensors
    from ramp_cpp.llama.ggufio import add_metadata, read_inventory, weight_moments
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
    from ramp_cpp.store.atomic import check_output
    from ramp_cpp.store.texts import load_text

    def stage(name: str) -> Callable[[int, int], None] | None:
        return staged(progress, name)

    out = check_output(dst, force)
    pol = policy_path if isinstance(policy_path, Policy) else load_policy(policy_path)  # opened once
    if pol.meta.get("kind") == "sized":
        from ramp_cpp.errors import RampError

        raise RampError(f"{policy_path}: a policy of the --size search; apply it with --size")
    budget = Budget(cfg.budget, cfg.margin, cfg.budget_mode)
    original = read_inventory(model_path)
    include_embeddings = bool(pol.meta.get("include_embeddings", False))
    # Feasibility depends only on the tensor shapes and the ladder, which folding keeps: refuse a hopeless
    # budget before calibrating and folding (minutes on a real model).
    visited = visited_tensors(original, include_embeddings)
    costs(original, visited, pol.bits, cfg.base_type).check_budget(budget)
    if calib is not None:
        cal: Calibration = load_calibration(calib)
        check_matches(cal, original)
    else:
        cal = calibrate(model_path, load_text(cfg.calib.text)[0], cfg.calib, opts, stage("calibrate"))
    with tempfile.TemporaryDirectory(prefix="ramp-apply-", dir=out.parent) as td:
        src = Path(model_path)
        if cfg.fold:
            fres = fold(model_path, cal, Path(td) / "folded.f16.gguf", force=True, progress=stage("fold"))
            src, cal = Path(fres.path), fres.calibration
        model = read_inventory(src)
        visited = visited_tensors(model, include_embeddings)
        moments = weight_moments(src, [t.name for t in visited])
        feats = compute_features(model, moments, cal, FeatureConfig(variant=pol.variant), visited)
        c = costs(model, visited, pol.bits, cfg.base_type)
        c.check_budget(budget)
        actions, rungs = policy_rollout(pol.actor, feats, pol.bits)
        before = c.measures(rungs)
        fixed = repair(rungs, actions, c, budget)
        n_rep = sum(a != b for a, b in zip(rungs, fixed, strict=True))
        types = c.types_of(fixed)
        m = c.measures(fixed)
        tmp_q = Path(td) / "quantized.gguf"
        qopts = QuantizeOptions(imatrix=cal.imatrix() if cfg.imatrix else None, n_threads=opts.n_threads)
        quantize_map(src, tmp_q, types, cfg.base_type, qopts)
        meta: dict[str, Any] = {
            "ramp.version": __version__,
            "ramp.budget": float(cfg.budget),
            "ramp.budget_mode": cfg.budget_mode,
            "ramp.bpw": float(m.bpw),
            "ramp.bpw_nominal": float(m.bpw_nominal),
            "ramp.tensor_names": list(c.names),
            "ramp.tensor_bits": [int(c.bits[r]) for r in fixed],
            "ramp.tensor_types": [types[n] for n in c.names],
            "ramp.scale_folding": bool(cfg.fold),
            "ramp.calibration": cal.describe(),
            "ramp.imatrix": bool(cfg.imatrix),
            "ramp.policy_sha256": pol.sha256,
            "ramp.episodes": int(pol.meta.get("episodes", 0)),
            "ramp.best_reward": float(pol.meta.get("best_reward") or 0.0),
            "ramp.metric": str(pol.meta.get("search", {}).get("metric", "")),
            "ramp.search_text": str(pol.meta.get("search", {}).get("text", "")),
            "ramp.transfer_from": str(pol.meta.get("source", {}).get("model", "")),
            "ramp.repaired_tensors": int(n_rep),
        }
        add_metadata(tmp_q, out, meta, force=force)
    return ApplyResult(
        path=out,
        names=list(c.names),
        bits=[int(c.bits[r]) for r in fixed],
        types=types,
        actions=actions,
        measures=m,
        policy_measures=before,
        n_repaired=n_rep,
        file_size=out.stat().st_size,
    )
