"""Policy files: round trip, and every kind of bad file refused with one clear error, nothing executed."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ramp_cpp.allocate.sac.agent import SAC, SACConfig
from ramp_cpp.allocate.sac.policyfile import load_policy
from ramp_cpp.errors import RampError


def test_round_trip_acts_like_the_agent(policy: Path) -> None:
    p = load_policy(policy)
    assert p.bits == (3, 4, 5, 6) and p.variant == "ramp" and len(p.sha256) == 64
    agent = SAC(11, SACConfig(hidden=(32, 32, 16), seed=1))
    s = np.random.default_rng(0).standard_normal((5, 11)).astype(np.float32)
    np.testing.assert_allclose(p.actor.deterministic_action(s), agent.act(s, deterministic=True), rtol=1e-6)


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch /tmp/ramp-pwned-by-policy",))


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = Path("/tmp/ramp-pwned-by-policy")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "policy.pt"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(RampError, match="not a ramp-cpp policy"):
        load_policy(bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind", ["truncated", "garbage", "no_metadata", "other_version", "wrong_tensors", "missing"]
)
def test_bad_policy_files(policy: Path, tmp_path: Path, kind: str) -> None:
    p = tmp_path / "bad.safetensors"
    if kind == "truncated":
        p.write_bytes(policy.read_bytes()[:200])
    elif kind == "garbage":
        p.write_bytes(b"\x00" * 64)
    elif kind == "no_metadata":
        save_file({"x": torch.zeros(3)}, str(p))
    elif kind == "other_version":
        save_file(
            {"x": torch.zeros(3)},
            str(p),
            metadata={"ramp.policy": json.dumps({"format": 99, "ramp_version": "9.0"})},
        )
    elif kind == "wrong_tensors":
        save_file(
            {"x": torch.zeros(3)},
            str(p),
            metadata={"ramp.policy": json.dumps({"format": 1, "features": "ramp", "bits": [3, 4]})},
        )
    want = {
        "truncated": "not a ramp-cpp policy",
        "garbage": "not a ramp-cpp policy",
        "no_metadata": "no ramp.policy",
        "other_version": "format 99 from ramp-cpp 9.0",
        "wrong_tensors": "not a ramp-cpp policy",
        "missing": "no such file",
    }[kind]
    with pytest.raises(RampError, match=want):
        load_policy(p)
