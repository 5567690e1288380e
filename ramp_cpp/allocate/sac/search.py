"""The sized RAMP search: SAC over per-tensor types at a whole-file byte budget, rewarded by KLD measured
through llama.cpp on the reward chunks (`search --method sac --size ...`).

What it keeps from the paper (§3.3, Algorithm 1): an off-policy SAC actor that visits the tensors in model
order and picks each one's type from its layer embedding, learning from whole-model evaluations; the policy
transfers zero-shot (`apply`). What it changes, each for a measured reason (issue 10):

1. Every episode is in budget: the sampled allocation is projected onto the budget (`allocate.project`) and
   the executed types are what is stored (`rollout.py`). The paper's episodes missed the ceiling 40 of 40
   times on the demo model.
2. The reward sees quality. `reward="relative"` (default):

       R = ln(kld_ref / kld)

   with kld_ref the reference allocation's reward KLD (greedy's, the warm start): a 10% better allocation
   earns +0.105, whatever the model's KLD scale. `reward="paper"` is Eq. 19-21 on exp(KLD) with the ceiling
   at the budget's bits per weight (the ablation).
3. Credit reaches every tensor: the episode's undiscounted return R is every transition's reward and every
   transition is terminal (gamma is irrelevant, done = 1), so each critic estimates E[R | s_i, a_i], the
   Monte-Carlo return, instead of propagating one terminal reward back through ~200 steps at gamma = 0.99.
4. Exploration at the scale of one rung: the warm-started actor's std is `explore_std` (about one candidate
   type) and the temperature is tuned to keep the policy's entropy at that Gaussian's,

       target_entropy = ½ ln(2πe · explore_std²).

5. The state knows the budget (`rollout.py`, dims 10-13).
6. Warm start from greedy: greedy's allocation is the first episode in the buffer and the actor is
   behaviour-cloned on it (tanh(mean) → greedy's executed actions, log_std → ln explore_std), so the search
   starts where greedy ends and spends its evaluations on what the additive proxy cannot see.

Rounds of K rollouts (`rollouts`, ours; default 1). The search goes in rounds: K episodes rolled out from
the same actor, their new allocations scored as one batch (`ScoreBatch`: an executor's jobs, so K workers
score them at once), then K · `updates_per_episode` updates. K = 1 is the sequential search above, draw for
draw. K > 1 is its own search, with its own seed semantics: the K episodes of a round are drawn one after
another from the seed's one random stream before any is scored, so the result depends on (seed, K) and
never on how many workers score a round or in which order they finish; it differs from K = 1's for the
same seed (the actor is updated every K episodes instead of every one).

Evaluations are memoized by allocation; the budget `evaluations` counts real (assembled and scored) ones.
Every `eval_every`-th episode scores the policy's mean action instead of a sample, and the last evaluation
is the final mean-action rollout, the allocation `apply` would give. The best allocation by reward KLD
among all evaluated ones (within budget) is the search's result. A checkpoint after every episode makes the
run resumable bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ramp_cpp.allocate.allocators import Choice
from ramp_cpp.allocate.sac.agent import SAC, SACConfig, clone_actor
from ramp_cpp.allocate.sac.checkpoint import checkpoint_tensors, from_checkpoint
from ramp_cpp.allocate.sac.policyfile import actor_tensors, sized_meta
from ramp_cpp.allocate.sac.reward import RewardConfig, kld_reward
from ramp_cpp.allocate.sac.rollout import Context, Policy, Rollout, executed, rollout
from ramp_cpp.errors import RampError
from ramp_cpp.measure.sensitivity import Sensitivity
from ramp_cpp.store import stfile

REWARDS = ("relative", "paper")
CHECKPOINT = "sac.safetensors"
CHECKPOINT_KIND = "ramp.sized-search"

Score = Callable[[Choice], float]  # an allocation -> its mean KLD on the reward chunks
ScoreBatch = Callable[[Sequence[Choice]], list[float]]  # several at once (a round's), in their order
OnEpisode = Callable[[dict[str, Any]], None]


#: Settings a resumed search may change (it goes on with more evaluations, or another patience); the rest of
#: `SizedSearchConfig` must match the run's.
MAY_CHANGE_ON_RESUME = ("evaluations", "stall_episodes")


@dataclass(frozen=True)
class SizedSearchConfig:
    """The search's own settings; the agent's are `SACConfig` (Table 9 defaults, see `agent_config`)."""

    evaluations: int = 150  # issue 10: at most 150 real evaluations
    reward: str = "relative"
    projection: bool = True
    warm_start: bool = True
    variant: str = "ramp"  # rollout.VARIANTS; "paper" = Table 24's state
    span: float = 3.0  # bits per weight of a = ±1: Q2_K..Q8_0 around a 4-5 bpw budget
    # One candidate step is ~1 bpw (Q4_K 4.5, Q5_K 5.5, Q6_K 6.6), a = 1/3 of the span; a std of 0.3 moves a
    # tensor one type in about a third of the draws and two types rarely.
    explore_std: float = 0.3
    bc_steps: int = 300  # behaviour cloning of the actor on greedy (full batch: one row per tensor)
    bc_lr: float = 1e-3
    random_episodes: int = 10  # without a warm start: uniformly random actions first (Table 26's warm-up)
    eval_every: int = 10  # every N-th episode scores the mean action (0: only at the end)
    # Ours: stop once this many episodes in a row found no allocation not already evaluated. A size that
    # admits one undominated allocation (Gemma-3-270M at Q4_K_M's: every upgrade is over it, so projection
    # returns greedy's every time) or a converged policy would otherwise spin to 4·evaluations episodes.
    stall_episodes: int = 50
    # Over-budget episodes only happen without projection; relative reward: −`over_penalty` per 1% over.
    over_penalty: float = 1.0
    # 64 updates per episode cost ~1.6 s here (~20% of a 4-chunk evaluation); 32 keep it near 10%.
    updates_per_episode: int = 32
    init_alpha: float = 0.01  # α·H must stay below the O(0.01-0.1) reward differences (Table 9's 0.2 is not)
    # The second look (`rescore`): greedy and the `rescore_top` best allocations scored again on the next
    # `rescore_chunks` chunks of the reward text; the best there is the result (0: no second look). Off by
    # default because measured no help on the demo model (bench/studies/sac_rescore.py: at Q4_K_M's size it
    # kept the same allocation, at Q3_K_M's it picked one 6% worse on held-out text than greedy).
    rescore_top: int = 0
    rescore_chunks: int = 8
    # Ours: episodes per round, scored as one batch (module docstring); 1 is the sequential search.
    rollouts: int = 1
    hidden: tuple[int, ...] = SACConfig.hidden  # Table 27
    alpha_lr: float | None = None  # None: the agent's lr (Table 25)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise RampError(f"unknown reward {self.reward!r} (choose from {', '.join(REWARDS)})")
        if self.stall_episodes < 0:
            raise RampError("stall_episodes must be >= 0 (0: never stop early)")
        if self.rollouts < 1:
            raise RampError("--rollouts must be >= 1 (1: one episode at a time)")
        if self.evaluations < 2:
            raise RampError("the search needs at least 2 evaluations (the reference and one episode)")
        if not self.explore_std > 0 or not self.span > 0:
            raise RampError("--explore-std and the action span must be positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agent_config(cfg: SizedSearchConfig) -> SACConfig:
    """Table 9's agent with the changes above: terminal transitions, entropy at one rung, small α."""
    return SACConfig(
        gamma=0.0,  # every transition is terminal (done = 1); gamma would multiply zero anyway
        target_entropy=0.5 * math.log(2 * math.pi * math.e * cfg.explore_std**2),
        init_alpha=cfg.init_alpha,
        warmup_episodes=0 if cfg.warm_start else cfg.random_episodes,
        episodes=4 * cfg.evaluations,  # memo hits are free, so episodes may outnumber evaluations
        updates_per_episode=cfg.updates_per_episode,
        hidden=tuple(cfg.hidden),
        alpha_lr=cfg.alpha_lr,
        seed=cfg.seed,
    )


