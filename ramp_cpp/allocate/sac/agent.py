"""The Soft Actor-Critic agent of RAMP (paper §3.3, Algorithm 1), laid out like CleanRL's
`sac_continuous_action.py` and read top to bottom like the paper: the hyperparameters (Table 9, Table 25-27),
the action map (§3.3.1), the actor pi(a|s) (Eq. 14) and the critics Q(s, a) (Table 27), then the agent:
acting (Algorithm 1 lines 5-6, warm-up line 3) and one update (Algorithm 1 lines 13-17, Eq. 15-18).

One action per searched tensor: a scalar `a` in [-1, 1] (tanh-squashed Gaussian, d_a = 1) that the search
maps to a bit-width through `action_to_unit`. Every random draw comes from the agent's own
`torch.Generator` and `numpy.random.Generator`, never from the global RNGs, so a run is reproducible from
its seed and resumes bit-exactly from a checkpoint.

What the paper does not write as part of the agent lives beside it: the replay buffer (`replay.py`), the
checkpoint as plain tensors plus JSON (`checkpoint.py`, nothing pickled) and the deployable policy's tensors
(`policyfile.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ramp_cpp.allocate.sac.replay import ReplayBuffer
from ramp_cpp.errors import RampError


@dataclass(frozen=True)
class SACConfig:
    """SAC hyperparameters; defaults are the paper's single fixed configuration (Appendix B)."""

    hidden: tuple[int, ...] = (512, 512, 256)  # Table 9 / Table 27: FC-512-LN, FC-512-LN, FC-256
    lr: float = 3e-4  # Table 9 / Table 25: Adam, shared by actor, critics and temperature
    alpha_lr: float | None = None  # the temperature's Adam rate; None: `lr` (Table 25)
    batch_size: int = 128  # Table 9 / Table 26
    buffer_size: int = 30_000  # Table 9 / Table 26: ~120 episodes x 250 steps
    gamma: float = 0.99  # Table 9 / Table 25
    tau: float = 0.005  # Table 9 / Table 25: Polyak rate of the target critics
    grad_clip: float = 1.0  # Table 9 / Table 25: max global grad norm, actor and critics
    init_alpha: float = 0.2  # Table 9 / Table 25: alpha = exp(log 0.2), log-parameterized
    target_entropy: float = -1.0  # Table 9 / Table 25 / Eq. 17: H_bar = -d_a with d_a = 1
    warmup_episodes: int = 20  # Table 9 / Table 26: uniformly random actions, no policy updates
    episodes: int = 200  # Table 9 / Table 26: 200-300
    # Algorithm 1 line 13 leaves N_updates open. CleanRL does one update per environment step (~n_tensors,
    # 210 for SmolLM2-135M); at ~25 ms per batch-128 update on 2 CPU cores (measured) that is ~5 s of pure
    # SAC per episode, so the default is 64 per episode (~1.6 s), which still replays the <=30k buffered
    # transitions ~0.27 times per episode on average (64 x 128 / 30k) once the buffer is full.
    updates_per_episode: int = 64
    log_std_min: float = -5.0  # CleanRL LOG_STD_MIN (the paper gives no bound)
    log_std_max: float = 2.0  # CleanRL LOG_STD_MAX
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise RampError(f"SAC hidden sizes must be positive, got {self.hidden}")
        if self.batch_size <= 0 or self.buffer_size <= 0:
            raise RampError("SAC batch size and buffer size must be positive")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 < self.tau <= 1.0:
            raise RampError(f"SAC needs 0 <= gamma <= 1 and 0 < tau <= 1 (got {self.gamma}, {self.tau})")
        if self.init_alpha <= 0 or self.lr <= 0 or self.grad_clip <= 0:
            raise RampError("SAC init_alpha, lr and grad_clip must be positive")
        if self.log_std_min >= self.log_std_max:
            raise RampError("SAC log_std_min must be below log_std_max")


