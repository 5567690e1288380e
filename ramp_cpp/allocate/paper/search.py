"""The paper's `--budget` search as an allocator (paper §3.1, §3.3-3.5, Algorithm 1): SAC picks each
searched tensor's GGUF type; the reward is measured through llama.cpp on the assembled GGUF.

Read top to bottom like the paper:

- `SearchConfig`: what is searched and how it is scored (Table 10's budget and ladder, Eq. 19-21's metric).
- `Environment`: one episode visits the tensors in model order (block by block; q k v o gate up down).
  State s_i = the 11-dim layer embedding with dims 10-11 = previous bits / 8 and running average bits / 8
  (Algorithm 1 lines 7-8). The action a_i in [-1, 1] becomes rung round((a_i + 1) / 2 * (K - 1)) of the
  ladder, then the type llama.cpp writes for that row length. Intermediate rewards are 0; the terminal
  reward is R = r_q + r_b (Eq. 19-21, `reward.py`).
- `run_episode`: Algorithm 1 lines 3-12; `train`: the whole of Algorithm 1, the SAC updates of lines 13-17
  after each episode (`agent.py`), the best allocation the best-quality one within Eq. 20's ceiling.
- `policy_rollout` / `evaluate_policy`: the policy's mean action, the allocation `apply` gives;
  `repaired_policy_allocation` when no episode met the ceiling.
- `save_checkpoint` / `load_checkpoint`: everything needed to continue, after every episode.

Episodes cost about one forward pass: every searched tensor is quantized once per rung by llama.cpp's own
quantizer (tensorcache), an episode's GGUF is assembled from those bytes on tmpfs, loaded, and scored on a
fixed chunk subset of the reward text against cached base log-probs. Allocations already evaluated are
memoized. The run around this loop (calibrate, fold, build the tensor cache and the base statistics; write
the policy, allocation, GGUF and report) is `ramp_cpp.pipeline.paper.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.allocate.budget import Budget, Costs, repair, rung_of
from ramp_cpp.allocate.sac.agent import SAC
from ramp_cpp.allocate.sac.checkpoint import checkpoint_tensors, from_checkpoint
from ramp_cpp.allocate.sac.reward import RewardConfig, RewardTerms, kld_reward, reward
from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.calibration.features import Features
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import BaseLogprobs, EvalConfig, kld_loaded
from ramp_cpp.store import stfile

METRICS = ("ppl", "kld")
CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class SearchConfig:
    """What is searched and how it is scored. Defaults follow the paper where it has one (Table 10,
    Eq. 19-21)."""

    budget: float = 4.25  # Eq. 20 ceiling (Table 10: target 4.0, ceiling 4.25)
    margin: float = 0.25  # target = budget - margin (Eq. 20: 4.25 - 4.0)
    budget_mode: str = "weighted"  # allocation.MODES; the paper's is "nominal"
    metric: str = "ppl"  # Eq. 19 on PPL (paper) or on exp(mean KLD)
    bits: tuple[int, ...] = (3, 4, 5, 6)  # Table 10 uses {3, 4, 5}; 6 = Q6_K, the paper's "higher" rung
    include_embeddings: bool = False  # the paper searches linear layers only
    base_type: str = "Q8_0"  # tensors not searched (token_embd / output unless included)
    text: str = "wikitext2-valid"  # reward text; wikitext2-test is held out
    n_ctx: int = 512
    first_chunk: int = 0
    chunks: int = 4  # fixed chunk subset scored each episode
    features: str = "ramp"
    # Every N episodes after warm-up, also score the policy's mean action (no exploration noise, nothing
    # stored in the replay buffer) as a candidate for the best allocation; 0 = never. Not in the paper:
    # with the top rung at Q8_0 on short rows, exploration noise alone can keep every sampled episode over
    # the ceiling while the mean action is within it.
    eval_every: int = 10
    fold: bool = True  # §4.3 Scale Folding before quantizing
    imatrix: bool = True  # quantize with the calibration's importance matrix
    calib: CalibConfig = CalibConfig()

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise RampError(f"unknown metric {self.metric!r} (choose from {', '.join(METRICS)})")
        if self.chunks < 1:
            raise RampError("--chunks must be at least 1")
        from ramp_cpp.store.texts import CORPORA

        c = CORPORA.get(self.text)
        if c is not None and c.held_out:  # the reward decides the allocation: it may not see the test text
            raise RampError(f"{self.text} is held out for evaluation; the search rewards on another text")
        Budget(self.budget, self.margin, self.budget_mode)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchConfig:
        d = dict(d)
        d["bits"] = tuple(d["bits"])
        d["calib"] = CalibConfig(**d["calib"])
        return cls(**d)

    @property
    def budget_spec(self) -> Budget:
        return Budget(self.budget, self.margin, self.budget_mode)

    @property
    def eval_config(self) -> EvalConfig:
        return EvalConfig(n_ctx=self.n_ctx, first_chunk=self.first_chunk, n_chunks=self.chunks)


@dataclass
class Prepared:
    """Everything an episode needs, built once per run by `ramp_cpp.pipeline.paper.run.prepare` (each piece
    also
    saved in the run directory)."""

    model_path: str  # the original model
    src_path: str  # what is quantized: the folded F16, or the original when folding is off
    model: Any  # ggufio.ModelInfo of src_path
    visited: list[Any]  # TensorInfo in visiting order
    features: Features
    z: np.ndarray  # standardized static features (L, 11)
    costs: Costs
    cache: Any  # write.cachefiles.TensorCache
    chunks: list[np.ndarray]
    base: BaseLogprobs
    base_ppl: float
    calibration: Calibration
    imatrix: dict[str, np.ndarray] | None  # of `calibration`: for quantizing src_path
    # E[x^2] of the UNFOLDED model's calibration: llama.cpp's presets quantize model_path, whose inputs
    # are x, not the folded x/s (same calibration as `imatrix`, so "with imatrix" compares like with like)
    base_imatrix: dict[str, np.ndarray] | None


@dataclass
class State:
    """Search progress: what a checkpoint holds besides the SAC agent."""

    episode: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    memo: dict[str, tuple[float, float]] = field(default_factory=dict)  # written types -> (ppl, kld)
    evals: list[dict[str, Any]] = field(default_factory=list)  # deterministic-policy evaluations


@dataclass
class EpisodeRecord:
    """One row of the episode log (`ramp_cpp.pipeline.report` plots these)."""

    episode: int
    random: bool  # warm-up: uniformly random actions
    reward: float
    r_q: float
    r_b: float
    metric: str
    quality: float  # the metric's value (PPL or mean KLD)
    ppl: float
    kld: float
    bpw: float
    bpw_nominal: float
    bpw_file: float
    file_bytes: int
    in_budget: bool
    best_quality: float | None
    t_assemble: float
    t_load: float
    t_eval: float
    t_update: float
    t_total: float
    memo: bool
    bits: list[int]


OnEpisode = Callable[[EpisodeRecord], None]


# -- the environment --------------------------------------------------------------------------------


class Environment:
    """Assembles, loads and scores allocations; memoizes them by their written types. An episode's reward is
    terminal: R = r_q + r_b (Eq. 21) on the assembled GGUF's quality and bits (Algorithm 1 lines 9-12)."""

    def __init__(self, prep: Prepared, cfg: SearchConfig, opts: RuntimeOptions, workdir: Path) -> None:
        self.prep = prep
        self.cfg = cfg
        self.opts = replace(opts, n_ctx=cfg.n_ctx)
        self.workdir = workdir
        self.reward_cfg = RewardConfig(ceiling=cfg.budget, margin=cfg.margin)

    def rungs(self, actions: np.ndarray) -> list[int]:
        k = len(self.prep.costs.bits)
        return [rung_of(float(a), k) for a in np.asarray(actions).reshape(-1)]

    def evaluate(
        self, rungs: list[int], memo: dict[str, tuple[float, float]]
    ) -> tuple[float, float, dict[str, float], bool]:
        """(ppl, mean kld, seconds per phase, memo hit) of an allocation."""
        from ramp_cpp.write.assemble import assemble

        types = self.prep.costs.types_of(rungs)
        key = ",".join(types[n] for n in self.prep.costs.names)
        if key in memo:
            ppl, k = memo[key]
            return ppl, k, {"assemble": 0.0, "load": 0.0, "eval": 0.0}, True
        dst = self.workdir / "episode.gguf"
        t0 = time.perf_counter()
        assemble(self.prep.cache, types, dst, force=True)
        t1 = time.perf_counter()
        with LlamaModel(dst, self.opts) as model:
            t2 = time.perf_counter()
            r = kld_loaded(model, self.prep.chunks, self.prep.base)
        t3 = time.perf_counter()
        memo[key] = (r.ppl, r.kld_mean)
        return r.ppl, r.kld_mean, {"assemble": t1 - t0, "load": t2 - t1, "eval": t3 - t2}, False

    def reward(self, ppl: float, kld: float, b: float) -> RewardTerms:
        """Eq. 21: R = r_q + r_b; r_q from PPL vs the base (Eq. 19) or from exp(KLD) vs 1."""
        if self.cfg.metric == "ppl":
            return reward(ppl, self.prep.base_ppl, b, self.reward_cfg)
        return kld_reward(kld, b, self.reward_cfg)


