from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synthetic  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches (base log-probs, file hashes) go to a per-session temp dir, never the user's."""
    monkeypatch.setenv("RAMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("models") / "tiny.f16.gguf")


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return synthetic.text()


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from ramp_cpp.demo import demo_model_path

    p = demo_model_path()
    if not p.is_file():
        pytest.skip("demo model not fetched (run `ramp-cpp demo-model`)")
    return p
