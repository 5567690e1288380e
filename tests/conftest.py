"""Session-wide isolation: whatever the code caches goes under one temp dir per session, never the user's.

`pytest_configure` runs before collection and before every fixture of every scope, so module- and
session-scoped fixtures (search runs, CLI subprocesses, which inherit os.environ) are covered, not only
function-scoped tests. It points RAMP_CACHE_DIR (every cache of ramp_cpp: base log-probs, file hashes, texts
fetched from the hub) and RAMP_SCRATCH_DIR (episode and probe files, /dev/shm otherwise) at the temp dir,
and HOME at an empty folder inside it, so that code reaching for ~/.cache anyway is caught by
`pytest_sessionfinish`, which fails the session if ~/.cache/ramp-cpp appeared.

Two things are taken from the user's real cache, resolved before the redirect and only ever read: the demo
model (`ramp-cpp demo-model` puts it there; the `demo_model` fixture returns that path, and tests that need
it are skipped without it) and the texts already fetched from the hub (their folder becomes RAMP_DATA_DIR when
none is set, so a machine without ../shared does not go online in the tests).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synthetic  # noqa: E402

_ENV = ("HOME", "RAMP_CACHE_DIR", "RAMP_DATA_DIR", "RAMP_SCRATCH_DIR")
_saved: dict[str, str | None] = {}
_session: dict[str, Path] = {}


def pytest_configure(config: pytest.Config) -> None:
    from ramp_cpp.pipeline.demo import demo_model_path
    from ramp_cpp.store.texts import fetched_dir

    _session["demo_model"] = demo_model_path()
    real_texts = fetched_dir()
    root = Path(tempfile.mkdtemp(prefix="ramp-cpp-tests-"))
    (root / "home").mkdir()
    _session["root"] = root
    _saved.update({k: os.environ.get(k) for k in _ENV})
    os.environ["HOME"] = str(root / "home")
    os.environ["RAMP_CACHE_DIR"] = str(root / "cache")
    os.environ["RAMP_SCRATCH_DIR"] = str(root / "scratch")  # episode and probe files: not /dev/shm
    if not os.environ.get("RAMP_DATA_DIR") and real_texts.is_dir():
        os.environ["RAMP_DATA_DIR"] = str(real_texts)


def leaked_user_cache() -> Path | None:
    """~/.cache/ramp-cpp under the session's HOME, if anything created it."""
    p = Path.home() / ".cache" / "ramp-cpp"
    return p if p.exists() else None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = leaked_user_cache()
    if leaked is not None:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nerror: the tests wrote into {leaked}, bypassing RAMP_CACHE_DIR", red=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    for k, v in _saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "root" in _session:
        shutil.rmtree(_session["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("models") / "tiny.f16.gguf")


@pytest.fixture()
def policy(tmp_path: Path) -> Path:
    """An untrained budget policy (SAC actor, seed 1, the paper's 11 features, bits 3-6)."""
    import numpy as np

    from ramp_cpp.allocate.sac.agent import SAC, SACConfig
    from ramp_cpp.allocate.sac.policyfile import actor_tensors, save_policy

    agent = SAC(11, SACConfig(hidden=(32, 32, 16), seed=1))
    t = actor_tensors(agent.actor, np.zeros(11, np.float32), np.ones(11, np.float32))
    return save_policy(t, {"features": "ramp", "bits": [3, 4, 5, 6]}, tmp_path / "policy.safetensors")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic text file long enough for tiny calibrations, rewards and evaluations."""
    p = tmp_path_factory.mktemp("text") / "words.txt"
    p.write_text(synthetic.text(6000))
    return p


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return synthetic.text()


@pytest.fixture(scope="session")
def demo_model() -> Path:
    p = _session["demo_model"]
    if not p.is_file():
        pytest.skip("demo model not fetched (run `ramp-cpp demo-model`)")
    return p


@pytest.fixture(scope="session")
def wikitext() -> Callable[[str], str]:
    """A named corpus's text; the test is skipped where it cannot be had (no ../shared, no hub, no cache)."""
    from ramp_cpp.errors import RampError
    from ramp_cpp.store.texts import load_text

    missing: dict[str, str] = {}  # a failed lookup (offline: ~20 s of hub retries) is tried once per session

    def get(name: str) -> str:
        if name not in missing:
            try:
                return load_text(name)[0]
            except RampError as e:
                missing[name] = str(e)
        pytest.skip(f"{name} is not available on this machine ({missing[name]})")

    return get


@pytest.fixture
def plain_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama_cpp.Llama, the runtime a user loads our files with, with ramp-cpp's choice of weight repacking
    (backend.repack_weights: off on AMX CPUs, where llama.cpp's AMX matmul segfaults on the test models;
    Llama's constructor has no argument for it)."""
    import llama_cpp.llama_cpp as lc

    from ramp_cpp.llama.backend import repack_weights

    default = lc.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = default()
        p.use_extra_bufts = repack_weights()
        return p

    monkeypatch.setattr(lc, "llama_model_default_params", params)
