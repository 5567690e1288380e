"""One sized policy trained across several models and budgets (issue 23): SAC on the rollout of `rollout.py`,
each episode on one *task* (a model at a whole-file budget) in turn, so that the policy learns what holds
across models rather than one model's allocation.

A task's state reads only what costs no evaluation on a new model: `Task.ctx.sens` is the proxy sensitivity
(state dim 13, the marginal error per byte, and the projection onto the budget read it) and `Task.ctx.z`
the static layer embeddings. The policy trained here is then applied by `apply --sensitivity proxy` with no
KLD probe: the rollout it is trained on is the rollout it is applied with.

The reward is the task's `judge` (`Score`): on the training models, the allocation's KLD predicted by their
*measured* sensitivity, the proxy rescaled by each model's group probes (KLD through llama.cpp on the reward
chunks, additive within 2-3% on the pairs `groups.py` checks). Ours, against the per-episode llama.cpp
evaluation of `search.py`: a policy across 2-3 models needs thousands of episodes, about a day of
evaluations per model on this machine, while the measured sensitivity prices any allocation in
milliseconds; the held-out KLD of the written file, through llama.cpp, then decides (`bench/compare.py`).

Per episode, as in `search.py` (relative reward, terminal transitions, entropy at one rung):

    R = ln(judge(reference) / judge(choice))

with `reference` the task's a = 0 episode (`zero_action`: every tensor at its candidate nearest the target's
bits, projected onto the budget), so R > 0 means better than the policy's own starting point. It is not the
`uniform` allocator (which fills the leftover bytes in model order): by the benchmark models' measured
sensitivities a = 0 is 1.17-1.45x the measured greedy's ΔKLD on SmolLM2 and Qwen, better than `uniform`, but
31x on Gemma at Q4_K_M's size, where it leaves the tied embedding low. The actor is warm-started at a = 0
(behaviour cloning on each task's a = 0 episode), so training moves only where the tasks reward it.

Ours: with `normalize`, R is stored standardized per task, (R − mean_i) / std_i over task i's returns so far
(its reference's 0 included). R alone does not share a scale across tasks: on the benchmark models it spans
about ±0.2 on SmolLM2 and Qwen and reaches +3.4 on Gemma (whose a = 0 episode is far from its best), so the
critics' regression, and with it the actor's gradient, would be Gemma's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ramp_cpp.allocate.allocators import Choice
from ramp_cpp.allocate.sac.agent import SAC, SACConfig, clone_actor
from ramp_cpp.allocate.sac.policyfile import sized_meta
from ramp_cpp.allocate.sac.rollout import Context, Rollout, rollout
from ramp_cpp.errors import RampError

Score = Callable[[Choice], float]
OnEpisode = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class AcrossConfig:
    """Training settings; the agent is `search.py`'s (terminal transitions, entropy at one rung)."""

    episodes: int = 1500
    # the judge costs milliseconds, the updates most of an episode's time: 8 per episode (~0.1 s here with
    # the smaller critics below) replay the ~200 transitions of an episode about 5 times over
    updates_per_episode: int = 8
    explore_std: float = 0.3  # about one candidate type (search.py)
    init_alpha: float = 0.01  # α·H below the O(0.01-0.1) reward differences (search.py)
    bc_steps: int = 300
    bc_lr: float = 1e-3
    span: float = 3.0
    # Table 27's 512-512-256 costs ~25 ms per update on 2 cores; 15k updates of it would be ~6 min per
    # policy, and the leave-one-out table trains four
    hidden: tuple[int, ...] = (256, 256)
    normalize: bool = True  # each task's returns standardized (module docstring)
    # every N episodes the mean action is rolled out on every task; the actor with the best mean R so far
    # (the warm start's, R = 0 everywhere, first) is the result: without it the last actor was worse than
    # uniform on 7 of its 12 training tasks (Qwen at Q3_K_M's size: R = −1.96)
    select_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.updates_per_episode < 0:
            raise RampError("training across models needs episodes >= 1 and updates_per_episode >= 0")
        if self.select_every < 1:
            raise RampError("select_every must be >= 1")
        if not self.explore_std > 0 or not self.span > 0:
            raise RampError("explore_std and span must be positive")

    def agent(self) -> SACConfig:
        return SACConfig(
            gamma=0.0,
            target_entropy=0.5 * math.log(2 * math.pi * math.e * self.explore_std**2),
            init_alpha=self.init_alpha,
            warmup_episodes=0,
            episodes=self.episodes,
            updates_per_episode=self.updates_per_episode,
            hidden=tuple(self.hidden),
            seed=self.seed,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """One model at one whole-file budget: the zero-evaluation context and the judge of its allocations."""

    name: str
    ctx: Context
    judge: Score


@dataclass(frozen=True)
class Trained:
    agent: SAC  # its actor is the selected one
    log: list[dict[str, Any]]  # one record per episode
    final: dict[str, float]  # each task's R of the selected actor's mean-action rollout
    selected: int  # the episode after which the selected actor was taken (0: the warm start)


def zero_action(ctx: Context) -> Rollout:
    """The reference: a = 0 on every tensor (each at its candidate nearest the budget's bits), projected."""
    return rollout(ctx, lambda s: 0.0)


def warm_start(agent: SAC, eps: Sequence[Rollout], cfg: AcrossConfig) -> float:
    """Behaviour cloning of the actor on the tasks' a = 0 episodes (`agent.clone_actor`); the final loss."""
    states, actions = np.vstack([e.states for e in eps]), np.concatenate([e.actions for e in eps])
    return clone_actor(agent.actor, states, actions, cfg.explore_std, cfg.bc_steps, cfg.bc_lr)


def episode_return(judge: Score, ref_score: float, choice: Choice) -> float:
    """R = ln(judge(reference) / judge(choice))."""
    return math.log(max(ref_score, 1e-12) / max(judge(choice), 1e-12))


def mean_action(agent: SAC, ctx: Context) -> Rollout:
    """The policy as `apply` rolls it out: tanh(mean), projected onto the budget."""
    return rollout(ctx, lambda s: float(agent.act(s, deterministic=True)[0]))


def mean_returns(agent: SAC, tasks: Sequence[Task], ref_scores: Sequence[float]) -> dict[str, float]:
    """Each task's R of the actor's mean-action rollout."""
    return {t.name: episode_return(t.judge, s, mean_action(agent, t.ctx).choice)
            for t, s in zip(tasks, ref_scores, strict=True)}


def train_across(tasks: Sequence[Task], cfg: AcrossConfig, on_episode: OnEpisode | None = None) -> Trained:
    """Episodes go round the tasks in order (episode e on task e mod n), each a sampled rollout stored with
    its return R on every transition; `updates_per_episode` SAC updates follow each episode. Every
    `select_every` episodes the mean action is scored on every task, and the actor whose mean R over the
    tasks is highest (the warm start's first) is the one returned."""
    if not tasks:
        raise RampError("training across models needs at least one task")
    dims = {t.ctx.obs_dim for t in tasks} | {t.ctx.variant for t in tasks} | {t.ctx.span for t in tasks}
    if len(dims) != 3:
        raise RampError("every task must share the state variant and the action span")
    agent = SAC(tasks[0].ctx.obs_dim, cfg.agent())
    refs = [zero_action(t.ctx) for t in tasks]
    ref_scores = [float(t.judge(r.choice)) for t, r in zip(tasks, refs, strict=True)]
    bc = warm_start(agent, refs, cfg)
    best = mean_returns(agent, tasks, ref_scores)
    best_actor, selected = copy.deepcopy(agent.actor.state_dict()), 0
    log: list[dict[str, Any]] = []
    seen: list[list[float]] = [[0.0] for _ in tasks]  # each task's returns so far, the reference's first
    for e in range(cfg.episodes):
        i = e % len(tasks)
        t = tasks[i]
        ep = rollout(t.ctx, lambda s: float(agent.act(s)[0]))
        r = episode_return(t.judge, ref_scores[i], ep.choice)
        seen[i].append(r)
        stored = (r - float(np.mean(seen[i]))) / (float(np.std(seen[i])) + 1e-3) if cfg.normalize else r
        n = len(ep.actions)
        agent.buffer.add(ep.states, ep.actions, np.full(n, stored, np.float32), ep.states,
                         np.ones(n, np.float32))
        rec: dict[str, Any] = {"episode": e, "task": t.name, "return": r, "stored": stored}
        if e == 0:
            rec["bc_loss"] = bc
        if len(agent.buffer) >= agent.cfg.batch_size:
            rec |= agent.updates(cfg.updates_per_episode)
        if (e + 1) % cfg.select_every == 0 or e + 1 == cfg.episodes:
            now = mean_returns(agent, tasks, ref_scores)
            rec["mean_return"] = float(np.mean(list(now.values())))
            if rec["mean_return"] > float(np.mean(list(best.values()))):
                best, best_actor, selected = now, copy.deepcopy(agent.actor.state_dict()), e + 1
        log.append(rec)
        if on_episode:
            on_episode(rec)
    agent.actor.load_state_dict(best_actor)
    return Trained(agent, log, best, selected)


def across_meta(tasks: Sequence[Task], cfg: AcrossConfig, trained: Trained) -> dict[str, Any]:
    """A sized policy file's metadata (`policyfile.sized_meta`) plus what it was trained on; `sensitivity`
    tells `apply` to roll it out on the proxy, as it was trained."""
    ctx = tasks[0].ctx
    return sized_meta(ctx.variant, ctx.span, ctx.obs_dim, ctx.variant) | {
        "sensitivity": "proxy",
        "trained_on": [t.name for t in tasks],
        "final_return": trained.final,
        "selected_after_episode": trained.selected,
        "across": cfg.to_json(),
    }
