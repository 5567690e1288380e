"""RAMP search (paper §3.1, §3.3-3.5, Algorithm 1): SAC picks each searched tensor's GGUF type; the reward
is measured through llama.cpp on the assembled GGUF.

One episode visits the tensors in model order (block by block; q k v o gate up down). State s_i = the
11-dim layer embedding with dims 10-11 = previous bits / 8 and running average bits / 8 (Alg. 1 l. 7-8).
The action a_i in [-1, 1] becomes rung round((a_i + 1) / 2 * (K - 1)) of the ladder, then the type llama.cpp
writes for that row length. Intermediate rewards are 0; the terminal reward is R = r_q + r_b (Eq. 19-21).

Episodes cost about one forward pass: every searched tensor is quantized once per rung by llama.cpp's own
quantizer (tensorcache), an episode's GGUF is assembled from those bytes on tmpfs, loaded, and scored on a
fixed chunk subset of the reward text against cached base log-probs. Allocations already evaluated are
memoized. Everything needed to continue is checkpointed atomically after every episode.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp import __version__

from ramp_cpp.store import stfile
from ramp_cpp.allocate.budget import Budget, Costs, costs, rung_of
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.errors import RampError
from ramp_cpp.llama.evaluate import BaseLogprobs, EvalConfig, base_logprobs, eval_chunks, kld_loaded
from ramp_cpp.calibration.features import Features
from ramp_cpp.allocate.sac.reward import RewardConfig, RewardTerms, kld_reward, reward
from ramp_cpp.fold.source import (
    CALIB,
    Progress,
    calibrated_source,
    cleanup,
    ramp_output_name,
    staged,
    visited_tensors,
    workdir,
)
from ramp_cpp.allocate.sac.agent import SAC, SACConfig

METRICS = ("ppl", "kld")
CHECKPOINT = "checkpoint.safetensors"
SETTINGS = "run.json"


@dataclass(frozen=True)
class SearchConfig:
    """What is searched and how it is scored. Defaults follow the paper where it has one."""

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
class EpisodeRecord:
    """One row of the episode log (report.py plots these)."""

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


@dataclass
class Prepared:
    """Everything an episode needs, built once per run (each piece also saved in the run directory)."""

    model_path: str  # the original model
    src_path: str  # what is quantized: the folded F16, or the original when folding is off
    model: Any  # ggufio.ModelInfo of src_path
    visited: list[Any]  # TensorInfo in visiting order
    features: Features
    z: np.ndarray  # standardized static features (L, 11)
    costs: Costs
    cache: Any  # tensorcache.TensorCache
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


OnEpisode = Callable[[EpisodeRecord], None]


# -- the environment --------------------------------------------------------------------------------


class Environment:
    """Assembles, loads and scores allocations; memoizes them by their written types."""

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
        from ramp_cpp.measure.tensorcache import assemble

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


# -- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, agent: SAC, st: State) -> None:
    """One file, written to a temp name and renamed: a kill at any moment leaves the previous one intact."""
    tensors, meta = agent.checkpoint_tensors()
    state = {"episode": st.episode, "log": st.log, "best": st.best, "memo": st.memo, "evals": st.evals}
    stfile.write(run_dir / CHECKPOINT, tensors, "ramp.checkpoint", {"sac": meta, "state": state}, force=True)


def load_checkpoint(run_dir: Path) -> tuple[SAC, State]:
    tensors, h = stfile.read(run_dir / CHECKPOINT, "ramp.checkpoint", "checkpoint", framework="pt")
    try:
        agent = SAC.from_checkpoint(tensors, h["sac"])
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
    allocation is the best-quality one within the ceiling (Eq. 20's hard limit)."""
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


def policy_rollout(actor: Any, feats: Features, bits: tuple[int, ...]) -> tuple[list[float], list[int]]:
    """Deterministic episode: a_i = tanh(mu(s_i)), s_i's dims 10-11 from the bits chosen so far."""
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


# -- preparing a run --------------------------------------------------------------------------------


def settings(model_path: str, model_sha: str, cfg: SearchConfig, sac: SACConfig) -> dict[str, Any]:
    return {
        "ramp_version": __version__,
        "model_path": model_path,
        "model_sha256": model_sha,
        "search": cfg.to_json(),
        "sac": {k: v for k, v in asdict(sac).items() if k != "episodes"},
    }