def action_to_unit(a: np.ndarray | float) -> np.ndarray:
    """Map a squashed action a in [-1, 1] to u in [0, 1]: u = (a + 1) / 2.

    The paper squashes the Gaussian sample "via sigmoid" (§3.3.1); this agent squashes with tanh as SAC and
    CleanRL do, and since (tanh(x) + 1) / 2 = sigmoid(2x), u is exactly the sigmoid of twice the pre-tanh
    sample x: the same map up to a scale of the Gaussian, which the policy learns. Clipped so rounding can
    never leave [0, 1].
    """
    return np.clip((np.asarray(a, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- networks


def _trunk(n_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """FC-LN-ReLU for every hidden layer but the last, which is FC-ReLU (Table 27: LayerNorm after the
    first two hidden layers, the 256-unit bottleneck has none). Built on the meta device: weights are
    filled by `_init` from the agent's generator or by `load_state_dict`."""
    layers: list[nn.Module] = []
    d = n_in
    for i, h in enumerate(hidden):
        layers.append(nn.Linear(d, h, device="meta"))
        if i < len(hidden) - 1:
            layers.append(nn.LayerNorm(h, device="meta"))
        layers.append(nn.ReLU())
        d = h
    return nn.Sequential(*layers)


def _materialize(module: nn.Module, gen: torch.Generator | None) -> nn.Module:
    """Move a meta-device module to CPU memory and initialize it like torch does (Linear: U(+-1/sqrt(fan_in))
    for weight and bias, which is kaiming_uniform(a=sqrt(5)); LayerNorm: ones and zeros), drawing from
    `gen` so the global RNG is never touched. `gen=None` leaves memory uninitialized (a load follows)."""
    module.to_empty(device="cpu")
    if gen is None:
        return module
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return module


class Actor(nn.Module):
    """pi(a|s): FC512-LN-ReLU -> FC512-LN-ReLU -> FC256-ReLU -> FC(2 d_a) giving mean and log_std (Table 27),
    a ~ N(mean, std) squashed by tanh (Eq. 14)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int = 1,
        hidden: tuple[int, ...] = SACConfig.hidden,
        log_std_bounds: tuple[float, float] = (SACConfig.log_std_min, SACConfig.log_std_max),
        gen: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.log_std_min, self.log_std_max = log_std_bounds
        self.trunk = _trunk(obs_dim, hidden)
        self.head = nn.Linear(hidden[-1], 2 * act_dim, device="meta")
        _materialize(self, gen)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std); log_std = lo + (hi - lo)(tanh(raw) + 1)/2 keeps it in [lo, hi] smoothly
        (CleanRL), so std can neither vanish nor explode early in training."""
        mean, raw = self.head(self.trunk(obs)).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)
        return mean, log_std

    def get_action(
        self, obs: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, log_prob, a_det) with x = mean + std * eps, eps ~ N(0, 1) drawn from `gen`, a = tanh(x),
        a_det = tanh(mean), and the change-of-variables log-density summed over action dims:

            log_prob = sum[ -eps^2/2 - log_std - log(2 pi)/2 - log(1 - tanh(x)^2) ]
            log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x))

        (the right-hand form is exact and stays finite where tanh(x) rounds to +-1, unlike CleanRL's
        log(1 - a^2 + 1e-6))."""
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
        x = mean + log_std.exp() * eps
        log_prob = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))
        return torch.tanh(x), log_prob.sum(-1, keepdim=True), torch.tanh(mean)

    @torch.no_grad()
    def deterministic_action(self, obs: np.ndarray) -> np.ndarray:
        """tanh(mean) for a batch of (standardized) states: the policy `apply` uses, no randomness."""
        mean, _ = self(torch.as_tensor(np.asarray(obs, dtype=np.float32)))
        return torch.tanh(mean).numpy()


def clone_actor(
    actor: Actor, states: np.ndarray, actions: np.ndarray, std: float, steps: int, lr: float
) -> float:
    """Behaviour cloning (a warm start, not part of the paper's agent): full-batch Adam on

        mean (tanh(mean(s)) − a)² + mean (log_std(s) − ln std)²

    over the given states and actions, with an optimizer of its own (the agent's Adam state is left as a
    fresh run would have it); returns the final loss."""
    s = torch.from_numpy(np.asarray(states, np.float32))
    a = torch.from_numpy(np.asarray(actions, np.float32)).reshape(len(s), -1)
    want = math.log(std)
    opt = torch.optim.Adam(actor.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        mean, log_std = actor(s)
        loss = F.mse_loss(torch.tanh(mean), a) + F.mse_loss(log_std, torch.full_like(log_std, want))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.item())


class SoftQNetwork(nn.Module):
    """Q(s, a): the actor's trunk over s concatenated with a, then FC-1 (Table 27)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int = 1,
        hidden: tuple[int, ...] = SACConfig.hidden,
        gen: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.trunk = _trunk(obs_dim + act_dim, hidden)
        self.head = nn.Linear(hidden[-1], 1, device="meta")
        _materialize(self, gen)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, act], dim=-1)))


# ------------------------------------------------------------------------------------------------- agent


