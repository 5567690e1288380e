"""What a run costs, counted where the work happens and read per stage.

Three counters are kept for the whole process, by the code that does the work: `COUNTERS.tokens`, tokens
decoded through llama.cpp (each `llama_decode` of the llama edge adds its batch), `COUNTERS.quant_passes`,
calls of llama.cpp's quantizer over a model, and `COUNTERS.quant_weights`, weights the in-memory tensor cache
quantized (tensorcache module doc; quant_weights over the model's searched weights is that work in passes).
A `Meter` reads them around each stage of a run, together with

    wall_s      wall-clock seconds                      cpu_s     user + system seconds of this process
    peak_rss    the stage's peak resident set (VmHWM, reset at the stage's start where Linux allows it;
                file pages mapped from the tensor cache count too)
    written     bytes this process sent to storage (/proc/self/io write_bytes: tmpfs scratch is not counted)
    held        bytes the run holds on disk when the stage ends (the caller's `held()`: run folder and caches)
    E           tokens / eval_tokens: evaluation units, one forward pass over the reward chunks (4 x 512
                tokens by default), so that costs compare across machines and models

Library code stays silent: the meter calls `on_stage(StageCost)` when a stage ends, and the caller shows it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Counters:
    tokens: int = 0
    quant_passes: int = 0
    quant_weights: int = 0


COUNTERS = Counters()


def _proc_field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def written_bytes() -> int:
    """Bytes this process caused to be written to storage so far (0 where /proc/self/io is not readable)."""
    return _proc_field("/proc/self/io", "write_bytes:") or 0


def _reset_peak_rss() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0, own process)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib = _proc_field("/proc/self/status", "VmHWM:")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class StageCost:
    stage: str
    wall_s: float
    cpu_s: float
    peak_rss: int
    written: int
    held: int
    tokens: int
    E: float
    quant_passes: int
    quant_weights: int = 0  # stages stored before the in-memory cache have none

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def total(s: Sequence[StageCost]) -> StageCost:
    """A run's costs from its stages': sums, and the maxima of peak RSS and disk held."""
    return StageCost(
        stage="total",
        wall_s=sum(c.wall_s for c in s),
        cpu_s=sum(c.cpu_s for c in s),
        peak_rss=max((c.peak_rss for c in s), default=0),
        written=sum(c.written for c in s),
        held=max((c.held for c in s), default=0),  # the most held at any stage's end
        tokens=sum(c.tokens for c in s),
        E=sum(c.E for c in s),
        quant_passes=sum(c.quant_passes for c in s),
        quant_weights=sum(c.quant_weights for c in s),
    )


def stage(meter: Meter | None, name: str) -> contextlib.AbstractContextManager[None]:
    """`meter.stage(name)`, or nothing to measure without a meter."""
    return meter.stage(name) if meter is not None else contextlib.nullcontext()


@dataclass
class Meter:
    """Per-stage costs of one run. `eval_tokens`: tokens of one evaluation unit (reward chunks x n_ctx)."""

    eval_tokens: int
    on_stage: Callable[[StageCost], None] | None = None
    held: Callable[[], int] | None = None
    stages: list[StageCost] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _reset_peak_rss()  # where it cannot, VmHWM is the process's peak so far: an upper bound
        t0, c0, w0 = time.perf_counter(), _cpu_seconds(), written_bytes()
        tok0, q0, w0q = COUNTERS.tokens, COUNTERS.quant_passes, COUNTERS.quant_weights
        try:
            yield
        finally:
            tokens = COUNTERS.tokens - tok0
            cost = StageCost(
                stage=name,
                wall_s=time.perf_counter() - t0,
                cpu_s=_cpu_seconds() - c0,
                peak_rss=peak_rss_bytes(),
                written=written_bytes() - w0,
                held=self.held() if self.held is not None else 0,
                tokens=tokens,
                E=tokens / self.eval_tokens if self.eval_tokens else 0.0,
                quant_passes=COUNTERS.quant_passes - q0,
                quant_weights=COUNTERS.quant_weights - w0q,
            )
            self.stages.append(cost)
            if self.on_stage is not None:
                self.on_stage(cost)

    def total(self) -> StageCost:
        return total(self.stages)

    def to_json(self) -> dict[str, Any]:
        """report.json's "costs": every stage, and the total (sums; peak RSS and disk held: maxima)."""
        return {
            "eval_tokens": self.eval_tokens,
            "stages": [c.to_json() for c in self.stages],
            "total": self.total().to_json(),
        }
