"""llama.cpp's own command-line tools, built from the very source llama-cpp-python 0.3.36 compiles.

.venv/bin/python -m bench.llama_tools [--jobs 1] [--nice 19]     # prints the bin/ folder

The referee (bench/studies/referee.py) must run the same llama.cpp as ramp-cpp, or a disagreement could be a
version difference rather than a protocol one; so the tools come from `vendor/llama.cpp` of the
llama-cpp-python sdist, not from a llama.cpp checkout. Built once into
`~/.cache/ramp-cpp/llama.cpp-tools-0.3.36/bin/` (under $RAMP_CACHE_DIR when set); later calls only check
that the binaries are there.

In this llama.cpp version `llama-cli` is a chat client of the embedded server: it is only configured with
LLAMA_BUILD_SERVER=ON and it has no `-no-cnv` (the flag is registered for `llama-completion` only), so it
always applies the chat template. The plain text completion a referee wants is `llama-completion -no-cnv`,
which is built instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ramp_cpp.llama.sdist import download_sdist, extract_vendor
from ramp_cpp.store.cache import cache_dir

VERSION = "0.3.36"
TARGETS = ("llama-perplexity", "llama-completion")
# CPU only, static, nothing fetched: the binaries must run from any folder after the rename, and the build
# machine reaches PyPI and nothing else. GGML_NATIVE stays at its default, as in the pip build of the wheel,
# so both sides run the same CPU kernels.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)


def tools_dir(version: str = VERSION) -> Path:
    return cache_dir() / f"llama.cpp-tools-{version}"


def bin_dir(version: str = VERSION) -> Path:
    return tools_dir(version) / "bin"


def have(targets: tuple[str, ...] = TARGETS, version: str = VERSION) -> bool:
    return all(os.access(bin_dir(version) / t, os.X_OK) for t in targets)


def tool(name: str, version: str = VERSION) -> Path:
    """Path of a built tool; an error naming the build command when it is not there."""
    p = bin_dir(version) / name
    if not os.access(p, os.X_OK):
        raise SystemExit(f"error: {p} not built; run: .venv/bin/python -m bench.llama_tools")
    return p


def _log(msg: str) -> None:
    print(f"[llama_tools {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited {r.returncode}; {log}:\n" + "\n".join(tail))


def sdist(work: Path, version: str = VERSION) -> Path:
    """The llama-cpp-python sdist, through pip (its cache makes a second download free)."""
    return download_sdist(work / "sdist", version)


def extract_llama_cpp(archive: Path, dst: Path) -> Path:
    """Only vendor/llama.cpp of the sdist (the rest is the Python package)."""
    return extract_vendor(archive, dst)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _runs(exe: Path) -> None:
    """The binary starts and answers: `--version` where the tool has it; llama-quantize has none and prints
    its usage with exit code 1 instead, which is an answer too. A crash (a signal) or silence is not."""
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    if r.returncode < 0 or (r.returncode != 0 and "usage" not in (r.stdout + r.stderr).lower()):
        raise SystemExit(f"error: {exe} --version exited {r.returncode}: {(r.stderr or r.stdout)[-300:]}")


def build(targets: tuple[str, ...] = TARGETS, jobs: int = 1, nice: int = 19, version: str = VERSION) -> Path:
    """Build `targets` unless all are already there; returns the bin/ folder. The build happens in a temporary
    folder beside the final one, which is renamed into place only when every binary runs, so an interrupted
    build leaves nothing that looks finished."""
    final = tools_dir(version)
    if have(targets, version):
        return final / "bin"
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    log = work / "build.log"
    t0 = time.time()
    try:
        archive = sdist(work, version)
        _log(f"extracting vendor/llama.cpp from {archive.name}")
        src = extract_llama_cpp(archive, work / "src")
        niced = ["nice", "-n", str(nice)] if nice else []
        _log(f"configuring (log: {log})")
        _run(niced + ["cmake", "-S", str(src), "-B", str(work / "build"), *CMAKE_FLAGS], log)
        for t in targets:  # one target at a time, so the log shows which one is being compiled
            _log(f"building {t} with -j {jobs} (nice {nice}); this takes a while on a busy machine")
            _run(niced + ["cmake", "--build", str(work / "build"), "--target", t, "-j", str(jobs)], log)
        out = work / "out"
        (out / "bin").mkdir(parents=True)
        for t in targets:
            shutil.copy2(work / "build" / "bin" / t, out / "bin" / t)
            _runs(out / "bin" / t)
        shutil.copy2(log, out / "build.log")
        (out / "build.json").write_text(
            json.dumps(
                {
                    "llama_cpp_python": version,
                    "sdist": archive.name,
                    "sdist_sha256": _sha256(archive),
                    "cmake_flags": list(CMAKE_FLAGS),
                    "targets": list(targets),
                    "jobs": jobs,
                    "nice": nice,
                    "build_seconds": round(time.time() - t0, 1),
                },
                indent=2,
            )
            + "\n"
        )
        # a folder built earlier with fewer targets is replaced whole, never merged into
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        out.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        _log(f"built {', '.join(targets)} in {time.time() - t0:.0f} s -> {final / 'bin'}")
    except BaseException:
        # the sources and build tree go (hundreds of MB); the log stays for the post-mortem
        if log.is_file():
            shutil.copy2(log, final.with_name(f"{final.name}.build-failed.log"))
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return final / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (default 1: a shared machine)")
    ap.add_argument("--nice", type=int, default=19, help="niceness of the compiler (default 19)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated cmake targets")
    a = ap.parse_args()
    print(build(tuple(a.targets.split(",")), a.jobs, a.nice))


if __name__ == "__main__":
    main()