@contextlib.contextmanager
def _frozen(*nets: nn.Module) -> Iterator[None]:
    """Parameters of `nets` need no gradient inside the block (gradients still flow through them)."""
    params = [p for n in nets for p in n.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SAC:
    """Actor, twin critics and their Polyak targets, the temperature, their Adam optimizers, the replay
    buffer and the two RNGs: everything a search needs, and everything a checkpoint holds."""

    def __init__(self, obs_dim: int, cfg: SACConfig | None = None, act_dim: int = 1) -> None:
        self.cfg = c = cfg or SACConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gen = torch.Generator().manual_seed(c.seed)
        self.rng = np.random.default_rng(c.seed)
        self.actor = Actor(obs_dim, act_dim, c.hidden, (c.log_std_min, c.log_std_max), self.gen)
        self.qf1 = SoftQNetwork(obs_dim, act_dim, c.hidden, self.gen)
        self.qf2 = SoftQNetwork(obs_dim, act_dim, c.hidden, self.gen)
        self.qf1_target = SoftQNetwork(obs_dim, act_dim, c.hidden)
        self.qf2_target = SoftQNetwork(obs_dim, act_dim, c.hidden)
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        self.log_alpha = torch.tensor([math.log(c.init_alpha)], requires_grad=True)
        self.alpha = float(c.init_alpha)
        self.target_entropy = float(c.target_entropy)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr)
        self.q_opt = torch.optim.Adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=c.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=c.alpha_lr or c.lr)
        self.buffer = ReplayBuffer(c.buffer_size, obs_dim, act_dim)
        self.n_updates = 0

    # -------------------------------------------------------------------------------------- acting

    def act(self, states: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions in [-1, 1] for standardized states of shape (obs_dim,) or (n, obs_dim); same leading
        shape out with act_dim last. Sampling draws from the agent's generator; the deterministic action
        tanh(mean) draws nothing, so evaluating the policy does not change the run that follows."""
        s = np.asarray(states, np.float32)
        x = s.reshape(-1, self.obs_dim)
        if deterministic:
            out = self.actor.deterministic_action(x)
        else:
            with torch.no_grad():
                out = self.actor.get_action(torch.from_numpy(x), self.gen)[0].numpy()
        return out.reshape(*s.shape[:-1], self.act_dim)

    def random_action(self, n: int) -> np.ndarray:
        """n warm-up actions, uniform on [-1, 1] (Table 26: purely random before policy gradients)."""
        return self.rng.uniform(-1.0, 1.0, size=(n, self.act_dim)).astype(np.float32)

    # ------------------------------------------------------------------------------------- learning

    def update(self) -> dict[str, float]:
        """One gradient step on a minibatch of `cfg.batch_size` (Eq. 15-18):

            a', logp' ~ pi(.|s')
            y          = r + gamma (1 - d) [min(qf1_target(s', a'), qf2_target(s', a')) - alpha logp']
            qf_loss    = mean (qf1(s, a) - y)^2 + mean (qf2(s, a) - y)^2
            actor_loss = mean [alpha logp - min(qf1(s, a~), qf2(s, a~))],  a~, logp ~ pi(.|s)
            alpha_loss = mean [-log_alpha (logp + target_entropy)]     (logp detached; Eq. 17 in the
                                                                        log-parameterization SB3 uses)

        then grad-norm clipping at `cfg.grad_clip` for critics and actor and the Polyak step
        target <- tau * online + (1 - tau) * target. Returns the losses and the new alpha."""
        c = self.cfg
        b = self.buffer.sample(c.batch_size, self.rng)
        obs, act = torch.from_numpy(b.obs), torch.from_numpy(b.actions)
        next_obs = torch.from_numpy(b.next_obs)
        rew, done = torch.from_numpy(b.rewards)[:, None], torch.from_numpy(b.dones)[:, None]

        with torch.no_grad():
            next_a, next_logp, _ = self.actor.get_action(next_obs, self.gen)
            q_next = torch.min(self.qf1_target(next_obs, next_a), self.qf2_target(next_obs, next_a))
            y = rew + c.gamma * (1.0 - done) * (q_next - self.alpha * next_logp)
        q1, q2 = self.qf1(obs, act), self.qf2(obs, act)
        qf_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.q_opt.zero_grad()
        qf_loss.backward()
        nn.utils.clip_grad_norm_([*self.qf1.parameters(), *self.qf2.parameters()], c.grad_clip)
        self.q_opt.step()

        # The actor loss must not train the critics (only the path through the action matters): frozen,
        # their weight gradients are not even computed.
        with _frozen(self.qf1, self.qf2):
            pi, logp, _ = self.actor.get_action(obs, self.gen)
            actor_loss = (self.alpha * logp - torch.min(self.qf1(obs, pi), self.qf2(obs, pi))).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
            self.actor_opt.step()

        alpha_loss = (-self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        self.alpha = float(self.log_alpha.exp().item())

        with torch.no_grad():
            for net, tgt in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                for p, tp in zip(net.parameters(), tgt.parameters(), strict=True):
                    tp.mul_(1.0 - c.tau).add_(p, alpha=c.tau)
        self.n_updates += 1
        return {
            "qf_loss": float(qf_loss.item()),
            "q1": float(q1.mean().item()),
            "actor_loss": float(actor_loss.item()),
            "alpha_loss": float(alpha_loss.item()),
            "alpha": self.alpha,
            "entropy": float(-logp.mean().item()),
        }

    def updates(self, n: int) -> dict[str, float]:
        """n updates; the mean of each logged quantity (empty dict for n = 0)."""
        logs = [self.update() for _ in range(n)]
        return {k: float(np.mean([x[k] for x in logs])) for k in logs[0]} if logs else {}
