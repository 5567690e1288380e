"""The llama.cpp source that llama-cpp-python vendors, taken from its sdist: the same llama.cpp as the
installed library, for the parts its wheel does not ship (`convert_hf_to_gguf.py` and its `gguf-py`, the
command-line tools' sources). Fetched through pip, whose cache makes a second download free."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from ramp_cpp.errors import RampError
from ramp_cpp.store.cache import cache_dir

#: What `convert_hf_to_gguf.py` needs beside itself: its model classes and the gguf-py it puts on its path.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def installed_version() -> str:
    """The installed llama-cpp-python's version: the llama.cpp every other stage runs."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise RampError("llama-cpp-python is not installed") from None


def download_sdist(dst: Path, version: str) -> Path:
    """The llama-cpp-python sdist of `version` in the new folder `dst`, through `pip download`."""
    dst.mkdir(parents=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
         "--no-deps", "--no-binary", ":all:", "-d", str(dst), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    found = list(dst.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode != 0 or len(found) != 1:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RampError(f"pip download llama-cpp-python=={version} (sdist) failed: {last}")
    return found[0]


def extract_vendor(archive: Path, dst: Path, parts: tuple[str, ...] = ()) -> Path:
    """vendor/llama.cpp of the sdist under `dst` (only the files and folders `parts` of it when given, a
    trailing / naming a folder); returns that vendor/llama.cpp folder."""
    with tarfile.open(archive) as tf:
        top = tf.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        wanted = [prefix + p for p in parts]
        members = [
            m for m in tf.getmembers()
            if m.name.startswith(prefix)
            and (not parts or any(m.name == w or (w.endswith("/") and m.name.startswith(w)) for w in wanted))
        ]  # fmt: skip
        if not members:
            raise RampError(f"{archive} has no {prefix}")
        # the "tar" filter where this Python has it: it refuses links out of dst and absolute paths
        kw: dict[str, Any] = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tf.extractall(dst, members=members, **kw)  # noqa: S202 (filtered above)
    return dst / prefix


def converter_source(version: str | None = None) -> Path:
    """The folder holding the vendored `convert_hf_to_gguf.py` (and `conversion/`, `gguf-py/`), extracted
    once into the user cache (`llama.cpp-convert-VERSION`; a whole folder renamed into place, so a killed
    extraction leaves nothing half there)."""
    version = version or installed_version()
    final = cache_dir() / f"llama.cpp-convert-{version}"
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        archive = download_sdist(work / "sdist", version)
        src = extract_vendor(archive, work / "x", CONVERTER_PARTS)
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise RampError(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            os.replace(src, final)
        except OSError:  # another process put it there first
            if not (final / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