# -- reward ---------------------------------------------------------------------------------------------


def episode_reward(
    cfg: SizedSearchConfig,
    kld: float,
    kld_ref: float,
    file_bytes: int,
    budget: int,
    bpw: float,
    target: float,
) -> float:
    """R of one evaluated episode (see the module docstring)."""
    if cfg.reward == "paper":
        return kld_reward(kld, bpw, RewardConfig(ceiling=target, margin=min(0.25, target / 2))).total
    r = math.log(max(kld_ref, 1e-12) / max(kld, 1e-12))
    over = file_bytes / budget - 1.0
    return r - cfg.over_penalty * 100.0 * over if over > 0 else r


# -- warm start -----------------------------------------------------------------------------------------


def behaviour_clone(agent: SAC, ep: Rollout, cfg: SizedSearchConfig) -> float:
    """Fit the actor to greedy's executed actions (`agent.clone_actor`), log_std to ln explore_std."""
    return clone_actor(agent.actor, ep.states, ep.actions, cfg.explore_std, cfg.bc_steps, cfg.bc_lr)


# -- the search -----------------------------------------------------------------------------------------


@dataclass
class SearchState:
    episode: int = 0
    evaluations: int = 0
    kld_ref: float | None = None
    memo: dict[str, float] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"kld", "episode", "kind", "types": {name: type name}}
    final: dict[str, Any] | None = None  # the last mean-action rollout


