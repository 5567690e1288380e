"""The header every ramp-cpp JSON artifact starts with: `kind` (what it is) and `format` (its version)."""

from __future__ import annotations

from typing import Any

from ramp_cpp.errors import RampError


def check_header(d: Any, kind: str, version: int, where: str, what: str) -> dict[str, Any]:
    """`d` when it is a dict of this `kind` and `version`; else one RampError naming `what` it should be."""
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise RampError(f"{where}: not a ramp-cpp {what}")
    if d.get("format") != version:
        raise RampError(f"{where}: {what} format {d.get('format')} (this ramp-cpp reads {version})")
    return d
