"""The policy artifact: a trained actor in one safetensors file, loaded without executing anything.

`policy.safetensors` holds the actor's weights (`actor.*`), the source model's feature standardization
(`obs_mean`, `obs_std`, informational: a target model is standardized over its own layers, Eq. 13) and the
log-std bounds; its `__metadata__["ramp.policy"]` is a JSON object: format, ramp-cpp version, features,
ladder bits, the search settings (budget, mode, metric), the source model and the search's outcome.
safetensors stores only raw tensors and strings, so loading a file can never run code from it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ramp_cpp import __version__

from ramp_cpp.store import stfile
from ramp_cpp.errors import RampError
from ramp_cpp.allocate.sac.agent import Actor

POLICY_FORMAT = 1


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
    actor, _, _ = Actor.from_policy(tensors)
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return Policy(actor=actor, meta=meta, sha256=h)


SIZED = "sized"  # sacsearch.POLICY_KIND: a policy of `search --method sac --size`


def is_sized(meta: dict[str, Any]) -> bool:
    return meta.get("kind") == SIZED


def load_sized_policy(path: str | os.PathLike[str]) -> Policy:
    """A policy from `search --method sac --size` (rollout.py's budget-relative action); one RampError line
    for anything else, including a policy of the paper's `--budget` search."""
    pol = load_policy(path)
    if not is_sized(pol.meta):
        raise RampError(f"{path}: a policy of the --budget search; apply it with --budget, not --size")
    for key in ("variant", "span", "obs_dim"):
        if key not in pol.meta:
            raise RampError(f"{path}: policy metadata lacks {key!r}")
    return pol
