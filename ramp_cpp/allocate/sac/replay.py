"""The replay buffer of the SAC agent (Algorithm 1 lines 11-12 store into it, line 14 samples from it): a
fixed-capacity ring of transitions (s, a, r, s', done) in numpy arrays (Table 9 / Table 26: 30k).

Kept apart from `agent.py`, which reads like the paper's agent (networks, acting, the update of Eq. 15-18);
`state_dict` / `load_state_dict` give `checkpoint.py` the filled rows as plain arrays, nothing pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ramp_cpp.errors import RampError


@dataclass(frozen=True)
class Batch:
    obs: np.ndarray  # float32 (n, obs_dim)
    actions: np.ndarray  # float32 (n, act_dim)
    rewards: np.ndarray  # float32 (n,)
    next_obs: np.ndarray  # float32 (n, obs_dim)
    dones: np.ndarray  # float32 (n,)


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions (s, a, r, s', done) in numpy arrays; the oldest are
    overwritten once `capacity` is reached (Table 26: 30k)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int = 1) -> None:
        if capacity <= 0:
            raise RampError(f"replay buffer capacity must be positive, got {capacity}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, self.obs_dim), np.float32)
        self.actions = np.zeros((capacity, self.act_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, self.obs_dim), np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.pos = 0  # next slot to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray | float,
        next_obs: np.ndarray,
        dones: np.ndarray | float,
    ) -> None:
        """Append one transition (obs of shape (obs_dim,)) or a batch of n (shape (n, obs_dim)), e.g. a
        whole episode at once with the terminal reward already in its last row (Algorithm 1 line 12)."""
        o = np.asarray(obs, np.float32).reshape(-1, self.obs_dim)
        n = o.shape[0]
        a = np.asarray(actions, np.float32).reshape(n, self.act_dim)
        r = np.broadcast_to(np.asarray(rewards, np.float32), (n,))
        o2 = np.asarray(next_obs, np.float32).reshape(n, self.obs_dim)
        d = np.broadcast_to(np.asarray(dones, np.float32), (n,))
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = o, a, r
        self.next_obs[idx], self.dones[idx] = o2, d
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        """`batch` transitions drawn uniformly with replacement."""
        if self.size == 0:
            raise RampError("cannot sample from an empty replay buffer")
        i = rng.integers(0, self.size, size=batch)
        return Batch(self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.dones[i])

    def state_dict(self) -> dict[str, np.ndarray]:
        """The filled rows plus position and capacity, as numpy arrays (no pickle needed)."""
        s = self.size
        return {
            "obs": self.obs[:s].copy(),
            "actions": self.actions[:s].copy(),
            "rewards": self.rewards[:s].copy(),
            "next_obs": self.next_obs[:s].copy(),
            "dones": self.dones[:s].copy(),
            "pos": np.array([self.pos], np.int64),
            "capacity": np.array([self.capacity], np.int64),
        }

    def load_state_dict(self, sd: dict[str, np.ndarray]) -> None:
        cap = int(sd["capacity"][0])
        s = int(sd["obs"].shape[0])
        if sd["obs"].shape[1:] != (self.obs_dim,) or sd["actions"].shape[1:] != (self.act_dim,) or s > cap:
            raise RampError("replay buffer state does not match this agent's dimensions")
        self._alloc(cap)
        for k in ("obs", "actions", "rewards", "next_obs", "dones"):
            getattr(self, k)[:s] = sd[k]
        self.size, self.pos = s, int(sd["pos"][0])
