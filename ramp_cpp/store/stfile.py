"""ramp-cpp's safetensors artifacts (calibration, policy, checkpoint): tensors plus one JSON header stored
under a key of the file's `__metadata__`. safetensors holds only raw tensors and strings, so reading a file
never runs code from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ramp_cpp.errors import RampError
from ramp_cpp.store.atomic import atomic_path


def write(
    dst: str | os.PathLike[str], tensors: dict[str, Any], key: str, header: Any, force: bool = False
) -> Path:
    """Write numpy arrays or torch tensors (by their type) with `header` as JSON under `key`, atomically."""
    meta = {key: json.dumps(header)}
    with atomic_path(dst, force) as tmp:
        if tensors and all(type(v).__module__.startswith("torch") for v in tensors.values()):
            from safetensors.torch import save_file as save_pt

            save_pt({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        else:
            from safetensors.numpy import save_file as save_np

            save_np(tensors, str(tmp), metadata=meta)
    return Path(dst)


def read(
    path: str | os.PathLike[str], key: str, what: str, framework: str = "numpy"
) -> tuple[dict[str, Any], Any]:
    """(tensors, header) of a file written by `write`; one RampError line for a missing, unreadable or foreign
    file ("not a ramp-cpp <what>")."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise RampError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework=framework) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own SafetensorError for anything it cannot parse
        raise RampError(f"{p}: not a ramp-cpp {what} (unreadable safetensors: {type(e).__name__})") from None
    if key not in meta:
        raise RampError(f"{p}: not a ramp-cpp {what} (no {key} metadata)")
    try:
        return tensors, json.loads(meta[key])
    except ValueError:
        raise RampError(f"{p}: damaged {what} metadata ({key} is not JSON)") from None