@dataclass(frozen=True)
class Outcome:
    choice: Choice  # the best evaluated allocation
    kld: float  # its reward KLD
    kld_ref: float  # the reference's (greedy's when warm-started)
    policy_choice: Choice  # the final mean-action rollout
    policy_kld: float
    state: SearchState
    agent: SAC


def _key(sens: Sensitivity, choice: Choice) -> str:
    return ",".join(choice[t.name].name for t in sens.tensors)


def _types(choice: Choice) -> dict[str, str]:
    return {k: v.name for k, v in choice.items()}


def _choice(types: dict[str, str]) -> Choice:
    from gguf import GGMLQuantizationType

    return {k: GGMLQuantizationType[v] for k, v in types.items()}


def save_checkpoint(path: Path, agent: SAC, st: SearchState) -> None:
    tensors, meta = checkpoint_tensors(agent)
    stfile.write(path, tensors, CHECKPOINT_KIND, {"sac": meta, "state": asdict(st)}, force=True)


def load_checkpoint(path: Path) -> tuple[SAC, SearchState]:
    tensors, h = stfile.read(path, CHECKPOINT_KIND, "search checkpoint", framework="pt")
    try:
        return from_checkpoint(tensors, h["sac"]), SearchState(**h["state"])
    except (KeyError, TypeError) as e:
        raise RampError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None


