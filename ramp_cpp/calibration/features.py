"""Layer embeddings: the 11-dim state the RAMP policy sees for each searched tensor (paper §3.2, Table 24).

Dims 1-9 are static (structure, weight and activation statistics); dims 10-11 (previous bits / 8 and running
average bits / 8) are filled in as an episode proceeds (`Features.state`). Static dims are standardized per
model (Eq. 13): s_hat = (s - mu_s) / (sigma_s + eps), mu_s and sigma_s over the model's searched tensors.
Dims 10-11 are already in [0, 1] and their spread is only known during the search, so they stay raw.

Two variants of the static dims (`--features`):

- `paper`: Table 24 exactly, including the clips min(E[act_scale]*100, 1) and min(max(act_scale)*1000, 1).
  On real models activation maxima are O(1)-O(100), so dims 8-9 sit at the clip value for every tensor and
  carry no information (see `saturation`); std(W)*10 and E|W|*10 clip for small models too.
- `ramp` (default): the same dims without saturation. Dims 4-5 are log10 of std(W) and E|W|, and dims 8-9 the
  width-normalized log activation magnitudes of Eq. 12: log10(mean(act_scale) / sqrt(n_in)) and
  log10(max(act_scale) / sqrt(n_in)). They are ordered like the paper's, so standardization puts them on
  the same scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ramp_cpp.calibration.artifact import Calibration
from ramp_cpp.errors import RampError
from ramp_cpp.model.arch import OTHER, ROLE_BY_NAME

DIM_NAMES: tuple[str, ...] = (
    "depth",
    "log_in",
    "log_out",
    "w_std",
    "w_absmean",
    "type",
    "position",
    "act_mean",
    "act_max",
    "prev_bits",
    "avg_bits",
)
N_DIMS = len(DIM_NAMES)
N_STATIC = 9


@dataclass(frozen=True)
class Variant:
    """How dims 4-5 and 8-9 are computed; `clip` is the value a saturated dim reads (None: no clip)."""

    name: str
    clip: float | None
    doc: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("paper", 1.0, "Table 24 exactly: clipped to [0, 1]"),
        Variant("ramp", None, "Table 24, dims 4-5 and 8-9 log-scaled and width-normalized (Eq. 12)"),
    )
}
DEFAULT_VARIANT = "ramp"


@dataclass(frozen=True)
class FeatureConfig:
    variant: str = DEFAULT_VARIANT
    eps: float = 1e-8  # Eq. 13
    edge_fraction: float = 0.1  # Table 24 dim 7: bottom / top 10% of depth are "early" / "late"


@dataclass
class Features:
    """Static layer embeddings of one model, rows in the policy's visiting order (ModelInfo.searched)."""

    names: list[str]
    raw: np.ndarray  # (L, 11) float64; dims 10-11 zero
    variant: str
    mean: np.ndarray = field(default_factory=lambda: np.zeros(N_DIMS))  # Eq. 13 mu_s (dims 1-9)
    std: np.ndarray = field(default_factory=lambda: np.ones(N_DIMS))  # Eq. 13 sigma_s (dims 1-9)
    eps: float = 1e-8

    def standardized(self) -> np.ndarray:
        """Eq. 13 on dims 1-9; dims 10-11 left at zero for `state` to fill."""
        z = np.zeros_like(self.raw)
        z[:, :N_STATIC] = (self.raw[:, :N_STATIC] - self.mean[:N_STATIC]) / (self.std[:N_STATIC] + self.eps)
        return z

    def state(self, i: int, prev_bits: float, avg_bits: float, z: np.ndarray | None = None) -> np.ndarray:
        """State of tensor i: standardized static dims, prev_bits / 8, avg_bits / 8 (0 for the first)."""
        row = (self.standardized() if z is None else z)[i].copy()
        row[9] = prev_bits / 8.0
        row[10] = avg_bits / 8.0
        return row.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "dims": list(DIM_NAMES),
            "names": self.names,
            "raw": self.raw.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "eps": self.eps,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Features:
        return cls(
            names=list(d["names"]),
            raw=np.asarray(d["raw"], dtype=np.float64),
            variant=str(d["variant"]),
            mean=np.asarray(d["mean"], dtype=np.float64),
            std=np.asarray(d["std"], dtype=np.float64),
            eps=float(d["eps"]),
        )


