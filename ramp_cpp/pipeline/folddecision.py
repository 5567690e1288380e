"""The fold setting (`Fold`, its legal values named here only) and `--fold auto`'s rule: the evidence
(`FoldEvidence`, per-chunk KLDs of one allocator's file with and without Scale Folding), the decision
(`choose_fold`) and what a run reports of it (`FoldDecision`). Pure: the files are assembled and scored by
the run's fold stage (`stages.decide_fold`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.errors import RampError
from ramp_cpp.store.jsonfile import read_keyed, write_keyed


class Fold(StrEnum):
    """Scale Folding in a sized run: `on` / `off` as asked; `auto`: both models measured, the one whose
    allocation scores the lower reward KLD kept; `check`: the folded model measured, its allocation also
    quantized from the unfolded model, folded unless that is clearly better (folddecision.choose_fold).
    The paper's `--budget` search takes `on` or `off` only."""

    CHECK = "check"
    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @property
    def decided_by_run(self) -> bool:
        """auto and check: the run measures and decides."""
        return self in (Fold.AUTO, Fold.CHECK)

    @property
    def foldings(self) -> tuple[bool, ...]:
        """The folding choices a run prepares: both for auto and check (unfolded first), else the one
        asked for."""
        return (False, True) if self.decided_by_run else (self is Fold.ON,)


def parse_fold(value: str | Fold) -> Fold:
    """A fold setting from its name; one line naming the legal values otherwise."""
    try:
        return Fold(str(value).strip().lower())
    except ValueError:
        raise RampError(f"unknown --fold {value!r} (choose from {', '.join(Fold)})") from None


#: `--fold auto` scores both settings' allocations on this many chunks of the reward text (from chunk 0, so
#: the reward chunks are among them): on the demo model 4 chunks chose wrong at 2 of 3 sizes, held-out text
#: being the judge (bench/results/smollm2.fold.md)
FOLD_CHUNKS = 16
#: `--fold check` scores one allocation (greedy's on the folded model's measured sensitivity) quantized from
#: the folded and from the unfolded model on this many chunks: the same types on both sides, so the paired
#: difference is folding's alone and half the chunks of `auto` decide it (issue 21: its cost, 2 x 8 chunks
#: and one quantizer pass, against auto's 2 x 16 chunks and a second tensor cache and set of probes)
FOLD_CHECK_CHUNKS = 8
#: fold unless the unfolded model is better by more than this many standard errors of the paired difference
FOLD_MARGIN = 1.0


@dataclass(frozen=True)
class FoldEvidence:
    """Per-chunk mean KLDs of one allocator's file with (`on_chunks`) and without folding, same chunks.

    delta = mean_i(on_i − off_i), stderr = std_i(on_i − off_i) / √n: paired by chunk, so the text's own
    variation between chunks (far larger than the difference between the two files) cancels."""

    on_chunks: tuple[float, ...]
    off_chunks: tuple[float, ...]

    @classmethod
    def of(cls, on: Sequence[float], off: Sequence[float]) -> FoldEvidence:
        if len(on) != len(off) or not on:
            raise RampError("fold evidence needs the same chunks, at least one, for both settings")
        return cls(tuple(float(x) for x in on), tuple(float(x) for x in off))

    @property
    def on(self) -> float:
        return float(np.mean(self.on_chunks))

    @property
    def off(self) -> float:
        return float(np.mean(self.off_chunks))

    @property
    def delta(self) -> float:
        return self.on - self.off

    @property
    def stderr(self) -> float:
        d = np.subtract(self.on_chunks, self.off_chunks)
        return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"on": self.on, "off": self.off, "delta": self.delta, "stderr": self.stderr,
                "chunks": len(self.on_chunks)}


def choose_fold(ev: FoldEvidence, margin: float = FOLD_MARGIN) -> bool:
    """`--fold auto`: fold (the paper's §4.3 default) unless the unfolded model's allocation measured a
    lower KLD by more than `margin` paired standard errors: fold iff delta ≤ margin · stderr. A base still on
    a quantizer's grid (dequantized from a quantized file) loses that grid when folded, by a wide margin."""
    return ev.delta <= margin * ev.stderr


@dataclass(frozen=True)
class FoldDecision:
    """The folding a run keeps: `folded`; with `--fold auto`, also the `allocator` whose files were compared
    and the `evidence` (None when the request named the folding)."""

    folded: bool
    allocator: str | None = None
    evidence: FoldEvidence | None = None
    mode: str = "auto"  # or "check": one allocation quantized from both models

    @classmethod
    def auto(cls, allocator: str, evidence: FoldEvidence, mode: str = "auto") -> FoldDecision:
        return cls(choose_fold(evidence), allocator, evidence, mode)

    @property
    def choice(self) -> str:
        return "on" if self.folded else "off"

    def to_json(self) -> dict[str, Any]:
        """report.json's summary.fold."""
        ev = self.evidence
        if ev is None:
            return {"choice": self.choice}
        kld = {"on": ev.on, "off": ev.off}
        return {"choice": self.choice, "allocator": self.allocator, "reward_kld": kld,
                "evidence": ev.to_json(), **({"mode": self.mode} if self.mode != "auto" else {})}

    def metadata(self) -> dict[str, str]:
        """The GGUF's ramp.fold_choice, with --fold auto only."""
        if self.evidence is None:
            return {}
        e = self.evidence.to_json()
        return {
            "ramp.fold_choice": (
                f"{self.mode}: {self.choice} (KLD on {e['on']:.5g}, off {e['off']:.5g}, paired "
                f"difference {e['delta']:+.3g} ± {e['stderr']:.2g} over {e['chunks']} chunks)"
            )
        }


#: --fold check's decision when it kept the unfolded model, saved in the run folder before the folded copy and
#: cache are deleted (stages.release_folded), so that a resumed run does not make them again
KEPT_UNFOLDED = "fold-check.json"


def save_kept(path: Path, decision: FoldDecision) -> None:
    ev = decision.evidence
    if ev is None:
        raise RampError("only a fold check's decision, with its evidence, is saved")
    write_keyed(path, {"format": 1}, {"allocator": decision.allocator, "on": list(ev.on_chunks),
                                      "off": list(ev.off_chunks)})


def load_kept(path: Path) -> FoldDecision | None:
    """The decision `save_kept` saved (the unfolded model kept), or None when there is none."""
    d = read_keyed(path, {"format": 1})
    if not d:
        return None
    return FoldDecision(False, d["allocator"], FoldEvidence.of(d["on"], d["off"]), "check")
