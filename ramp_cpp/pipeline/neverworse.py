"""The never-worse rule of a sized run: a file that scores worse on the reward text than llama.cpp's preset of
the same size (the one a `--size` names; the presets stage has already scored it, with the same imatrix) is
not shipped. The preset's own file, as llama.cpp's quantizer writes it (exactly the target's bytes), takes
its place in the run directory, unless the request forces its allocation (`--force-allocation`). `Verdict`
says which was written and by how much, for report.json and the command's last line.

A `--size` in bytes names no preset: there is nothing of the same size to compare with, and the allocation is
written as it is. With `--gpu-size` the preset's file takes the allocation's place only when it meets that cap
too (allocate/gpu.py); else the allocation stays, and the verdict says why.

A run on a portable candidate set (`--types portable`: no IQ type) ships no IQ type whichever file wins: a
preset whose file holds one (`--size IQ4_XS`) does not replace the allocation, and the verdict says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.llama.evaluate import KLDResult
from ramp_cpp.model.ladder import is_portable
from ramp_cpp.pipeline.plan import RunPlan
from ramp_cpp.pipeline.stages import Presets, Runtime, Written
from ramp_cpp.store.atomic import atomic_path

ALLOCATION = "allocation"
PRESET = "preset"


@dataclass(frozen=True)
class Verdict:
    """Which file the run wrote (`written`: ALLOCATION or PRESET), its reward-text `kld` and `ppl`, the
    allocation's KLD, and the preset it was held against (`preset`, `preset_kld`; None without one).
    `forced`: the allocation was written although it scored worse (`--force-allocation`); `barred`: the
    types of the preset's file that the run's portable candidate set rules out, for which the allocation
    was kept although it scored worse."""

    written: str
    kld: float
    ppl: float
    allocation_kld: float
    preset: str | None = None
    preset_kld: float | None = None
    forced: bool = False
    over_gpu: bool = False  # the preset's file would break --gpu-size: the allocation was kept
    barred: tuple[str, ...] = ()

    @property
    def worse(self) -> bool:
        """The allocation scored worse than the preset of the same size."""
        return self.preset_kld is not None and self.allocation_kld > self.preset_kld

    @property
    def note(self) -> str | None:
        """What a user should read of it: nothing when the allocation won or had nothing to lose to."""
        if not self.worse:
            return None
        by = f"reward-text KLD {self.allocation_kld:.4f} against {self.preset_kld:.4f}"
        if self.over_gpu:
            return (
                f"the allocation scored worse than {self.preset} ({by}), but {self.preset}'s file holds more "
                "than --gpu-size on the GPU: the allocation is kept"
            )
        if self.forced:
            return (
                f"the allocation scores worse than {self.preset} ({by}); written anyway (--force-allocation)"
            )
        if self.barred:
            return (
                f"the allocation scores worse than {self.preset} ({by}); written all the same: "
                f"{self.preset}'s file holds {', '.join(self.barred)}, which --types portable rules out"
            )
        return (
            f"the allocation scored worse than {self.preset} ({by}): wrote {self.preset}'s own file "
            f"instead (--force-allocation keeps the allocation)"
        )

    def to_json(self) -> dict[str, Any]:
        """report.json's summary.written."""
        d: dict[str, Any] = {
            "file": self.written,
            "reward_kld": self.kld,
            "allocation_kld": self.allocation_kld,
        }
        if self.preset_kld is not None:
            d |= {
                "preset": self.preset,
                "preset_kld": self.preset_kld,
                "allocation_minus_preset": self.allocation_kld - self.preset_kld,
                "allocation_over_preset": self.allocation_kld / self.preset_kld if self.preset_kld else None,
                "forced": self.forced,
                **({"over_gpu": True} if self.over_gpu else {}),
                **({"preset_types_barred": list(self.barred)} if self.barred else {}),
            }
        return d


def never_worse(
    plan: RunPlan, out: Written, k: KLDResult, presets: Presets, base_cal: Any, rt: Runtime
) -> Verdict:
    """Hold the written file (`out`, scored `k`) against the preset of the run's size; when it loses and the
    request does not force it, quantize the preset again (llama.cpp, the unfolded model, its imatrix: the
    file the presets stage scored) over `out.gguf`. `base_cal`: the unfolded model's calibration."""
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset

    if plan.cc.portable and (bad := barred_types(out.gguf)):  # the candidates cannot give one: a bug
        raise RampError(f"{out.gguf.name} holds {', '.join(bad)} although the candidate set is portable")
    name = plan.preset
    ref = presets.scored.get(name) if name else None
    if name is None or ref is None:
        return Verdict(ALLOCATION, k.kld_mean, k.ppl, k.kld_mean)
    v = Verdict(ALLOCATION, k.kld_mean, k.ppl, k.kld_mean, name, float(ref["quality"]), plan.force_allocation)
    if not v.worse or plan.force_allocation:
        return v
    im = base_cal.imatrix() if plan.cfg.imatrix else None
    try:
        with atomic_path(out.gguf, force=True) as tmp:  # never a half-written file in the allocation's place
            quantize_preset(
                plan.model_path,
                tmp,
                name,
                QuantizeOptions(imatrix=im, n_threads=rt.opts.n_threads, force=True),
                info=plan.info,
            )
            _gpu_fits(plan, tmp)
            if plan.cc.portable and (bad := barred_types(tmp)):
                raise _Barred(bad)  # the temp file goes, the allocation's file stays
    except _OverGpu:
        return replace(v, over_gpu=True)
    except _Barred as e:
        return replace(v, barred=e.types)
    return Verdict(
        PRESET, float(ref["quality"]), float(ref["ppl"]), k.kld_mean, name, float(ref["quality"])
    )


class _OverGpu(Exception):
    """The preset's file breaks --gpu-size: the allocation's file stays (atomic_path drops the preset's)."""


def _gpu_fits(plan: RunPlan, path: Path) -> None:
    if plan.gpu is None:
        return
    from ramp_cpp.allocate.gpu import resident_bytes

    if resident_bytes(path) + plan.gpu.kv_bytes > plan.gpu.cap_bytes:
        raise _OverGpu


class _Barred(Exception):
    """The preset's file holds a type the portable candidate set rules out: the allocation's file stays."""

    def __init__(self, types: tuple[str, ...]) -> None:
        super().__init__(", ".join(types))
        self.types = types


def barred_types(gguf: str | Path) -> tuple[str, ...]:
    """The types of `gguf`'s tensors that a portable run must not write (ladder.is_portable), sorted."""
    from ramp_cpp.llama.ggufio import tensor_types

    names = {t for t, _, _ in tensor_types(gguf).values()}
    return tuple(sorted(n for n in names if not is_portable(GGMLQuantizationType[n])))
