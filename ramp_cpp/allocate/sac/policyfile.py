"""The policy artifact: a trained actor in one safetensors file, loaded without executing anything.

`policy.safetensors` holds the actor's weights (`actor.*`), the source model's feature standardization
(`obs_mean`, `obs_std`, informational: a target model is standardized over its own layers, Eq. 13) and the
log-std bounds; its `__metadata__["ramp.policy"]` is a JSON object: format, ramp-cpp version, features,
ladder bits, the search settings (budget, mode, metric), the source model and the search's outcome.
safetensors stores only raw tensors and strings, so loading a file can never run code from it.

`actor_tensors` writes an actor in that layout and `read_actor` rebuilds one from it (layer sizes from the
weight shapes, Table 27); `save_policy` / `load_policy` add the metadata and the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ramp_cpp import __version__
from ramp_cpp.allocate.sac.agent import Actor
from ramp_cpp.errors import RampError
from ramp_cpp.store import stfile

POLICY_FORMAT = 1


def actor_tensors(actor: Actor, obs_mean: np.ndarray, obs_std: np.ndarray) -> dict[str, torch.Tensor]:
    """The deployable policy: actor weights (`actor.<param>`), the caller's feature standardization
    (Eq. 13: s_hat = (s - obs_mean) / obs_std) and the log-std bounds; read back by `read_actor`."""
    mean = np.asarray(obs_mean, np.float32)
    std = np.asarray(obs_std, np.float32)
    if mean.shape != (actor.obs_dim,) or std.shape != (actor.obs_dim,):
        raise RampError(f"feature standardization must have shape ({actor.obs_dim},), got {mean.shape}")
    t = {f"actor.{k}": v.detach().clone() for k, v in actor.state_dict().items()}
    t["obs_mean"] = torch.from_numpy(mean.copy())
    t["obs_std"] = torch.from_numpy(std.copy())
    t["log_std_bounds"] = torch.tensor([actor.log_std_min, actor.log_std_max], dtype=torch.float32)
    return t


def read_actor(tensors: dict[str, torch.Tensor]) -> tuple[Actor, np.ndarray, np.ndarray]:
    """Rebuild an actor from `actor_tensors` output: (actor, obs_mean, obs_std). Layer sizes come from the
    weight shapes, so the file needs no separate description."""
    try:
        w = {k[len("actor.") :]: v for k, v in tensors.items() if k.startswith("actor.")}
        linears = sorted(
            (k for k in w if k.endswith(".weight") and w[k].ndim == 2 and k.startswith("trunk.")),
            key=lambda k: int(k.split(".")[1]),
        )
        hidden = tuple(int(w[k].shape[0]) for k in linears)
        obs_dim = int(w[linears[0]].shape[1])
        act_dim = int(w["head.weight"].shape[0]) // 2
        lo, hi = (float(x) for x in tensors["log_std_bounds"])
        actor = Actor(obs_dim, act_dim, hidden, (lo, hi))
        actor.load_state_dict(w)
        mean = tensors["obs_mean"].numpy().astype(np.float32)
        std = tensors["obs_std"].numpy().astype(np.float32)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise RampError(f"not a ramp-cpp policy ({type(e).__name__}: {e})") from None
    if mean.shape != (obs_dim,) or std.shape != (obs_dim,):
        raise RampError(f"policy feature standardization has shape {mean.shape}, expected ({obs_dim},)")
    return actor.eval(), mean, std


@dataclass
class Policy:
    actor: Actor
    meta: dict[str, Any]
    sha256: str

    @property
    def variant(self) -> str:
        return str(self.meta["features"])

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.meta["bits"])


def save_policy(tensors: dict[str, torch.Tensor], meta: dict[str, Any], dst: str | os.PathLike[str]) -> Path:
    return stfile.write(
        dst, tensors, "ramp.policy", {"format": POLICY_FORMAT, "ramp_version": __version__, **meta}, True
    )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy; one RampError line for a missing, damaged, foreign or incompatible file."""
    p = Path(path)
    tensors, meta = stfile.read(p, "ramp.policy", "policy", framework="pt")
    if meta.get("format") != POLICY_FORMAT:
        raise RampError(
            f"{p}: policy format {meta.get('format')} from ramp-cpp {meta.get('ramp_version')}; "
            f"this ramp-cpp ({__version__}) reads format {POLICY_FORMAT}"
        )
    for key in ("features", "bits"):
        if key not in meta:
            raise RampError(f"{p}: policy metadata lacks {key!r}")
    actor, _, _ = read_actor(tensors)
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return Policy(actor=actor, meta=meta, sha256=h)


SIZED = "sized"  # a policy of `search --method sac --size` or of training across models (`sized_meta`)


def sized_meta(variant: str, span: float, obs_dim: int, features: str) -> dict[str, Any]:
    """What `apply` needs to rebuild a sized policy's rollout (rollout.Context) on another model."""
    return {"kind": SIZED, "features": features, "variant": variant, "span": span, "obs_dim": obs_dim,
            "bits": []}


def is_sized(meta: dict[str, Any]) -> bool:
    return meta.get("kind") == SIZED


def load_sized_policy(path: str | os.PathLike[str]) -> Policy:
    """A policy from `search --method sac --size` (rollout.py's budget-relative action); one RampError line
    for anything else, including a policy of the paper's `--budget` search."""
    pol = load_policy(path)
    check_sized(pol, path)
    return pol


def check_sized(pol: Policy, path: str | os.PathLike[str]) -> None:
    """A policy read from `path` is a sized one with what its rollout needs; one RampError line otherwise."""
    if not is_sized(pol.meta):
        raise RampError(f"{path}: a policy of the --budget search; apply it with --budget, not --size")
    for key in ("variant", "span", "obs_dim"):
        if key not in pol.meta:
            raise RampError(f"{path}: policy metadata lacks {key!r}")
