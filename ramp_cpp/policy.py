"""The policy artifact: a trained actor in one safetensors file, loaded without executing anything.

`policy.safetensors` holds the actor's weights (`actor.*`), the source model's feature standardization
(`obs_mean`, `obs_std`, informational: a target model is standardized over its own layers, Eq. 13) and the
log-std bounds; its `__metadata__["ramp.policy"]` is a JSON object: format, ramp-cpp version, features,
ladder bits, the search settings (budget, mode, metric), the source model and the search's outcome.
safetensors stores only raw tensors and strings, so loading a file can never run code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_path
from .errors import RampError
from .sac import Actor

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
    from safetensors.torch import save_file

    full = {"format": POLICY_FORMAT, "ramp_version": __version__, **meta}
    with atomic_path(dst, force=True) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"ramp.policy": json.dumps(full)},
        )
    return Path(dst)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy; one RampError line for a missing, damaged, foreign or incompatible file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise RampError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta_raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own SafetensorError for anything it cannot parse
        raise RampError(f"{p}: not a ramp-cpp policy (unreadable safetensors: {type(e).__name__})") from None
    if "ramp.policy" not in meta_raw:
        raise RampError(f"{p}: not a ramp-cpp policy (no ramp.policy metadata)")
    try:
        meta = json.loads(meta_raw["ramp.policy"])
    except ValueError:
        raise RampError(f"{p}: damaged policy metadata") from None
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