def run_episode(env: Environment, agent: SAC, st: State, warmup: bool) -> tuple[EpisodeRecord, list[int]]:
    """Algorithm 1 lines 3-12: act tensor by tensor, evaluate, store the episode's transitions."""
    p = env.prep
    n = len(p.visited)
    states = np.zeros((n + 1, p.z.shape[1]), dtype=np.float32)
    actions = np.zeros(n, dtype=np.float32)
    rungs: list[int] = []
    prev, avg = 0.0, 0.0
    k = len(p.costs.bits)
    for i in range(n):
        states[i] = p.features.state(i, prev, avg, p.z)
        a = agent.random_action(1)[0, 0] if warmup else agent.act(states[i])[0]
        actions[i] = float(a)
        r = rung_of(float(a), k)
        rungs.append(r)
        b = p.costs.bits[r]
        avg = avg * i / (i + 1) + b / (i + 1)  # Alg. 1 line 7
        prev = float(b)
    states[n] = states[n - 1]
    states[n, 9], states[n, 10] = prev / 8.0, avg / 8.0
    t0 = time.perf_counter()
    ppl, kld, times, hit = env.evaluate(rungs, st.memo)
    m = p.costs.measures(rungs)
    budget = env.cfg.budget_spec
    bval = m.value(budget.mode)
    terms = env.reward(ppl, kld, bval)
    rewards = np.zeros(n, dtype=np.float32)
    rewards[-1] = terms.total  # Alg. 1 line 12: the terminal transition carries R
    dones = np.zeros(n, dtype=np.float32)
    dones[-1] = 1.0
    agent.buffer.add(states[:n], actions, rewards, states[1:], dones)
    quality = ppl if env.cfg.metric == "ppl" else kld
    in_budget = bval <= budget.ceiling
    rec = EpisodeRecord(
        episode=st.episode,
        random=warmup,
        reward=terms.total,
        r_q=terms.r_q,
        r_b=terms.r_b,
        metric=env.cfg.metric,
        quality=quality,
        ppl=ppl,
        kld=kld,
        bpw=m.bpw,
        bpw_nominal=m.bpw_nominal,
        bpw_file=m.bpw_file,
        file_bytes=m.file_bytes,
        in_budget=in_budget,
        best_quality=None,
        t_assemble=times["assemble"],
        t_load=times["load"],
        t_eval=times["eval"],
        t_update=0.0,
        t_total=time.perf_counter() - t0,
        memo=hit,
        bits=[p.costs.bits[r] for r in rungs],
    )
    return rec, rungs


