"""`apply`: a trained policy rolled out zero-shot on another model, dispatched here by the policy's kind (the
file is opened once, by `open_apply`):

- a sized policy (`search --method sac --size`, or one trained across models) runs as a sized run with
  method `policy` (run.run_direct): the same stages, defaults and fold rule as `search --size`
  (request.search_request), in a named run folder (default: beside the output, `OUT.run/`) that the same
  command resumes after a kill; the GGUF is moved to the output at the end, and the never-worse rule holds;
- a policy of the paper's `--budget` search runs as the paper applies it (paper/apply.py), at a bit budget.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.splitout import SplitOutput, check_split_output, move_set, write_split
from ramp_cpp.pipeline.folddecision import Fold
from ramp_cpp.pipeline.request import Hooks, SizedRequest, search_request
from ramp_cpp.pipeline.sizedconfig import SEARCH_RECIPE, SizedConfig

#: the calibration recipe of a --budget policy's apply: the paper's, as its search calibrated
PAPER_RECIPE = "paper"


@dataclass(frozen=True)
class ApplyRequest:
    """`apply POLICY MODEL`: at a whole-file `size` (a sized policy) or a bit `budget` (a --budget policy);
    `output` (default MODEL.ramp-SIZE.gguf beside MODEL) and, for a sized policy, its run folder `run_dir`
    (default: OUTPUT's name with .run for .gguf, beside it). `text`, `recipe` (None: bench for a sized policy,
    paper for a --budget one), `calib`, `imatrix` and `fold` (None: the search's rule) as for `search`;
    `sensitivity` (None: the one the policy was trained with); `force`: overwrite the output;
    `force_allocation`: keep the policy's file even where the preset of the same size scores better;
    `split_max`: write the output as a split set of shards of at most that many bytes (OUTPUT less .gguf,
    then -00001-of-0000N.gguf); `types`: a sized policy's candidate types, as `search --types` takes them
    (the policy acts in bits per weight, so it rolls out on any set); `beside`: the folder the default
    output goes in when it is not MODEL's own: where MODEL is a checkpoint folder's conversion, the
    folder's parent, since the conversion lives in the cache (still named after MODEL: FOLDER.ramp-SIZE.gguf,
    the name `search` gives it in its run folder)."""

    policy: str | os.PathLike[str]
    model: str | os.PathLike[str]
    size: str | None = None
    budget: float | None = None
    budget_mode: str = "weighted"
    output: Path | None = None
    run_dir: Path | None = None
    text: str = "wikitext2-valid"
    recipe: str | None = None
    calib: str | os.PathLike[str] | None = None
    imatrix: bool = True
    fold: Fold | None = None
    sensitivity: str | None = None
    force: bool = False
    force_allocation: bool = False
    split_max: int | None = None
    types: str | None = None  # a sized policy's candidate types (candidates.parse_types; None: the full set)
    beside: Path | None = None


@dataclass(frozen=True)
class Opened:
    """An apply request with its policy opened: `sized` (the run's SizedRequest, for a sized policy) or
    `policy` alone (a --budget policy), and the output path."""

    req: ApplyRequest
    policy: Any  # policyfile.Policy
    output: Path
    sized: SizedRequest | None


def open_apply(req: ApplyRequest) -> Opened:
    """Open the policy (once) and check the request against its kind, before any work."""
    from ramp_cpp.allocate.sac.policyfile import check_sized, is_sized, load_policy
    from ramp_cpp.fold.source import ramp_output_name

    pol = load_policy(req.policy)
    label = "".join(req.size.split()) if req.size else f"{4.25 if req.budget is None else req.budget:g}"
    output = req.output or (req.beside or Path(req.model).parent) / ramp_output_name(req.model, label)
    if not is_sized(pol.meta):
        if req.run_dir is not None or req.force_allocation or req.types is not None:
            raise RampError(
                f"{req.policy}: a policy of the --budget search writes no run folder, has no preset of "
                "its size to lose to and takes the paper's ladder (K-quants, Q8_0: no IQ type); --out, "
                "--force-allocation and --types apply to a sized one"
            )
        if req.fold is not None and req.fold.decided_by_run:
            raise RampError(f"--fold {req.fold} applies to a sized policy; a --budget policy takes on or off")
        return Opened(req, pol, output, None)
    if req.size is None or req.budget is not None:
        raise RampError(f"{req.policy} was trained at a whole-file size: give --size (e.g. Q4_K_M or 95MiB)")
    check_sized(pol, req.policy)
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.measure.candidates import CandidateConfig, parse_types

    cc = CandidateConfig(types=parse_types(req.types)) if req.types is not None else CandidateConfig()
    # the rollout's state reads the sensitivity: apply with the one the policy learned on
    sens = req.sensitivity or str(pol.meta.get("sensitivity", "measured"))
    cfg = SizedConfig(text=req.text, imatrix=req.imatrix, calib=load_recipe(req.recipe or SEARCH_RECIPE))
    run_dir = req.run_dir or output.parent / (output.name.removesuffix(".gguf") + ".run")
    sized = search_request(
        req.model,
        run_dir,
        "policy",
        req.size,
        cfg,
        sens,
        req.fold,
        policy=pol,
        calib=req.calib,
        force_allocation=req.force_allocation,
        split_max=req.split_max,
        cc=cc,
    )
    return Opened(req, pol, output, sized)


@dataclass(frozen=True)
class Applied:
    """What `apply` wrote: the output (a split set's first shard) and, for a sized policy, the run
    (run.DirectResult) or, for a --budget policy, paper/apply.py's ApplyResult and the split set, if any."""

    output: Path
    sized: Any = None
    paper: Any = None
    split: SplitOutput | None = None


def run_apply(
    opened: Opened,
    opts: RuntimeOptions = RuntimeOptions(),
    hooks: Hooks = Hooks(),
    executor: Executor | None = None,
) -> Applied:
    """Run an opened apply request: the sized run, its GGUF moved onto the output at the end (the run folder
    keeps the rest, so the same command resumes), or the paper's apply."""
    from ramp_cpp.store.atomic import atomic_path, check_output

    req = opened.req
    split = req.split_max
    check = check_output if split is None else check_split_output
    dst = check(opened.output, req.force)
    if opened.sized is None:
        if split is None:
            return Applied(dst, paper=_paper_apply(opened, dst, opts, hooks))
        paper, shards = write_split(lambda p: _paper_apply(opened, p, opts, hooks), dst, split, req.force)
        return Applied(shards.first, paper=paper, split=shards)
    from ramp_cpp.pipeline.run import run_direct

    r = run_direct(opened.sized, opts, hooks, executor)
    if r.split is not None:
        paths = tuple(move_set(r.split.paths, dst, req.force))
        moved = replace(r.split, paths=paths)
        return Applied(paths[0], sized=replace(r, gguf=paths[0], split=moved), split=moved)
    with atomic_path(dst, force=req.force) as tmp:
        shutil.move(r.gguf, tmp)
    return Applied(dst, sized=replace(r, gguf=dst))


def _paper_apply(opened: Opened, dst: Path, opts: RuntimeOptions, hooks: Hooks) -> Any:
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.pipeline.paper.apply import ApplyConfig, apply_policy
    from ramp_cpp.pipeline.paper.run import resolve_budget

    req = opened.req
    b, mode = resolve_budget(req.model, req.budget, req.budget_mode, req.size)
    cfg = ApplyConfig(
        budget=b,
        budget_mode=mode,
        fold=req.fold is not Fold.OFF,
        imatrix=req.imatrix,
        calib=load_recipe(req.recipe or PAPER_RECIPE),
    )
    return apply_policy(
        opened.policy, req.model, dst, cfg, opts, calib=req.calib, force=req.force, progress=hooks.progress
    )