def search(
    ctx: Context,
    score: Score,
    reference: Choice,
    cfg: SizedSearchConfig,
    run_dir: Path,
    on_episode: OnEpisode | None = None,
    score_batch: ScoreBatch | None = None,
) -> Outcome:
    """Run (or resume, from `run_dir/sac.safetensors`) the search until `cfg.evaluations` real
    evaluations; `reference` is greedy's allocation at the same budget. A round's new allocations go to
    `score_batch` when given (an executor's batch), else to `score` one by one: the same numbers
    either way."""
    ckpt = run_dir / CHECKPOINT
    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt.is_file():
        agent, st = load_checkpoint(ckpt)
    else:
        agent, st = SAC(ctx.obs_dim, agent_config(cfg)), SearchState()
    target = ctx.target_bpw
    sens = ctx.sens
    batch = score_batch or (lambda cs: [float(score(c)) for c in cs])

    def evaluate(eps: list[tuple[Rollout, str]], store: bool) -> list[dict[str, Any]]:
        """Score a round's allocations not yet in the memo as one batch, then each episode's record in
        order (the first of a round's duplicates is the real evaluation, the others memo hits)."""
        t0 = time.perf_counter()
        keys = [_key(sens, ep.choice) for ep, _ in eps]
        new = list(dict.fromkeys(k for k in keys if k not in st.memo))
        choices = {k: ep.choice for k, (ep, _) in zip(keys, eps, strict=True)}
        for k, kld in zip(new, batch([choices[k] for k in new]), strict=True):
            st.memo[k] = float(kld)
        t_eval = time.perf_counter() - t0  # the round's: its evaluations ran together
        recs = []
        for j, (key, (ep, kind)) in enumerate(zip(keys, eps, strict=True)):
            hit = key not in new
            if not hit:
                new.remove(key)
                st.evaluations += 1
            recs.append(_record(ep, kind, st.episode + j, st.memo[key], hit, store, t_eval))
        return recs

    def _record(
        ep: Rollout, kind: str, episode: int, kld: float, hit: bool, store: bool, t_eval: float
    ) -> dict[str, Any]:
        if st.kld_ref is None:
            st.kld_ref = kld
        nbytes = sens.file_bytes(ep.choice)
        bpw = 8.0 * (nbytes - sens.fixed_bytes) / ctx.searched_params
        r = episode_reward(cfg, kld, st.kld_ref, nbytes, ctx.budget_bytes, bpw, target)
        if store:
            n = len(ep.actions)
            agent.buffer.add(
                ep.states, ep.actions, np.full(n, r, np.float32), ep.states, np.ones(n, np.float32)
            )
        in_budget = nbytes <= ctx.budget_bytes
        candidate = in_budget and (kind != "reference" or cfg.warm_start)
        if candidate and (st.best is None or kld < st.best["kld"]):
            st.best = {"kld": kld, "episode": episode, "kind": kind, "types": _types(ep.choice)}
        moved = sum(ep.proposed[t.name] != ep.choice[t.name] for t in sens.tensors)
        return {
            "episode": episode,
            "kind": kind,
            "kld": kld,
            "reward": r,
            "file_bytes": nbytes,
            "bpw": bpw,
            "in_budget": in_budget,
            "memo": hit,
            "projected_tensors": int(moved),
            "best_kld": st.best["kld"] if st.best else None,
            "evaluations": st.evaluations,
            "t_eval": 0.0 if hit else t_eval,
        }

    if st.episode == 0:  # the reference: greedy's allocation, evaluated once, never trained on when cold
        ref = executed(ctx, reference)
        (rec,) = evaluate([(ref, "reference")], store=cfg.warm_start)
        if cfg.warm_start:
            rec["bc_loss"] = behaviour_clone(agent, ref, cfg)
        _finish(st, [rec], agent, ckpt, on_episode)

    # a budget that holds every tensor's largest undominated type leaves one allocation (greedy's, which the
    # projection of any action fills back to): nothing to learn, and every episode would be a memo hit
    saturated = sens.max_bytes() <= ctx.budget_bytes
    while (
        not saturated
        and not _stalled(st, cfg.stall_episodes)
        and st.evaluations < cfg.evaluations - 1
        and st.episode < agent.cfg.episodes
    ):
        # a round never outruns the evaluations left (one is kept for the final rollout) or the episodes
        k = min(cfg.rollouts, cfg.evaluations - 1 - st.evaluations, agent.cfg.episodes - st.episode)
        st.final = None  # a resumed run with more evaluations rolls the final policy out again
        eps, learning = [], 0
        for e in range(st.episode, st.episode + k):
            random = e <= agent.cfg.warmup_episodes
            mean = not random and cfg.eval_every > 0 and e % cfg.eval_every == 0
            learning += not random
            eps.append((rollout(ctx, _random(agent) if random else _acting(agent, mean)),
                        "random" if random else "mean" if mean else "sample"))
        recs = evaluate(eps, store=True)
        t0 = time.perf_counter()
        if learning and len(agent.buffer) >= agent.cfg.batch_size:
            recs[-1].update(agent.updates(cfg.updates_per_episode * learning))
        for r in recs:
            r["t_update"] = 0.0
        recs[-1]["t_update"] = time.perf_counter() - t0
        _finish(st, recs, agent, ckpt, on_episode)

    if st.final is None:  # the allocation `apply` would give: the mean action, projected
        ep = rollout(ctx, _acting(agent, True))
        (rec,) = evaluate([(ep, "final")], store=False)
        st.final = {"kld": rec["kld"], "types": _types(ep.choice)}
        _finish(st, [rec], agent, ckpt, on_episode, count=False)
    if st.best is None or st.kld_ref is None:
        raise RampError("the search evaluated no allocation within the budget")
    return Outcome(
        _choice(st.best["types"]),
        st.best["kld"],
        st.kld_ref,
        _choice(st.final["types"]),
        st.final["kld"],
        st,
        agent,
    )


