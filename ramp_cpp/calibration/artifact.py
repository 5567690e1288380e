"""The calibration artifact: per-input-channel activation statistics of every weight tensor.

One file, `CALIB.safetensors`: for each weight tensor `W` (named as in the GGUF, `blk.0.attn_q.weight`),
tensors `W.max_abs` (float32, max |x| per input column), `W.sum_sq` (float64, sum of x^2 per input column)
and `W.count` (int64, one element: rows of x seen). An expert tensor (3-D, n_expert slices, e.g.
`blk.0.ffn_up_exps.weight`) has `W.max_abs` and `W.sum_sq` of shape (n_expert, n_in), row e over the rows
routed to expert e, and `W.counts` (int64, (n_expert,): rows routed to each expert; `W.count` stays the tokens
seen, and counts sum to top-k times it). The safetensors header's `__metadata__` holds
`ramp.calibration`, a JSON object naming the model (file name, sha256, architecture), the text, samples,
ctx, seed and token count. Tensors that read the same input (q, k, v) carry identical statistics, as in
llama.cpp's imatrix.

This module only defines the artifact and its checks; `calibrate.py` measures it through llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.ggufio import write_imatrix_gguf
from ramp_cpp.store import stfile

FORMAT_VERSION = 1
#: suffix of an expert tensor's per-expert row counts (`W.counts`); a 2-D weight has none
EXPERT_COUNTS = "counts"


@dataclass(frozen=True)
class CalibConfig:
    """What text runs through the model. Defaults: paper §5.2 / Table 10-11, 128 sequences x 2048 tokens
    of WikiText-2 (here the validation split: the test split is held out for evaluation)."""

    text: str = "wikitext2-valid"
    samples: int = 128
    ctx: int = 2048
    seed: int = 0



@dataclass
class Calibration:
    model_name: str  # file name of the GGUF it was measured on
    model_sha256: str
    arch: str
    config: CalibConfig
    n_tokens: int  # tokens run through the model
    stats: dict[str, InputStats] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"folded_by": ...} after scale folding

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "arch": self.arch,
            "config": asdict(self.config),
            "n_tokens": self.n_tokens,
            "extra": self.extra,
        }

    def describe(self) -> str:
        c = self.config
        return f"{c.text}, {c.samples}x{c.ctx} tokens, seed {c.seed}, on {self.model_name}"

    def imatrix(self) -> dict[str, np.ndarray]:
        """name -> E[x^2] per input column, the form `native.quantize_model` takes ((n_expert, n_in) for an
        expert tensor: llama.cpp's quantizer reads expert e's row e)."""
        return {name: s.mean_sq for name, s in self.stats.items()}


def save_calibration(cal: Calibration, dst: str | os.PathLike[str], force: bool = False) -> Path:
    tensors: dict[str, np.ndarray] = {}
    for name, s in cal.stats.items():
        tensors[f"{name}.max_abs"] = np.ascontiguousarray(s.max_abs, dtype=np.float32)
        tensors[f"{name}.sum_sq"] = np.ascontiguousarray(s.sum_sq, dtype=np.float64)
        tensors[f"{name}.count"] = np.array([s.count], dtype=np.int64)
        if s.counts is not None:
            tensors[f"{name}.{EXPERT_COUNTS}"] = np.ascontiguousarray(s.counts, dtype=np.int64)
    return stfile.write(dst, tensors, "ramp.calibration", cal.header(), force)


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration artifact; one RampError line for anything that is not one."""
    p = Path(path)
    raw, h = stfile.read(p, "ramp.calibration", "calibration file")
    if h.get("format") != FORMAT_VERSION:
        raise RampError(f"{p}: calibration format {h.get('format')} (this ramp-cpp reads {FORMAT_VERSION})")
    stats: dict[str, InputStats] = {}
    for key in raw:
        if key.endswith(".max_abs"):
            name = key[: -len(".max_abs")]
            counts = raw.get(f"{name}.{EXPERT_COUNTS}")
            stats[name] = InputStats(
                max_abs=raw[key].astype(np.float32),
                sum_sq=raw[f"{name}.sum_sq"].astype(np.float64),
                count=int(raw[f"{name}.count"][0]),
                counts=None if counts is None else counts.astype(np.int64),
            )
            if stats[name].max_abs.ndim != (1 if counts is None else 2):
                raise RampError(f"{p}: {name} has statistics of shape {stats[name].max_abs.shape} "
                                f"{'without' if counts is None else 'with'} per-expert counts")
    return Calibration(
        model_name=h["model_name"],
        model_sha256=h["model_sha256"],
        arch=h["arch"],
        config=CalibConfig(**h["config"]),
        n_tokens=int(h["n_tokens"]),
        stats=stats,
        extra=dict(h.get("extra", {})),
    )


def check_matches(cal: Calibration, model: Any, need: list[str] | None = None) -> None:
    """Refuse a calibration measured on another model: architecture, tensor names and input widths must
    agree with `model` (a ggufio.ModelInfo). `need` lists tensors whose statistics the caller uses
    (default: every searched tensor)."""
    if cal.arch != model.arch:
        raise RampError(
            f"calibration was measured on a {cal.arch} model ({cal.model_name}), "
            f"this model is {model.arch} ({Path(model.path).name})"
        )
    names = need if need is not None else [t.name for t in model.searched]
    by_name = {t.name: t for t in model.tensors}
    missing = [n for n in names if n not in cal.stats]
    if missing:
        raise RampError(
            f"calibration from {cal.model_name} has no statistics for {len(missing)} tensors of "
            f"{Path(model.path).name} (first: {missing[0]}): measured on another model?"
        )
    for n in names:
        t = by_name.get(n)
        if t is None:
            continue
        s = cal.stats[n]
        if s.max_abs.shape[-1] != t.n_per_row:
            raise RampError(
                f"calibration from {cal.model_name} has {s.max_abs.shape[-1]} input columns for "
                f"{n}, {Path(model.path).name} has {t.n_per_row}: measured on another model"
            )
        # per-expert rows are read by expert index (imatrix slice e quantizes expert e): another expert
        # count would pair slices with the wrong experts, or run past them. Pooled (1-D) statistics of an
        # expert tensor stay usable: every expert gets the same row.
        if s.max_abs.ndim == 2 and s.max_abs.shape[0] != t.n_expert:
            have = f"{t.n_expert} experts" if t.n_expert > 1 else "no experts (a 2-D weight)"
            raise RampError(
                f"calibration from {cal.model_name} has per-expert statistics of {s.max_abs.shape[0]} "
                f"experts for {n}, {Path(model.path).name} has {have}: measured on another model"
            )


def write_imatrix(cal: Calibration, path: str | os.PathLike[str], force: bool = False) -> Path:
    """`cal` as a llama-imatrix GGUF for `quantize --imatrix` / llama-quantize: one chunk per calibration
    window (imatrix.chunk_count = samples, chunk_size = ctx); llama-quantize then uses `cal.imatrix()`."""
    if not any(n.startswith("blk.") for n in cal.stats):
        raise RampError(f"calibration of {cal.model_name} holds no blk.* statistics: no imatrix to write")
    return write_imatrix_gguf(
        cal.stats, path, dataset=cal.config.text, chunk_count=cal.config.samples, chunk_size=cal.config.ctx,
        force=force,
    )