def _static_row(
    variant: str,
    depth: float,
    n_in: int,
    n_out: int,
    w_std: float,
    w_absmean: float,
    type_scalar: float,
    position: float,
    act: np.ndarray,
) -> list[float]:
    """Dims 1-9 of Table 24 for one tensor (act: per-input-channel max |x|, the paper's act_scales)."""
    tiny = 1e-12
    if variant == "paper":
        d4 = min(w_std * 10.0, 1.0)
        d5 = min(w_absmean * 10.0, 1.0)
        d8 = min(float(act.mean()) * 100.0, 1.0)
        d9 = min(float(act.max()) * 1000.0, 1.0)
    else:
        width = np.sqrt(n_in)
        d4 = float(np.log10(max(w_std, tiny)))
        d5 = float(np.log10(max(w_absmean, tiny)))
        d8 = float(np.log10(max(float(act.mean()) / width, tiny)))
        d9 = float(np.log10(max(float(act.max()) / width, tiny)))
    return [depth, np.log2(n_in / 16.0), np.log2(n_out / 16.0), d4, d5, type_scalar, position, d8, d9]


def compute_features(
    model: Any,
    moments: Mapping[str, tuple[float, float]],
    cal: Calibration,
    cfg: FeatureConfig = FeatureConfig(),
    tensors: list[Any] | None = None,
) -> Features:
    """Layer embeddings for the tensors the policy visits (default: `model.searched`; `model` is a
    ggufio.ModelInfo).

    depth = block / (n_blocks - 1) (Table 24 dim 1 counts transformer layers; the tensors of one block share
    it); position = 0 if depth < edge_fraction, 1 if depth > 1 - edge_fraction, else 0.5 (dim 7).
    `moments`: name -> (std(W), E|W|) from ggufio.weight_moments; `cal`: activation statistics whose
    max_abs per input column is the paper's act_scale.
    """
    if cfg.variant not in VARIANTS:
        raise RampError(f"unknown feature variant {cfg.variant!r} (choose from {', '.join(VARIANTS)})")
    ts = list(model.searched) if tensors is None else tensors
    span = max(model.n_blocks - 1, 1)
    rows = []
    for t in ts:
        act = _act_scale(cal, t.name)
        depth = (t.block if t.block is not None else (0 if t.role == "token_embd" else span)) / span
        position = 0.0 if depth < cfg.edge_fraction else 1.0 if depth > 1.0 - cfg.edge_fraction else 0.5
        role = ROLE_BY_NAME.get(t.role, OTHER)
        w_std, w_abs = moments[t.name]
        static = _static_row(
            cfg.variant,
            depth,
            t.n_per_row,
            t.n_rows,
            w_std,
            w_abs,
            role.type_scalar,
            position,
            act,
        )
        rows.append(static + [0.0, 0.0])
    raw = np.asarray(rows, dtype=np.float64)
    mean = np.zeros(N_DIMS)
    std = np.ones(N_DIMS)
    mean[:N_STATIC] = raw[:, :N_STATIC].mean(axis=0)
    std[:N_STATIC] = raw[:, :N_STATIC].std(axis=0)
    return Features([t.name for t in ts], raw, cfg.variant, mean, std, cfg.eps)


def _act_scale(cal: Calibration, name: str) -> np.ndarray:
    """Per-input-channel max |x| of `name` (an expert tensor's over all its experts: one tensor, one state).
    token_embd is a lookup, not a product: it has no input, so it takes the statistics of the output head that
    shares it (tied) or else of output.weight."""
    for n in (name, "token_embd.weight", "output.weight") if name == "token_embd.weight" else (name,):
        if n in cal.stats:
            return cal.stats[n].pooled().max_abs
    raise RampError(f"calibration from {cal.model_name} has no statistics for {name}")


@dataclass(frozen=True)
class DimReport:
    dim: int  # 1-based, as in Table 24
    name: str
    lo: float
    hi: float
    std: float
    at_clip: float  # fraction of tensors at the clip value (0 when the variant does not clip)
    constant: bool

    @property
    def useless(self) -> bool:
        """Carries no information across this model's tensors: constant or (almost) always clipped."""
        return self.constant or self.at_clip >= 0.95


def saturation(f: Features) -> list[DimReport]:
    """Per static dim: range, spread, fraction of tensors sitting at the clip value, constant or not."""
    clip = VARIANTS[f.variant].clip
    out = []
    for d in range(N_STATIC):
        col = f.raw[:, d]
        at_clip = float(np.mean(np.isclose(col, clip))) if clip is not None and d in (3, 4, 7, 8) else 0.0
        out.append(
            DimReport(
                d + 1,
                DIM_NAMES[d],
                float(col.min()),
                float(col.max()),
                float(col.std()),
                at_clip,
                bool(np.ptp(col) == 0.0),
            )
        )
    return out


def model_features(path: Any, cal: Calibration, cfg: FeatureConfig = FeatureConfig()) -> Features:
    """Inventory and weight moments of `path`, checked against the calibration, into features."""
    from ramp_cpp.calibration.artifact import check_matches
    from ramp_cpp.llama.ggufio import read_inventory, weight_moments

    model = read_inventory(path)
    check_matches(cal, model)
    names = [t.name for t in model.searched]
    return compute_features(model, weight_moments(path, names), cal, cfg)