# -- the training loop ------------------------------------------------------------------------------


def train(
    env: Environment,
    agent: SAC,
    st: State,
    episodes: int,
    run_dir: Path,
    on_episode: OnEpisode | None = None,
) -> State:
    """Algorithm 1 from episode `st.episode` to `episodes`, checkpointing after each one. The best
    allocation is the best-quality one within the ceiling (Eq. 20's hard limit); every `eval_every`
    episodes after warm-up the policy's mean action is scored too (`evaluate_policy`, not in the paper)."""
    sac = agent.cfg
    while st.episode < episodes:
        t0 = time.perf_counter()
        warm = st.episode < sac.warmup_episodes
        rec, rungs = run_episode(env, agent, st, warm)
        t1 = time.perf_counter()
        if not warm and len(agent.buffer) >= sac.batch_size:
            agent.updates(sac.updates_per_episode)  # Alg. 1 lines 13-17
        rec.t_update = time.perf_counter() - t1
        rec.t_total = time.perf_counter() - t0
        if rec.in_budget and (st.best is None or rec.quality < st.best["quality"]):
            st.best = best_entry(env, rec.episode, rungs, rec.ppl, rec.kld, rec.reward)
        every = env.cfg.eval_every
        if every and not warm and (st.episode + 1) % every == 0:
            evaluate_policy(env, agent, st)
        rec.best_quality = st.best["quality"] if st.best else None
        st.log.append(asdict(rec))
        st.episode += 1
        save_checkpoint(run_dir, agent, st)
        if on_episode:
            on_episode(rec)
    return st


