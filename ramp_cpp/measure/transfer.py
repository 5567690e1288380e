"""Transferred sensitivity: other models' measured group ratios, applied to a model that is not probed.

`groups.py` measures, per role × depth group g of a model m, how much KLD one unit of proxy costs
(ratio_m,g, from ≈ 34 probe evaluations). Their absolute size depends on the model and the calibration; the
knapsack only reads their relative size (multiplying every error by one constant moves no choice). So a
table keeps, per key k = (role, depth bucket) — or (role, None) for token_embd / output —

    ℓ_m,g = ln ratio_m,g − median_h ln ratio_m,h            (each source model centred on its own median)
    ℓ̄_k   = mean over the source models m with a group at k of ℓ_m,k

and a new model's proxy errors are scaled, group by group, by exp(ℓ̄_k) of its own groups (`factors`):
zero evaluations on that model. Depth is relative: bucket b of B is the b-th B-quantile of the blocks
(`groups.bucket_of`), whatever the number of blocks. A tied token_embd is also the head, so it is its own
role, `TIED_EMBD`, apart from an input-only token_embd. A key no source has falls back to its role's mean
over the buckets the sources have, then to 0 (the median: factor 1).

Issue 23's non-learned zero-evaluation baseline, and `--sensitivity transferred`. The table the package
ships (`ramp_cpp/data/group-ratios.json`) comes from the benchmark models' measured greedy runs; how it was
made and how it compares is in `policies/README.md`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import ModelInfo
from ramp_cpp.measure.groups import bucket_of, groups_of
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.jsonfile import check_header

KIND = "ramp.group-ratios"
FORMAT_VERSION = 1
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "group-ratios.json"

Key = tuple[str, int | None]  # (role, depth bucket), bucket None for the embeddings
TIED_EMBD = "token_embd+output"  # the role of a token_embd that is the head too


@dataclass(frozen=True)
class SourceGroup:
    """One measured group of a source model, as `GroupReport.to_json()["groups"]` holds it."""

    role: str
    bucket: int | None
    ratio: float  # the ratio applied (floored; the median where the group was not probed)


@dataclass(frozen=True)
class RatioRecord:
    role: str
    bucket: int | None
    log_ratio: float  # ℓ̄_k
    n_sources: int


@dataclass(frozen=True)
class RatioTable:
    n_buckets: int
    sources: tuple[str, ...]
    records: tuple[RatioRecord, ...]

    def log_ratio(self, role: str, bucket: int | None) -> float:
        """ℓ̄ of (role, bucket); the role's mean over its known buckets; else 0 (module docstring)."""
        same_role = [r for r in self.records if r.role == role]
        exact = [r for r in same_role if r.bucket == bucket]
        if exact:
            return exact[0].log_ratio
        if same_role:
            return sum(r.log_ratio for r in same_role) / len(same_role)
        return 0.0

    def factors(self, info: ModelInfo, names: Sequence[str]) -> dict[str, float]:
        """The scale of each tensor of `names` (the searched tensors of `info`): exp(ℓ̄) of its group."""
        out: dict[str, float] = {}
        for g in groups_of(info, names, self.n_buckets):
            role = TIED_EMBD if g.role == "token_embd" and info.tied_output else g.role
            f = math.exp(self.log_ratio(role, g.bucket))
            out.update((n, f) for n in g.tensors)
        return out


def source_groups(report: Mapping[str, Any], where: str = "report") -> tuple[SourceGroup, ...]:
    """The groups of one `GroupReport.to_json()`, each with its depth bucket: `groups.bucket_of` its first
    block, the model's blocks being those its groups span. A token_embd measured with no output group beside
    it is the head too (groups_of gives an untied head its own group): its role is then TIED_EMBD."""
    try:
        rows = report["groups"]
        tied = not any(g["role"] == "output" for g in rows)
        n_buckets = int(report["config"]["n_buckets"])
        n_blocks = 1 + max((int(g["blocks"][1]) for g in rows if g["blocks"] is not None), default=0)
        out = []
        for g in rows:
            b = None if g["blocks"] is None else bucket_of(int(g["blocks"][0]), n_blocks, n_buckets)
            role = TIED_EMBD if g["role"] == "token_embd" and tied else str(g["role"])
            out.append(SourceGroup(role, b, float(g["ratio"])))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RampError(f"{where}: not a measured group report ({type(e).__name__}: {e})") from None
    bad = [g for g in out if not (math.isfinite(g.ratio) and g.ratio > 0)]
    if bad:
        raise RampError(f"{where}: group {bad[0].role} has ratio {bad[0].ratio}, not a positive number")
    return tuple(out)


def build_table(sources: Mapping[str, Iterable[SourceGroup]], n_buckets: int) -> RatioTable:
    """ℓ̄ per (role, bucket) over the `sources` (label → that model's groups), each centred on its median."""
    if not sources:
        raise RampError("a ratio table needs at least one source model")
    per_key: dict[Key, list[float]] = defaultdict(list)
    for label, groups in sources.items():
        gs = list(groups)
        if not gs:
            raise RampError(f"{label}: no measured groups")
        logs = [math.log(g.ratio) for g in gs]
        mid = median(logs)
        for g, lg in zip(gs, logs, strict=True):
            per_key[(g.role, g.bucket)].append(lg - mid)
    records = tuple(
        RatioRecord(role, bucket, sum(v) / len(v), len(v))
        for (role, bucket), v in sorted(per_key.items(), key=lambda kv: (kv[0][0], _order(kv[0][1])))
    )
    return RatioTable(n_buckets, tuple(sources), records)


def _order(bucket: int | None) -> int:
    return -1 if bucket is None else bucket


def to_json(t: RatioTable) -> dict[str, Any]:
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "n_buckets": t.n_buckets,
        "sources": list(t.sources),
        "records": [[r.role, r.bucket, r.log_ratio, r.n_sources] for r in t.records],
    }


def from_json(d: Any, where: str = "ratio table") -> RatioTable:
    d = check_header(d, KIND, FORMAT_VERSION, where, "group ratio table")
    try:
        records = tuple(
            RatioRecord(str(role), None if b is None else int(b), float(lr), int(n))
            for role, b, lr, n in d["records"]
        )
        table = RatioTable(int(d["n_buckets"]), tuple(str(s) for s in d["sources"]), records)
    except (KeyError, TypeError, ValueError) as e:
        raise RampError(f"{where}: damaged ratio table ({type(e).__name__}: {e})") from None
    if table.n_buckets < 1 or not all(math.isfinite(r.log_ratio) for r in records):
        raise RampError(f"{where}: damaged ratio table (buckets or ratios out of range)")
    return table


def save(t: RatioTable, dst: str | os.PathLike[str], force: bool = False) -> Path:
    """Write `t` as JSON (temp file, then rename)."""
    with atomic_path(dst, force) as tmp:
        tmp.write_text(json.dumps(to_json(t), indent=1) + "\n")
    return Path(dst)


def load(path: str | os.PathLike[str] | None = None) -> RatioTable:
    """The table at `path` (default: the one the package ships)."""
    p = Path(path) if path is not None else SHIPPED
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise RampError(f"{p}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise RampError(f"{p}: not a ramp-cpp group ratio table (not JSON)") from None
    return from_json(d, str(p))
