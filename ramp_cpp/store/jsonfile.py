"""The header every ramp-cpp JSON artifact starts with: `kind` (what it is) and `format` (its version); and a
stage's saved results keyed by what they were computed from (`read_keyed` / `write_keyed`), so that a run
killed midway resumes without computing them again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path


def check_header(d: Any, kind: str, version: int, where: str, what: str) -> dict[str, Any]:
    """`d` when it is a dict of this `kind` and `version`; else one RampError naming `what` it should be."""
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise RampError(f"{where}: not a ramp-cpp {what}")
    if d.get("format") != version:
        raise RampError(f"{where}: {what} format {d.get('format')} (this ramp-cpp reads {version})")
    return d


def read_keyed(path: Path, key: Mapping[str, Any]) -> dict[str, Any]:
    """The entries a stage saved in `path` under this `key` (the inputs they were computed from); {} when the
    file is missing, unreadable or was saved under another key (what it holds then is not this run's)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    want = json.loads(json.dumps(key))  # tuples read back as lists
    ok = isinstance(d, dict) and d.get("key") == want and isinstance(d.get("entries"), dict)
    return dict(d["entries"]) if ok else {}


def write_keyed(path: Path, key: Mapping[str, Any], entries: Mapping[str, Any]) -> None:
    """Save `entries` under `key` atomically (a kill leaves the previous file or this one, never half)."""
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps({"key": key, "entries": entries}))
