"""What a sized run is asked to do, as one frozen object from the command line's edge to `plan.plan_run` and
`run.run_direct` (`SizedRequest`), the default rule of its fold setting (`default_fold`; the setting itself is
folddecision.Fold) and the callbacks a run reports through (`Hooks`). `search --size` and `apply` of a sized
policy build the same request with the same defaults (`search_request`); the library's own defaults
(SizedRequest's) stay those of the benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ramp_cpp.allocate.sac.search import SizedSearchConfig
from ramp_cpp.costs import StageCost
from ramp_cpp.errors import RampError
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.folddecision import Fold, parse_fold
from ramp_cpp.pipeline.sizedconfig import (
    DEFAULTS,
    SEARCH_FOLD,
    SEARCH_GROUPS,
    SEARCH_RECIPE,
    SEARCH_ROW_SAMPLE,
    SizedConfig,
)

#: the sensitivities that cost no evaluation (uniform's None reads no error at all)
ZERO_EVAL = (None, "proxy", "transferred")


def default_fold(sensitivity: str | None, otherwise: Fold = Fold.CHECK, method: str = "policy") -> Fold:
    """The fold a request gets when it names none: `on` when nothing else in the run evaluates (a
    sensitivity in ZERO_EVAL and an allocator that makes no evaluation of its own: any but the SAC search), so
    that a fold decision is not its only evaluations (folding won every measured decision on the benchmark
    models: docs/search.md); else `otherwise` (check: one allocation quantized from both models)."""
    return Fold.ON if sensitivity in ZERO_EVAL and method != "sac" else otherwise


@dataclass(frozen=True)
class Hooks:
    """What a run reports as it goes, all optional: `progress(stage, done, total)`, the SAC search's
    `on_episode(record)`, and `on_cost(StageCost)` as each stage ends."""

    progress: Callable[[str, int, int], None] | None = None
    on_episode: Callable[[dict[str, Any]], None] | None = None
    on_cost: Callable[[StageCost], None] | None = None


@dataclass(frozen=True)
class SizedRequest:
    """One sized run: allocate with `method` (plan.METHODS) the model at `model_path` to the whole-file
    `size` (bytes such as `95MiB`, or a llama.cpp preset's name for that preset's size with the same
    imatrix), in `run_dir`.

    `cfg`: reward text, chunks, imatrix and calibration recipe; `cc`: the candidate types; `calib`: a
    calibration artifact to reuse; `presets`: llama.cpp presets scored beside the result (the preset a
    `size` names is always scored: the never-worse rule compares with it); `sensitivity`: proxy, measured
    (None: measured) or transferred; `gcfg`: the group probes; `sac`: the SAC search; `policy`: the sized
    policy a `policy` run rolls out (a file, or one already loaded); `cache_root`: where the tensor cache and
    measurements live (default RUN/cache); `fold`: None for `default_fold`; `tensor_cache` and `row_sample`
    (plan.TENSOR_CACHES, proxy.MeasureConfig); `force_allocation`: write the allocation even when it scores
    worse than the preset of the same size. `gpu_bytes`: a second cap, in bytes, on what sits in GPU memory
    when the experts are offloaded (`-ot exps=CPU`, allocate/gpu.py): the GPU-resident tensors plus a KV
    cache of `kv_bytes`, or of `kv_ctx` tokens at F16 (at most one of the two; neither: no KV counted).
    `split_max`: write the GGUF as a split set of shards of at most that many bytes each (llama/splitout.py;
    None: one file); the size budget still counts the one file."""

    model_path: str | os.PathLike[str]
    run_dir: str | os.PathLike[str]
    method: str
    size: str
    cfg: SizedConfig = DEFAULTS
    cc: CandidateConfig = field(default_factory=CandidateConfig)
    calib: str | os.PathLike[str] | None = None
    presets: tuple[str, ...] = ("Q4_K_M", "Q3_K_M")
    sensitivity: str | None = "proxy"
    gcfg: GroupConfig = field(default_factory=GroupConfig)
    sac: SizedSearchConfig = field(default_factory=SizedSearchConfig)
    policy: Any = None  # a path, or a policyfile.Policy already loaded
    cache_root: str | os.PathLike[str] | None = None
    fold: Fold | None = None
    tensor_cache: str = "auto"
    row_sample: int = 1
    force_allocation: bool = False
    gpu_bytes: int | None = None
    kv_bytes: int | None = None
    kv_ctx: int | None = None
    split_max: int | None = None

    @property
    def fold_setting(self) -> Fold:
        """The fold this request runs with: its own, else on (the library's default; the commands' is
        `default_fold`'s)."""
        return Fold.ON if self.fold is None else parse_fold(self.fold)


SENSITIVITIES = ("proxy", "measured", "transferred")


def resolve_sensitivity(method: str, sensitivity: str | None) -> str | None:
    """The sensitivity `method` allocates on: None for uniform (it reads no error), else `sensitivity`
    (default: measured)."""
    if sensitivity is not None and sensitivity not in SENSITIVITIES:
        raise RampError(f"unknown sensitivity {sensitivity!r} (choose from {', '.join(SENSITIVITIES)})")
    if method == "uniform":
        return None
    return sensitivity or "measured"


def search_request(
    model: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    method: str,
    size: str,
    cfg: SizedConfig | None = None,
    sensitivity: str | None = None,
    fold: Fold | None = None,
    **more: Any,
) -> SizedRequest:
    """The request `search --size` makes, with its defaults (sizedconfig.SEARCH_*: the bench recipe, the
    cheaper group probes, the proxy on every 4th span of rows, the fold check), which `apply` of a sized
    policy makes too. `sensitivity` None: measured (none for uniform); `fold` None: `default_fold`'s rule;
    `more`: any other SizedRequest field (presets, sac, policy, calib, cc, tensor_cache, ...)."""
    from ramp_cpp.calibration.collect import load_recipe

    sens = resolve_sensitivity(method, sensitivity)
    cfg = cfg or SizedConfig(calib=load_recipe(SEARCH_RECIPE))
    fold = fold if fold is not None else default_fold(sens, SEARCH_FOLD, method)
    defaults: dict[str, Any] = {"gcfg": SEARCH_GROUPS, "row_sample": SEARCH_ROW_SAMPLE, "presets": ()}
    return SizedRequest(model, run_dir, method, size, cfg, sensitivity=sens, fold=fold, **(defaults | more))
