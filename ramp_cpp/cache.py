"""Where ramp-cpp keeps what it computes once (models, texts, base log-probs, tensor caches) and the files'
sha256, hashed once per (path, size, mtime)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_path
from .ggufio import file_sha256


def cache_dir() -> Path:
    d = os.environ.get("RAMP_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "ramp-cpp"



def file_sha256_cached(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a 13 GB base is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    idx = cache_dir() / "sha256.json"
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    table: dict[str, str] = {}
    if idx.is_file():
        try:
            table = json.loads(idx.read_text())
        except ValueError:
            table = {}
    if key not in table:
        table[key] = file_sha256(p)
        idx.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(idx, force=True) as tmp:
            tmp.write_text(json.dumps(table))
    return table[key]
