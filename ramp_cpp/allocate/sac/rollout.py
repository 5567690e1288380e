"""One episode of the sized search: what the policy sees for each tensor, how its action becomes a GGUF type,
and the projection onto the whole-file budget. `search --method sac` (training) and `apply` (a trained
policy, zero-shot) both go through `rollout`, so they cannot drift apart.

Action. a_i in [-1, 1] is a deviation from the budget's average bits per weight over the searched tensors,

    bpw_i = target_bpw + span · a_i,    t_i = candidates.type_for_bpw(options_i, bpw_i)

(target_bpw = 8 · (budget_bytes − fixed_bytes) / Σ n_params of the searched tensors), so a_i = 0 everywhere
is "uniform at this budget" and the same policy means the same thing at every budget and on every model.
The allocation is then projected onto the budget (`allocate.project`): every episode is a usable candidate
within the file size asked for, and what is stored for learning is the executed action
a_i = (bpw(t_i) − target_bpw) / span of the projected type, not the sampled one.

State (`variant="ramp"`, 13 dims): the 9 static layer-embedding dims of Table 24 (`features.py`, standardized
per model, Eq. 13), then what the paper's state lacks:

    10  target_bpw / 8                                           the budget
    11  8 · (B − bytes so far) / params left / 8                 budget left per parameter left
    12  8 · bytes so far / params so far / 8                     real bits so far (0 for the first tensor)
    13  standardized log10 of the tensor's marginal error per byte around target_bpw (the sensitivity
        artifact's errors: what greedy ranks tensors by)

where B = budget_bytes − fixed_bytes. `variant="paper"` keeps Table 24 exactly: the 9 static dims, then
previous bits / 8 and running average bits / 8 (of the types' real bits per weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.allocate.allocators import Choice, project
from ramp_cpp.calibration.features import N_STATIC
from ramp_cpp.errors import RampError
from ramp_cpp.measure.candidates import type_for_bpw
from ramp_cpp.measure.sensitivity import Sensitivity, TensorOptions
from ramp_cpp.model.ladder import bits_per_weight

VARIANTS = {"ramp": N_STATIC + 4, "paper": N_STATIC + 2}
# Actions stay inside the open interval: atanh of a stored ±1 would be infinite in the actor's log-density.
_EDGE = 1.0 - 1e-3

Policy = Callable[[np.ndarray], float]  # state -> action in [-1, 1]


def marginal_feature(sens: Sensitivity, target_bpw: float) -> np.ndarray:
    """log10 of each tensor's error drop per byte across its options nearest `target_bpw` (one step down to
    one step up), standardized over the model: only the ranking greedy sees matters, not the units, which
    differ from model to model."""
    raw = []
    for t in sens.tensors:
        opts = t.options
        k = [o.ggml_type for o in opts].index(type_for_bpw(opts, target_bpw))
        lo, hi = opts[max(k - 1, 0)], opts[min(k + 1, len(opts) - 1)]
        if lo is hi:  # a single option: nothing to gain
            raw.append(-30.0)
            continue
        slope = (lo.error - hi.error) / (hi.nbytes - lo.nbytes)
        raw.append(math.log10(max(slope, 1e-30)))
    x = np.asarray(raw)
    return (x - x.mean()) / (x.std() + 1e-8)


@dataclass(frozen=True)
class Context:
    """Everything an episode needs about one model and one budget."""

    sens: Sensitivity
    z: np.ndarray  # (n_tensors, N_STATIC) standardized static layer embeddings, rows in sens.tensors order
    budget_bytes: int
    span: float = 3.0  # bits per weight of a full action (a = ±1)
    variant: str = "ramp"
    projection: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise RampError(f"unknown state variant {self.variant!r} (choose from {', '.join(VARIANTS)})")
        if self.z.shape != (len(self.sens.tensors), N_STATIC):
            raise RampError(f"layer embeddings of shape {self.z.shape} for {len(self.sens.tensors)} tensors")
        if self.span <= 0:
            raise RampError("the action span must be positive")
        if self.budget_bytes < self.sens.min_bytes():
            project(self.sens, {}, self.budget_bytes)  # raises the allocators' one-line range error

    @property
    def obs_dim(self) -> int:
        return VARIANTS[self.variant]

    @property
    def searched_params(self) -> int:
        return sum(t.n_params for t in self.sens.tensors)

    @property
    def target_bpw(self) -> float:
        return 8.0 * (self.budget_bytes - self.sens.fixed_bytes) / self.searched_params

    def type_of(self, t: TensorOptions, a: float) -> GGMLQuantizationType:
        return type_for_bpw(t.options, self.target_bpw + self.span * float(a))

    def action_of(self, ggml_type: GGMLQuantizationType) -> float:
        a = (bits_per_weight(ggml_type) - self.target_bpw) / self.span
        return float(np.clip(a, -_EDGE, _EDGE))


@dataclass(frozen=True)
class Rollout:
    proposed: Choice  # the policy's types, before projection
    choice: Choice  # what is evaluated: projected when ctx.projection
    actions: np.ndarray  # (n,) executed actions of `choice`'s types
    states: np.ndarray  # (n, obs_dim) states along `choice`


class _Walk:
    """The running state of one pass over the tensors."""

    def __init__(self, ctx: Context, marginal: np.ndarray) -> None:
        self.ctx, self.marginal = ctx, marginal
        self.budget = ctx.budget_bytes - ctx.sens.fixed_bytes
        self.total = ctx.searched_params
        self.bytes = 0
        self.params = 0
        self.prev = 0.0
        self.avg = 0.0
        self.i = 0

    def state(self) -> np.ndarray:
        c, i = self.ctx, self.i
        if c.variant == "paper":
            dyn = [self.prev / 8.0, self.avg / 8.0]
        else:
            left = max(self.total - self.params, 1)
            so_far = 8.0 * self.bytes / self.params if self.params else 0.0
            dyn = [
                c.target_bpw / 8.0,
                8.0 * (self.budget - self.bytes) / left / 8.0,
                so_far / 8.0,
                float(self.marginal[i]),
            ]
        return np.concatenate([c.z[i], dyn]).astype(np.float32)

    def step(self, t: TensorOptions, ggml_type: GGMLQuantizationType) -> None:
        b = bits_per_weight(ggml_type)
        self.bytes += t.option(ggml_type).nbytes
        self.params += t.n_params
        self.avg = (self.avg * self.i + b) / (self.i + 1)
        self.prev = b
        self.i += 1


def states_along(ctx: Context, choice: Choice, marginal: np.ndarray | None = None) -> np.ndarray:
    """The states an episode executing `choice` passes through."""
    m = marginal_feature(ctx.sens, ctx.target_bpw) if marginal is None else marginal
    w = _Walk(ctx, m)
    out = []
    for t in ctx.sens.tensors:
        out.append(w.state())
        w.step(t, choice[t.name])
    return np.stack(out)


def rollout(ctx: Context, policy: Policy) -> Rollout:
    """Visit the tensors in model order, each state following the types chosen so far; project; return the
    executed episode."""
    m = marginal_feature(ctx.sens, ctx.target_bpw)
    w = _Walk(ctx, m)
    proposed: Choice = {}
    for t in ctx.sens.tensors:
        ty = ctx.type_of(t, policy(w.state()))
        proposed[t.name] = ty
        w.step(t, ty)
    choice = project(ctx.sens, proposed, ctx.budget_bytes) if ctx.projection else proposed
    return executed(ctx, choice, proposed, m)


def executed(
    ctx: Context, choice: Choice, proposed: Choice | None = None, marginal: np.ndarray | None = None
) -> Rollout:
    """An episode that executes `choice` (e.g. greedy's allocation, for the warm start)."""
    acts = np.array([ctx.action_of(choice[t.name]) for t in ctx.sens.tensors], np.float32)
    return Rollout(proposed or choice, choice, acts, states_along(ctx, choice, marginal))