def rescore(
    sens: Sensitivity, st: SearchState, score: Score, top: int, budget_bytes: int, reference: Choice
) -> tuple[Choice, float, list[dict[str, Any]]]:
    """Winner's-curse guard: `reference` (greedy's allocation) and the `top` allocations with the lowest
    reward KLD scored again by `score` on other validation chunks; (the best of those, its new KLD, the
    table, reference first). The best of 150 on 4 chunks is partly the best noise of 150; the second look
    is independent of it, and keeps greedy where no find holds up."""
    ref_key = _key(sens, reference)
    ranked = [(ref_key, st.memo[ref_key])] + sorted(
        ((k, v) for k, v in st.memo.items() if k != ref_key), key=lambda kv: kv[1]
    )
    rows: list[dict[str, Any]] = []
    names = [t.name for t in sens.tensors]
    for key, kld in ranked:
        if len(rows) == top + 1:
            break
        choice = _choice(dict(zip(names, key.split(","), strict=True)))
        if sens.file_bytes(choice) > budget_bytes:
            continue
        rows.append({"reference": key == ref_key, "reward_kld": kld, "rescored_kld": float(score(choice)),
                     "choice": choice})
    best = min(rows, key=lambda r: r["rescored_kld"])
    table = [{k: v for k, v in r.items() if k != "choice"} for r in rows]
    return best["choice"], best["rescored_kld"], table


def _stalled(st: SearchState, n: int) -> bool:
    """The last `n` episodes were all memo hits (the log, so a resumed run counts the same)."""
    tail = [r for r in st.log if r["kind"] != "reference"][-n:]
    return n > 0 and len(tail) == n and all(r["memo"] for r in tail)


def _acting(agent: SAC, deterministic: bool) -> Policy:
    return lambda s: float(agent.act(s, deterministic=deterministic)[0])


def _random(agent: SAC) -> Policy:
    return lambda s: float(agent.random_action(1)[0, 0])


def _finish(
    st: SearchState,
    recs: list[dict[str, Any]],
    agent: SAC,
    ckpt: Path,
    on_episode: OnEpisode | None,
    count: bool = True,
) -> None:
    """Log, checkpoint, report a round. One checkpoint per round: a resumed search starts the interrupted
    round again from the actor that drew it. The final rollout is not counted as an episode: a run resumed
    with more evaluations then follows the same episode schedule as one that never stopped."""
    st.log.extend(recs)
    st.episode += len(recs) if count else 0
    save_checkpoint(ckpt, agent, st)
    if on_episode:
        for r in recs:
            on_episode(r)


def policy_tensors(agent: SAC) -> dict[str, torch.Tensor]:
    """The actor for a policy file: states are already standardized by `rollout`, so identity scaling."""
    d = agent.obs_dim
    return actor_tensors(agent.actor, np.zeros(d, np.float32), np.ones(d, np.float32))


def policy_meta(ctx: Context, cfg: SizedSearchConfig, features: str) -> dict[str, Any]:
    """What `apply` needs to rebuild the rollout on another model, and the search's settings."""
    return sized_meta(ctx.variant, ctx.span, ctx.obs_dim, features) | {"search": cfg.to_json()}