def best_entry(
    env: Environment, episode: int, rungs: list[int], ppl: float, kld: float, reward: float, **flags: Any
) -> dict[str, Any]:
    """An evaluated allocation as the run keeps it (`State.best`, the checkpoint, allocation.json)."""
    c = env.prep.costs
    m = c.measures(rungs)
    return {
        "episode": episode,
        "quality": ppl if env.cfg.metric == "ppl" else kld,
        "ppl": ppl,
        "kld": kld,
        "reward": reward,
        "rungs": list(rungs),
        "bits": [c.bits[r] for r in rungs],
        "types": c.types_of(rungs),
        "bpw": m.bpw,
        "bpw_nominal": m.bpw_nominal,
        "bpw_file": m.bpw_file,
        "file_bytes": m.file_bytes,
        **flags,
    }


# -- the policy's own allocation --------------------------------------------------------------------


def policy_rollout(actor: Any, feats: Features, bits: tuple[int, ...]) -> tuple[list[float], list[int]]:
    """Deterministic episode: a_i = tanh(mu(s_i)) (Eq. 14 without the noise), s_i's dims 10-11 from the
    bits chosen so far (Algorithm 1 lines 7-8). What `apply` runs on a new model."""
    z = feats.standardized()
    actions: list[float] = []
    rungs: list[int] = []
    prev, avg = 0.0, 0.0
    for i in range(len(feats.names)):
        s = feats.state(i, prev, avg, z)
        a = float(np.asarray(actor.deterministic_action(s[None, :])).reshape(-1)[0])
        r = rung_of(a, len(bits))
        actions.append(a)
        rungs.append(r)
        b = bits[r]
        avg = avg * i / (i + 1) + b / (i + 1)
        prev = float(b)
    return actions, rungs


def evaluate_policy(env: Environment, agent: SAC, st: State) -> dict[str, Any]:
    """Score the policy's mean action (apply's deterministic rollout); it may become the best allocation."""
    p = env.prep
    _, rungs = policy_rollout(agent.actor, p.features, p.costs.bits)
    ppl, kld, _, _ = env.evaluate(rungs, st.memo)
    m = p.costs.measures(rungs)
    b = m.value(env.cfg.budget_spec.mode)
    terms = env.reward(ppl, kld, b)
    e = best_entry(env, st.episode, rungs, ppl, kld, terms.total, deterministic=True)
    e["in_budget"] = b <= env.cfg.budget
    st.evals.append({k: v for k, v in e.items() if k not in ("rungs", "types")})
    if e["in_budget"] and (st.best is None or e["quality"] < st.best["quality"]):
        st.best = e
    return e


def repaired_policy_allocation(env: Environment, agent: SAC, st: State) -> dict[str, Any]:
    """When no episode met the ceiling: the policy's deterministic allocation, repaired to the budget by
    `apply`'s rule (`budget.repair`), evaluated once. Marked `repaired` in the run's outputs."""
    p = env.prep
    actions, rungs = policy_rollout(agent.actor, p.features, p.costs.bits)
    fixed = repair(rungs, actions, p.costs, env.cfg.budget_spec)
    ppl, kld, _, _ = env.evaluate(fixed, st.memo)
    terms = env.reward(ppl, kld, p.costs.measures(fixed).value(env.cfg.budget_spec.mode))
    return best_entry(env, st.episode, fixed, ppl, kld, terms.total, repaired=True)


# -- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, agent: SAC, st: State) -> None:
    """One file, written to a temp name and renamed: a kill at any moment leaves the previous one intact."""
    tensors, meta = checkpoint_tensors(agent)
    state = {"episode": st.episode, "log": st.log, "best": st.best, "memo": st.memo, "evals": st.evals}
    stfile.write(run_dir / CHECKPOINT, tensors, "ramp.checkpoint", {"sac": meta, "state": state}, force=True)


def load_checkpoint(run_dir: Path) -> tuple[SAC, State]:
    """The agent and the search state of `run_dir`'s checkpoint; one RampError line when it is damaged."""
    tensors, h = stfile.read(run_dir / CHECKPOINT, "ramp.checkpoint", "checkpoint", framework="pt")
    try:
        agent = from_checkpoint(tensors, h["sac"])
        s = h["state"]
    except (KeyError, TypeError) as e:
        raise RampError(f"{run_dir / CHECKPOINT}: damaged checkpoint ({type(e).__name__}: {e})") from None
    memo = {k: (float(v[0]), float(v[1])) for k, v in s["memo"].items()}
    return agent, State(
        episode=int(s["episode"]),
        log=list(s["log"]),
        best=s["best"],
        memo=memo,
        evals=list(s.get("evals", [])),
    )
