"""Where ramp-cpp keeps what it computes once (models, texts, base log-probs, tensor caches) and the files'
sha256, hashed once per (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ramp_cpp.store.atomic import atomic_path, pid_gone


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file; used to key caches (base log-probs, tensor cache) to the exact bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def disk_bytes(*paths: str | os.PathLike[str]) -> int:
    """Bytes the files under `paths` occupy on disk (allocated blocks; a folder under another is counted
    once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        if not os.path.exists(root):
            continue
        for d, _, files in os.walk(root):
            for f in files:
                try:
                    st = os.lstat(os.path.join(d, f))
                except OSError:
                    continue  # removed while walking
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def cache_dir() -> Path:
    d = os.environ.get("RAMP_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "ramp-cpp"


def scratch_root() -> Path:
    """Where a run's short-lived files go (episode GGUFs, probes): $RAMP_SCRATCH_DIR, else tmpfs (/dev/shm)
    when writable, a model's worth of RAM that is never written to disk, else the system temp dir."""
    d = os.environ.get("RAMP_SCRATCH_DIR")
    if d:
        return Path(d)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def scratch_dir(kind: str) -> Path:
    """A fresh folder `ramp-KIND-PID-XXXX` under `scratch_root()`. A process killed by SIGKILL cannot remove
    its own, and on tmpfs a leftover holds RAM until reboot: every new one first removes those whose process
    is gone."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    return Path(tempfile.mkdtemp(prefix=f"ramp-{kind}-{os.getpid()}-", dir=root))


def sweep_scratch(root: Path) -> list[Path]:
    """Remove `ramp-*-PID-*` folders of `root` whose PID no longer runs; return them."""
    gone = []
    for d in root.glob("ramp-*-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and d.is_dir() and pid_gone(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone



def _sha_table(path: str | os.PathLike[str]) -> tuple[Path, str, dict[str, str]]:
    p = Path(path).resolve()
    st = p.stat()
    idx = cache_dir() / "sha256.json"
    try:
        table: dict[str, str] = json.loads(idx.read_text()) if idx.is_file() else {}
    except ValueError:
        table = {}
    return idx, f"{p}|{st.st_size}|{st.st_mtime_ns}", table


#: llama.cpp's split GGUF names (llama_split_path: "%s-%05d-of-%05d.gguf", shards counted from 1).
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _split_set(path: str | os.PathLike[str]) -> list[Path]:
    """Every shard's path when `path` names the first of a split GGUF set of several, else []."""
    p = Path(path)
    m = SHARD_NAME.match(p.name)
    if m is None or int(m["no"]) != 1 or int(m["count"]) < 2:
        return []
    return [p.with_name(f"{m['prefix']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, int(m["count"]) + 1)]


def _combined(shas: list[str]) -> str:
    return hashlib.sha256("split:".join(shas).encode()).hexdigest()


def known_sha256(path: str | os.PathLike[str]) -> str | None:
    """The file's sha256 if it was hashed before (read only: hashes nothing); for the first shard of a
    split GGUF, the set's key as `file_sha256_cached` makes it."""
    shards = _split_set(path)
    if shards:
        known = [_known_one(p) for p in shards]
        return _combined([k for k in known if k]) if all(known) else None
    return _known_one(path)


def _known_one(path: str | os.PathLike[str]) -> str | None:
    _, key, table = _sha_table(path)
    return table.get(key)


def file_sha256_cached(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a 13 GB base is hashed once. The first shard
    of a split GGUF stands for the whole model, so its key covers every shard: a hash of their hashes."""
    shards = _split_set(path)
    if shards:
        return _combined([_one_sha256_cached(p) for p in shards])
    return _one_sha256_cached(path)


def _one_sha256_cached(path: str | os.PathLike[str]) -> str:
    idx, key, table = _sha_table(path)
    if key not in table:
        table[key] = file_sha256(path)
        idx.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(idx, force=True) as tmp:
            tmp.write_text(json.dumps(table))
    return table[key]
