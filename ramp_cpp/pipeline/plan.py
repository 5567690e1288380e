"""A sized run's first stage: every cheap check of the request, before any work (`plan_run` → `RunPlan`).

A bad method, policy file, sensitivity (or --refine-probes with another than measured), --fold or --size, an
already-quantized model, a size this model's candidate types cannot reach (below the smallest file or above
the largest), a --gpu-size the GPU-resident tensors at their smallest types and the KV cache exceed
(allocate/gpu.py), a calibration recipe the model's context cannot hold, an unreadable reward text, a run
directory holding another request, or a disk or scratch space too small for what the run will write
(resources.py): each fails here, in this order, before anything is written. The plan carries what the checks
read (the model's inventory, the reward text, the run's settings) to the stages after it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ramp_cpp import __version__
from ramp_cpp.allocate.sac.search import MAY_CHANGE_ON_RESUME, SizedSearchConfig
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import ModelInfo
from ramp_cpp.measure import transfer
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.folddecision import Fold
from ramp_cpp.pipeline.request import SizedRequest, resolve_sensitivity
from ramp_cpp.pipeline.sizedconfig import SizedConfig, check_run

#: The methods whose allocation is learned (the SAC search, a trained policy's rollout), not computed.
LEARNED = ("sac", "policy")
#: Where the tensor cache's candidate types live (tensorcache module doc): on disk, made in memory when
#: asked, or auto: in memory, but on disk for the SAC search when the disk has room (its episodes change
#: every tensor, so each would quantize most of the model again; greedy's probes change one group).
TENSOR_CACHES = ("auto", "disk", "memory")
MIB = 1 << 20


@dataclass(frozen=True)
class RunPlan:
    """A checked request: what to allocate (`method`) at which whole-file `size` (`preset`: the llama.cpp
    preset it names, whose size `target` becomes once quantized; else `target` in bytes), on which model
    (`info`: its inventory, read once), with the reward `text` already loaded and the run.json `settings` the
    run directory will hold. `lo`/`hi`: the smallest and largest file the candidate types allow. `presets`:
    the presets the run scores, the one `size` names among them (the never-worse rule's reference)."""

    model_path: str | os.PathLike[str]
    run_dir: Path
    cache_root: Path
    method: str
    size: str
    preset: str | None
    target: int
    lo: int
    hi: int
    fold: Fold
    sensitivity: str | None  # proxy, measured, transferred, or None for uniform
    cfg: SizedConfig
    cc: CandidateConfig
    gcfg: GroupConfig
    sac: SizedSearchConfig
    policy: Any  # policyfile.Policy of method "policy", else None
    calib: str | os.PathLike[str] | None
    info: ModelInfo
    text: str
    settings: dict[str, Any]
    ratios: Any = None  # transfer.RatioTable of the transferred sensitivity, else None
    in_memory: bool = False  # the tensor cache keeps only the base type on disk (TENSOR_CACHES)
    row_sample: int = 1  # the proxy measures every k-th span of rows of a linear (proxy.MeasureConfig)
    presets: tuple[str, ...] = ()
    force_allocation: bool = False
    gpu: Any = None  # allocate.gpu.GpuCap of a --gpu-size request, else None

    def gpu_budget(self, sens: Any) -> Any:
        """The allocators' GPU cap (allocate.gpu.GpuBudget) for the searched tensors of `sens`, or None."""
        return None if self.gpu is None else self.gpu.budget(sens)

    @property
    def foldings(self) -> tuple[bool, ...]:
        """The folding choices the run prepares: both for auto and check (unfolded first), else the one asked
        for."""
        return self.fold.foldings

    @property
    def measured_first(self) -> tuple[bool, ...]:
        """The folding choices measured before the fold is decided: both for auto, the folded model for check
        (the unfolded one only if the check keeps it), else the one asked for."""
        return (True,) if self.fold is Fold.CHECK else self.foldings


def _policy(req: SizedRequest) -> Any:
    """The sized policy of a `policy` request, opened here unless the caller already did."""
    from ramp_cpp.allocate.sac.policyfile import Policy, load_sized_policy

    if req.policy is None:
        raise RampError("method 'policy' needs a policy file")
    return req.policy if isinstance(req.policy, Policy) else load_sized_policy(req.policy)


def plan_run(req: SizedRequest, jobs: int = 1) -> RunPlan:
    """Check the request (module docstring) and return it as a plan; reads, never writes. `jobs`: how many
    of the run's jobs may run at once on this machine (resources.disk_needs)."""
    from ramp_cpp.allocate.allocators import ALLOCATORS
    from ramp_cpp.allocate.budget import parse_size
    from ramp_cpp.calibration.collect import check_config
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.llama.quantize import check_source
    from ramp_cpp.pipeline.resources import check_plan_resources, disk_needs, fits
    from ramp_cpp.store.texts import load_text

    method, cfg, cc, sac = req.method, req.cfg, req.cc, req.sac
    if method not in (*ALLOCATORS, *LEARNED):
        raise RampError(f"unknown method {method!r} (choose from {', '.join([*ALLOCATORS, 'sac'])})")
    if req.row_sample < 1:
        raise RampError(f"--row-sample must be at least 1 (every row), got {req.row_sample}")
    if req.split_max is not None and req.split_max < 1:
        raise RampError(f"--split-max-size must be a positive size, got {req.split_max} bytes")
    if req.tensor_cache not in TENSOR_CACHES:
        raise RampError(
            f"unknown --tensor-cache {req.tensor_cache!r} (choose from {', '.join(TENSOR_CACHES)})"
        )
    pol = _policy(req) if method == "policy" else None  # a bad file fails before any work
    sensitivity = resolve_sensitivity(method, req.sensitivity)
    if req.gcfg.refine_evaluations and sensitivity != "measured":
        raise RampError(
            "--refine-probes refines the measured sensitivity's group probes; this run's sensitivity is "
            f"{sensitivity or 'none (uniform)'}"
        )
    ratios = transfer.load() if sensitivity == "transferred" else None  # a damaged table fails here
    fold = req.fold_setting
    preset = preset_name(req.size)
    target = 0 if preset else parse_size(req.size)
    info = read_inventory(req.model_path)  # the one read of the model's inventory: the stages get it here
    check_source(info, hint=" (search has no --allow-requantize: it measures against this file)")
    lo, hi = size_range(info, cc)
    if not preset:
        check_target(target, lo, hi, f"--size {req.size}")
    gpu = _gpu_cap(req, info, cc)
    if req.calib is None:
        check_config(cfg.calib, info.context_length or None)
    text, _ = load_text(cfg.text)
    rd = Path(req.run_dir)
    settings = run_settings(req, sensitivity, fold, pol, ratios) | ({"gpu": gpu.settings()} if gpu else {})
    check_run(rd, settings)
    croot = Path(req.cache_root) if req.cache_root is not None else rd / "cache"
    in_memory = req.tensor_cache == "memory" or (
        req.tensor_cache == "auto"
        and (method != "sac" or not fits(disk_needs(info, cc, fold, hi, rd, croot, jobs), rd))
    )
    check_plan_resources(info, cc, fold, hi, rd, croot, jobs, in_memory, req.split_max is not None)
    presets = tuple(dict.fromkeys([*req.presets, *([preset] if preset else [])]))
    return RunPlan(
        req.model_path, rd, croot, method, req.size, preset, target, lo, hi, fold, sensitivity, cfg, cc,
        req.gcfg, sac, pol, req.calib, info, text, settings, ratios, in_memory, req.row_sample, presets,
        req.force_allocation, gpu,
    )


def _gpu_cap(req: SizedRequest, info: ModelInfo, cc: CandidateConfig) -> Any:
    """The request's --gpu-size resolved against the model (allocate/gpu.py), refused when the GPU-resident
    tensors at their smallest types plus the KV cache exceed it; None without one."""
    from ramp_cpp.allocate.gpu import gpu_cap, kv_cache_bytes

    kv_named = req.kv_bytes is not None or req.kv_ctx is not None
    if req.gpu_bytes is None:
        if kv_named:
            raise RampError("--kv-size and --kv-ctx count a KV cache against --gpu-size: name --gpu-size too")
        return None
    if req.method in LEARNED:
        raise RampError(
            f"--gpu-size applies to --method greedy or uniform; the {req.method} method's projection knows "
            "only the whole-file --size"
        )
    if req.kv_bytes is not None and req.kv_ctx is not None:
        raise RampError("name the KV cache once: --kv-size (bytes) or --kv-ctx (tokens), not both")
    if req.kv_ctx is not None:
        kv, kv_from = kv_cache_bytes(req.model_path, req.kv_ctx), f"--kv-ctx {req.kv_ctx} at F16"
    elif req.kv_bytes is not None:
        kv, kv_from = req.kv_bytes, "--kv-size"
    else:
        kv, kv_from = 0, "no KV cache named"
    return gpu_cap(info, cc, req.gpu_bytes, kv, kv_from, req.cfg.imatrix)


def run_settings(
    req: SizedRequest, sensitivity: str | None, fold: Fold, pol: Any = None, ratios: Any = None
) -> dict[str, Any]:
    """The run.json of a request (sizedconfig.check_run compares two). Keys that a run directory made
    before an option existed lacks are written only when the option is not at its old value, so that such
    a directory keeps matching."""
    # the number of evaluations may grow between runs (a resumed search goes on); everything else must match
    grow = {k: v for k, v in req.sac.to_json().items() if k not in MAY_CHANGE_ON_RESUME}
    if grow["rollouts"] == 1:  # what every run was before rounds existed
        del grow["rollouts"]
    return {
        "ramp_version": __version__,
        "model_path": str(Path(req.model_path).resolve()),
        "method": req.method,
        "size": req.size,
        "fold": str(fold),
        "search": req.cfg.to_json(),
        "candidates": req.cc.key(),
        **({"sensitivity": sensitivity, "kld_groups": _groups_key(req.gcfg)} if sensitivity == "measured"
           else {"sensitivity": sensitivity} if sensitivity == "transferred" else {}),
        **({"sac": grow} if req.method == "sac" else {"policy_sha256": pol.sha256} if pol else {}),
        **({"ratios": transfer.to_json(ratios)["records"]} if ratios is not None else {}),
        **({"row_sample": req.row_sample} if req.row_sample > 1 else {}),
    }


def _groups_key(gcfg: GroupConfig) -> dict[str, Any]:
    """run.json's kld_groups: `chunks` and `refine_evaluations` only when set, so run directories made before
    them keep matching."""
    d = asdict(gcfg)
    if d["chunks"] is None:
        del d["chunks"]
    if not d["refine_evaluations"]:
        del d["refine_evaluations"]
    return d


def preset_name(spec: str) -> str | None:
    """`spec` as a llama.cpp preset name (Q4_K_M, ...) when it is one."""
    from ramp_cpp.llama.quantize import presets

    key = spec.strip().upper()
    return key if key in presets() else None


def size_range(info: Any, cc: CandidateConfig) -> tuple[int, int]:
    """Whole-file bytes with every searched tensor at its smallest / largest candidate, from the inventory
    alone (the source's header stands in for the output's, a few hundred bytes apart): enough to refuse a
    hopeless --size before calibrating."""
    from ramp_cpp.measure.candidates import searched_tensors, tensor_candidates
    from ramp_cpp.model.arch import quantizable
    from ramp_cpp.model.ladder import tensor_nbytes, type_from_name, written_type

    def padded(n: int) -> int:
        return -(-n // info.alignment) * info.alignment

    searched = searched_tensors(info, cc.embeddings)
    names = {t.name for t in searched}
    fixed = info.data_offset + info.other_bytes
    for t in info.tensors:
        if t.name not in names:
            tt = written_type(cc.base, t.n_per_row) if quantizable(t.name, 2) else type_from_name(t.ggml_type)
            fixed += padded(tensor_nbytes(tt, t.n_params))
    lo = hi = fixed
    for t in searched:
        sizes = [padded(tensor_nbytes(w, t.n_params)) for _, w in tensor_candidates(cc, t, True)]
        if not sizes:
            raise RampError(f"{t.name}: no candidate type fits its rows of {t.n_per_row} weights")
        lo, hi = lo + min(sizes), hi + max(sizes)
    return lo, hi


def check_target(target: int, lo: int, hi: int, what: str) -> None:
    """Refuse a target outside the files the candidate types allow (a little slack for the header)."""
    slack = 1 << 16  # the output's header differs a little from the source's
    if target > hi + slack:
        raise RampError(
            f"{what} ({target / MIB:.2f} MiB) is above the largest file the candidate types allow "
            f"({hi / MIB:.2f} MiB, every searched tensor at its largest type): ask for at most that"
        )
    if target < lo - slack:
        raise RampError(
            f"{what} ({target / MIB:.2f} MiB) is below the smallest file the candidate types allow "
            f"({lo / MIB:.2f} MiB; feasible range {lo / MIB:.2f}-{hi / MIB:.2f} MiB)"
        )
