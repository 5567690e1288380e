"""Every policy shipped in policies/ loads as a ramp-cpp policy (safetensors: no code runs) and has a card in
policies/README.md naming its file and its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ramp_cpp.allocate.sac.policyfile import load_policy

POLICIES = Path(__file__).resolve().parent.parent / "policies"
FILES = sorted(POLICIES.glob("*.safetensors"))


def test_there_are_shipped_policies() -> None:
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_a_shipped_policy_loads_and_has_its_card(path: Path) -> None:
    pol = load_policy(path)
    assert pol.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    card = (POLICIES / "README.md").read_text()
    assert f"## {path.name}" in card and pol.sha256 in card
