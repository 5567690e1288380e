"""The sized run's last stage: what it writes beside its GGUF. allocation.json (the summary and one row per
searched tensor), report.json (meta, summary, and the points: the presets and this run), pareto.png
(report.py's figure of the points; with --gpu-size the summary's "gpu": the written file's GPU-resident bytes
and the KV cache beside the cap), and what publishing the file needs (card.py): the recipe stock
llama-quantize remakes it with (tensor-types.txt, imatrix.gguf) and the model card (README.md)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ramp_cpp.llama.evaluate import KLDResult
from ramp_cpp.llama.splitout import SplitOutput
from ramp_cpp.pipeline.card import publish
from ramp_cpp.pipeline.folddecision import FoldDecision
from ramp_cpp.pipeline.neverworse import PRESET, Verdict
from ramp_cpp.pipeline.plan import RunPlan
from ramp_cpp.pipeline.stages import Allocation, Measured, Presets, Written
from ramp_cpp.store.atomic import atomic_path


@dataclass(frozen=True)
class Reports:
    allocation: Path
    report: Path
    file_bytes: int
    gpu: dict[str, Any] | None = None  # summary "gpu" of a --gpu-size run (allocate/gpu.py)


def write_reports(
    plan: RunPlan, m: Measured, decision: FoldDecision, alloc: Allocation, out: Written, k: KLDResult,
    presets: Presets, costs: dict[str, Any] | None = None, verdict: Verdict | None = None,
    split: SplitOutput | None = None,
) -> Reports:
    """allocation.json, report.json and pareto.png in the run directory. The "ramp" point and summary's
    quality are the allocation's; `summary.written` says which file the run wrote (neverworse.py);
    `summary.split` its shards, when `split` (then `out.gguf` is the first and `file_bytes` the one file's,
    what the size budget counts)."""
    from ramp_cpp.pipeline.report import BASE_QUALITY, write_pareto

    cfg = plan.cfg
    file_bytes = out.gguf.stat().st_size if split is None else split.whole_bytes
    alloc_bytes = out.file_bytes or file_bytes
    label = f"{plan.method}{' (folded)' if m.folded else ''}"
    points = [
        *presets.points,
        {"label": label, "file_bytes": alloc_bytes, "quality": k.kld_mean, "ppl": k.ppl, "kind": "ramp"},
    ]
    rows = tensor_rows(m, out.choice)
    summary = {
        "model": Path(plan.model_path).name,
        "method": plan.method,
        "size": plan.size,
        "target_bytes": presets.target,
        "file_bytes": file_bytes,
        "bpw_file": 8 * file_bytes / plan.info.n_params_total,
        "bpw_searched": out.meta["ramp.bpw"],
        "predicted_error": out.meta["ramp.predicted_error"],
        "sensitivity": plan.sensitivity,
        "types": dict(Counter(r["type"] for r in rows).most_common()),
        "quality": {
            "metric": "kld",
            "kld": k.kld_mean,
            "ppl": k.ppl,
            "base_ppl": k.base_ppl,
            "text": cfg.text,
            "chunks": cfg.chunks,
        },
        "t_measure": m.seconds,
        "fold": {**decision.to_json(), **fold_exponents(m.source.info.metadata if decision.folded else {})},
        **alloc.summary,
        **({"written": verdict.to_json()} if verdict is not None else {}),
        **({"split": split.to_json()} if split is not None else {}),
    }
    if plan.gpu is not None:  # read back from the file written: the allocation's or the preset's
        from ramp_cpp.allocate.gpu import resident_bytes

        summary["gpu"] = plan.gpu.summary(resident_bytes(out.gguf))
    if m.groups is not None:
        # the calibrated sum is linear around the reference: KLD ≈ KLD_ref + Σ ratio · (error − error_highest)
        top = {t.name: t.options[-1].ggml_type for t in m.alloc_sens.tensors}
        sens = m.alloc_sens
        summary["predicted_kld"] = m.groups.reference_kld + sens.error(out.choice) - sens.error(top)
        summary["kld_groups"] = m.groups.to_json()
    if plan.ratios is not None:  # transferred: which models' measured groups scaled the proxy
        summary["ratio_sources"] = list(plan.ratios.sources)
    allocation = plan.run_dir / "allocation.json"
    with atomic_path(allocation, force=True) as tmp:
        tmp.write_text(json.dumps({**summary, "tensors": rows}, indent=2))
    report = plan.run_dir / "report.json"
    cc = plan.cc
    rmeta = {
        "model": Path(plan.model_path).name,
        BASE_QUALITY: 0.0,
        "search": cfg.to_json(),
        "fold": str(plan.fold),
        "candidates": asdict(cc) | {"types": [t.name for t in cc.requested()], "base": cc.base.name},
    }
    with atomic_path(report, force=True) as tmp:
        tmp.write_text(
            json.dumps(
                {"meta": rmeta, "summary": summary, "points": points, **({"costs": costs} if costs else {})},
                indent=2, default=str,
            )
        )
    write_pareto(plan.run_dir, points, "kld", rmeta)
    preset_written = verdict is not None and verdict.written == PRESET
    # the preset's file is llama.cpp's own from the model as given, with the unfolded model's imatrix
    if preset_written:
        source, cal = Path(plan.model_path), m.source.base_cal
    else:
        source, cal = m.source.path, m.source.cal
    publish(plan.run_dir, out.gguf, source, cal, json.loads(report.read_text()), rows, split)
    return Reports(allocation, report, file_bytes, summary.get("gpu"))


def fold_exponents(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The folded file's exponent (ramp.fold.power) and, per norm group, the one it took (ramp.fold.powers,
    in fold order) with how many groups took each; {} for a file folded before they were recorded."""
    from ramp_cpp.fold.folding import KEY_POWER, KEY_POWERS

    if KEY_POWER not in metadata:
        return {}
    powers = [float(p) for p in str(metadata.get(KEY_POWERS, "")).split(",") if p]
    counts = Counter(powers)
    return {"power": metadata[KEY_POWER], "powers": powers,
            "power_counts": {f"{p:g}": counts[p] for p in sorted(counts)}}


def tensor_rows(m: Measured, choice: dict[str, Any]) -> list[dict[str, Any]]:
    """allocation.json's rows: each searched tensor's type, bytes, parameters and proxy error (and the
    rescaled error the allocator read, with the measured sensitivity)."""
    return [
        {
            "name": t.name,
            "type": choice[t.name].name,
            "bytes": t.option(choice[t.name]).nbytes,
            "n_params": t.n_params,
            "error": t.option(choice[t.name]).error,
            **({"scaled_error": s.option(choice[t.name]).error} if m.groups is not None else {}),
        }
        for t, s in zip(m.sens.tensors, m.alloc_sens.tensors, strict=True)
    ]