def check_settings(run_dir: Path, want: dict[str, Any]) -> None:
    """Refuse to resume a run made with other settings (the episodes count may grow)."""
    have = json.loads((run_dir / SETTINGS).read_text())
    want = json.loads(json.dumps(want))  # tuples read back as lists
    diffs = []
    for sect in ("model_sha256", "search", "sac"):
        a, b = have.get(sect), want.get(sect)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{sect}.{k}: run has {a.get(k)!r}, now {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{sect}: run has {a!r}, now {b!r}")
    if diffs:
        raise RampError(
            f"{run_dir} was made with other settings ({'; '.join(diffs[:3])}); "
            "use the same options or a new --out"
        )


def prepare(
    model_path: str | os.PathLike[str],
    run_dir: Path,
    cfg: SearchConfig,
    opts: RuntimeOptions,
    calib: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    original: Any = None,
) -> Prepared:
    """Calibrate (or reuse), fold, compute features, build the tensor cache and the base statistics; each
    artifact is saved in `run_dir` and reused when present, so a resumed run repeats none of them.
    `original`: the model's inventory when the caller has already read it."""
    from ramp_cpp.store.texts import load_text
    from ramp_cpp.calibration.features import FeatureConfig, compute_features
    from ramp_cpp.llama.ggufio import read_inventory, weight_moments
    from ramp_cpp.measure.tensorcache import build_cache

    def stage(name: str) -> Callable[[int, int], None] | None:
        return staged(progress, name)

    source = calibrated_source(model_path, run_dir, cfg, opts, calib, progress, original)
    src, cal = source.path, source.cal
    base_imatrix = source.base_cal.imatrix() if cfg.imatrix else None
    model = read_inventory(src)
    visited = visited_tensors(model, cfg.include_embeddings)
    feats_path = run_dir / "features.json"
    if feats_path.is_file():
        feats = Features.from_json(json.loads(feats_path.read_text()))
    else:
        moments = weight_moments(src, [t.name for t in visited])
        feats = compute_features(model, moments, cal, FeatureConfig(variant=cfg.features), visited)
        with atomic_path(feats_path, force=True) as tmp:
            tmp.write_text(json.dumps(feats.to_json()))
    c = costs(model, visited, cfg.bits, cfg.base_type)
    c.check_budget(cfg.budget_spec)
    imatrix = cal.imatrix() if cfg.imatrix else None
    from ramp_cpp.allocate.budget import ladder_types

    cache = build_cache(
        src,
        [t.name for t in ladder_types(cfg.bits)],
        run_dir / "cache",
        imatrix=imatrix,
        base=cfg.base_type,
        n_threads=opts.n_threads,
        progress=stage("tensor cache"),
        searched=[t.name for t in visited],
    )
    ecfg = cfg.eval_config
    text, _ = load_text(cfg.text)
    base = base_logprobs(model_path, text, ecfg, opts, stage("base"))
    with LlamaModel(model_path, replace(opts, n_ctx=cfg.n_ctx)) as m:
        cs = eval_chunks(m, text, ecfg)
    base_ppl = float(np.exp(-base.target_lp.astype(np.float64).mean()))
    return Prepared(
        model_path=str(model_path),
        src_path=str(src),
        model=model,
        visited=visited,
        features=feats,
        z=feats.standardized(),
        costs=c,
        cache=cache,
        chunks=cs,
        base=base,
        base_ppl=base_ppl,
        calibration=cal,
        imatrix=imatrix,
        base_imatrix=base_imatrix,
    )


# -- the whole command ------------------------------------------------------------------------------


@dataclass
class SearchResult:
    run_dir: Path
    state: State
    gguf: Path | None
    policy: Path
    allocation: Path
    report: dict[str, Path]


def search(
    model_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    cfg: SearchConfig = SearchConfig(),
    sac: SACConfig = SACConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    resume: bool = False,
    calib: str | os.PathLike[str] | None = None,
    presets: tuple[str, ...] = ("Q4_K_M", "Q3_K_M"),
    progress: Progress | None = None,
    on_episode: OnEpisode | None = None,
) -> SearchResult:
    """`ramp-cpp search`: prepare, train (resumable), then write policy, allocation, GGUF and report."""
    from ramp_cpp.store.cache import file_sha256_cached as file_sha256
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.llama.ggufio import read_inventory

    rd = Path(run_dir)
    if resume and not (rd / SETTINGS).is_file():
        raise RampError(f"{rd}: no run to resume ({SETTINGS} missing)")
    if not resume and (rd / SETTINGS).is_file():
        raise RampError(f"{rd} already holds a run: add --resume to continue it, or choose another --out")
    if calib is None and resume and (rd / CALIB).is_file():
        calib = rd / CALIB  # a resumed run keeps its own calibration
    if calib is not None:  # the run records the calibration it really uses
        cfg = replace(cfg, calib=load_calibration(calib).config)
    info = read_inventory(model_path)  # cheap checks first: nothing is written for a hopeless request
    costs(info, visited_tensors(info, cfg.include_embeddings), cfg.bits, cfg.base_type).check_budget(
        cfg.budget_spec
    )
    if calib is None:
        from ramp_cpp.calibration.collect import check_config

        check_config(cfg.calib, info.context_length or None)
    want = settings(str(Path(model_path).resolve()), file_sha256(model_path), cfg, sac)
    if resume:
        check_settings(rd, want)
    else:
        rd.mkdir(parents=True, exist_ok=True)
        with atomic_path(rd / SETTINGS, force=True) as tmp:
            tmp.write_text(json.dumps(want, indent=2))
    prep = prepare(model_path, rd, cfg, opts, calib, progress, original=info)
    if resume and (rd / CHECKPOINT).is_file():
        agent, st = load_checkpoint(rd)
        agent = _with_episodes(agent, sac)
    else:
        agent, st = SAC(prep.z.shape[1], sac), State()
    wd = workdir()
    try:
        env = Environment(prep, cfg, opts, wd)
        st = train(env, agent, st, sac.episodes, rd, on_episode)
        if st.best is None and st.log:
            st.best = repaired_policy_allocation(env, agent, st)
            save_checkpoint(rd, agent, st)
    finally:
        cleanup(wd)
    return finish(prep, cfg, agent, st, rd, opts, presets, progress)


def repaired_policy_allocation(env: Environment, agent: SAC, st: State) -> dict[str, Any]:
    """When no episode met the ceiling: the policy's deterministic allocation, repaired to the budget by
    `apply`'s rule (allocation.repair), evaluated once. Marked `repaired` in the run's outputs."""
    from ramp_cpp.allocate.budget import repair
    p = env.prep
    actions, rungs = policy_rollout(agent.actor, p.features, p.costs.bits)
    fixed = repair(rungs, actions, p.costs, env.cfg.budget_spec)
    ppl, kld, _, _ = env.evaluate(fixed, st.memo)
    terms = env.reward(ppl, kld, p.costs.measures(fixed).value(env.cfg.budget_spec.mode))
    return best_entry(env, st.episode, fixed, ppl, kld, terms.total, repaired=True)


def _with_episodes(agent: SAC, sac: SACConfig) -> SAC:
    """A resumed agent keeps its state; only the number of episodes may be raised on the command line."""
    agent.cfg = replace(agent.cfg, episodes=sac.episodes)
    return agent


def finish(
    prep: Prepared,
    cfg: SearchConfig,
    agent: SAC,
    st: State,
    rd: Path,
    opts: RuntimeOptions,
    presets: tuple[str, ...],
    progress: Progress | None,
) -> SearchResult:
    """Write the policy, the best allocation, its GGUF (llama.cpp's quantizer, with ramp.* metadata) and
    the report."""
    from ramp_cpp.store.cache import file_sha256_cached
    from ramp_cpp.llama.ggufio import add_metadata
    from ramp_cpp.store.cache import file_sha256
    from ramp_cpp.allocate.sac.policyfile import save_policy
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map, quantize_preset
    from ramp_cpp.pipeline.report import BASE_QUALITY, write_report

    tensors = agent.policy_tensors(
        prep.features.mean.astype(np.float32), prep.features.std.astype(np.float32)
    )
    summary = {
        "episodes": st.episode,
        "best_reward": st.best["reward"] if st.best else None,
        "best_quality": st.best["quality"] if st.best else None,
    }
    pol_meta = {
        "features": cfg.features,
        "bits": list(cfg.bits),
        "include_embeddings": cfg.include_embeddings,
        "search": cfg.to_json(),
        "source": {
            "model": Path(prep.model_path).name,
            "sha256": file_sha256_cached(prep.model_path),
            "arch": prep.model.arch,
            "n_blocks": prep.model.n_blocks,
        },
        **summary,
    }
    policy_path = save_policy(tensors, pol_meta, rd / "policy.safetensors")
    alloc_path = rd / "allocation.json"
    gguf: Path | None = None
    if st.best is not None:
        alloc = allocation_json(prep, st.best, cfg)
        with atomic_path(alloc_path, force=True) as tmp:
            tmp.write_text(json.dumps(alloc, indent=2))
        gguf = rd / ramp_output_name(prep.model_path, f"{cfg.budget:g}")
        qopts = QuantizeOptions(imatrix=prep.imatrix, n_threads=opts.n_threads, force=True)
        tmp_gguf = rd / ".final.gguf"
        quantize_map(prep.src_path, tmp_gguf, st.best["types"], cfg.base_type, qopts)
        meta = output_metadata(prep, cfg, st, file_sha256(policy_path))
        add_metadata(tmp_gguf, gguf, meta, force=True)
        tmp_gguf.unlink(missing_ok=True)
    points = []
    if st.best is not None:
        points.append(
            {
                "label": "ramp",
                "file_bytes": gguf.stat().st_size if gguf else 0,
                "quality": st.best["quality"],
                "kind": "ramp",
            }
        )
    wd = workdir()
    try:
        for name in presets:
            q = wd / f"{name}.gguf"
            im = prep.base_imatrix
            qo = QuantizeOptions(imatrix=im, n_threads=opts.n_threads)
            r = quantize_preset(prep.model_path, q, name, qo)
            with LlamaModel(q, replace(opts, n_ctx=cfg.n_ctx)) as m:
                k = kld_loaded(m, prep.chunks, prep.base)
            points.append(
                {
                    "label": name if im is None else f"{name}+imatrix",
                    "file_bytes": r.file_size,
                    "quality": k.ppl if cfg.metric == "ppl" else k.kld_mean,
                    "kind": "preset",
                }
            )
            q.unlink(missing_ok=True)
    finally:
        cleanup(wd)
    tinfo = [{"name": t.name, "role": t.role, "block": t.block, "n_params": t.n_params} for t in prep.visited]
    rmeta = {
        "model": Path(prep.model_path).name,
        "budget": cfg.budget,
        "target": cfg.budget - cfg.margin,
        BASE_QUALITY: prep.base_ppl if cfg.metric == "ppl" else 0.0,  # KLD of the base against itself
        "search": cfg.to_json(),
        **summary,
    }
    paths = write_report(rd, st.log, tinfo, st.best, points, rmeta)
    return SearchResult(rd, st, gguf, policy_path, alloc_path, paths)


def allocation_json(prep: Prepared, best: dict[str, Any], cfg: SearchConfig) -> dict[str, Any]:
    """tensor -> type, bits, bytes, in visiting order, with the budget measures of the whole allocation."""
    c = prep.costs
    rows = []
    for i, (t, r) in enumerate(zip(prep.visited, best["rungs"], strict=True)):
        rows.append(
            {
                "name": t.name,
                "bits": c.bits[r],
                "type": c.types[i][r],
                "bytes": int(c.nbytes[i, r]),
                "n_params": t.n_params,
            }
        )
    return {
        "model": Path(prep.model_path).name,
        "budget": cfg.budget,
        "budget_mode": cfg.budget_mode,
        "bpw": best["bpw"],
        "bpw_nominal": best["bpw_nominal"],
        "bpw_file": best["bpw_file"],
        "file_bytes_predicted": best["file_bytes"],
        "quality": {
            "metric": cfg.metric,
            "ppl": best["ppl"],
            "kld": best["kld"],
            "text": cfg.text,
            "chunks": cfg.chunks,
        },
        "episode": best["episode"],
        "repaired": bool(best.get("repaired", False)),
        "tensors": rows,
    }


def output_metadata(prep: Prepared, cfg: SearchConfig, st: State, policy_sha: str) -> dict[str, Any]:
    """ramp.* keys of the output GGUF (paper §4.2.3)."""
    best = st.best or {}
    return {
        "ramp.version": __version__,
        "ramp.budget": float(cfg.budget),
        "ramp.budget_mode": cfg.budget_mode,
        "ramp.bpw": float(best.get("bpw", 0.0)),
        "ramp.bpw_nominal": float(best.get("bpw_nominal", 0.0)),
        "ramp.tensor_names": [t.name for t in prep.visited],
        "ramp.tensor_bits": [int(b) for b in best.get("bits", [])],
        "ramp.tensor_types": [best["types"][t.name] for t in prep.visited] if best else [],
        "ramp.scale_folding": bool(cfg.fold),
        "ramp.calibration": prep.calibration.describe(),
        "ramp.imatrix": bool(cfg.imatrix),
        "ramp.policy_sha256": policy_sha,
        "ramp.episodes": int(st.episode),
        "ramp.best_reward": float(best.get("reward", 0.0)),
        "ramp.metric": cfg.metric,
        "ramp.repaired": bool(best.get("repaired", False)),
        "ramp.search_text": f"{cfg.text}, {cfg.chunks} chunks of {cfg.n_ctx} from chunk {cfg.first_chunk}",
    }
