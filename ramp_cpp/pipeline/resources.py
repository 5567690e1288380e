"""What a sized run will hold on disk and in tmpfs, from the inventory alone, and the refusal before any work
when it is not there (issue 21: a run that cannot finish must not start).

    folded copy   the F16 model rewritten by Scale Folding (once per run folder; none with --fold off)
    tensor cache  every searched tensor at every requested type and the base type, as llama.cpp writes it
                  (fallbacks included), per folding choice measured (two with --fold auto; with --fold
                  check the unfolded model's only after the folded copy and, when it is in the run folder,
                  the folded cache are deleted); in memory (--tensor-cache memory) the base type only
    quantizer     llama.cpp's output of one pass, cut into the cache, then removed: at most a Q8_0 model
    output        the GGUF, at most the largest file; written after the last quantizer output is removed, so
                  the peak counts the larger of the two; twice that with --split-max-size (the one file
                  and its shards are on disk together until the shards are renamed into place)
    scratch       probe and fold-check files, two at a time (tmpfs when there is one, else the temp dir)

Bytes come from `gguf.GGML_QUANT_SIZES` through `ladder.tensor_nbytes`, padded to the file's alignment. What
the run folder and cache already hold counts as done (a resumed run needs only the rest).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import ModelInfo
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors
from ramp_cpp.model.ladder import tensor_nbytes, written_type
from ramp_cpp.pipeline.folddecision import KEPT_UNFOLDED
from ramp_cpp.store.cache import disk_bytes, scratch_root

GIB = 1 << 30


@dataclass(frozen=True)
class DiskNeeds:
    folded: int
    cache_per_folding: int
    foldings_measured: int
    quantizer: int
    output: int
    scratch: int
    held: int  # already on disk in the run folder and cache
    #: deleted before the second folding is measured: --fold check's folded copy, and its cache when that is
    #: in the run folder (stages.release_folded)
    released: int = 0

    @property
    def disk(self) -> int:
        """The peak: max(folded copy + one cache, folded copy + every cache - released) + max(quantizer,
        output). The quantizer's output is cut into the cache and removed before the GGUF is written (the
        cache stages end before the fit), so the two are never on disk together; counting both made a 7B run
        ask for 2.6x its F16 file instead of 2.07x."""
        first = self.folded + self.cache_per_folding
        every = self.folded + self.cache_per_folding * self.foldings_measured - self.released
        total = max(first, every) + max(self.quantizer, self.output)
        return max(0, total - self.held)


def disk_needs(
    info: ModelInfo, cc: CandidateConfig, fold: str, hi: int, run_dir: Path, cache_root: Path, jobs: int = 1,
    in_memory: bool = False, split: bool = False,
) -> DiskNeeds:
    """What the run will write. `jobs`: tensor-cache passes and probes at once on this machine (--workers):
    each pass holds its own quantizer output in the cache folder, each probe its own file in scratch.
    `in_memory`: the cache keeps the base type only (tensorcache module doc)."""
    def padded(n: int) -> int:
        return -(-n // info.alignment) * info.alignment

    searched = searched_tensors(info, cc.embeddings)
    # build_cache quantizes every searched tensor at every requested type (and the base), keeping the bytes
    # llama.cpp writes, fallbacks included: one file per type, each holding every tensor
    kinds = [cc.base] if in_memory else list(dict.fromkeys([*cc.requested(), cc.base]))
    cache = sum(
        padded(tensor_nbytes(written_type(k, t.n_per_row), t.n_params)) for t in searched for k in kinds
    )
    q8 = sum(padded(tensor_nbytes(written_type(cc.base, t.n_per_row), t.n_params)) for t in info.tensors)
    kept = fold == "check" and (run_dir / KEPT_UNFOLDED).is_file()  # resumed: the folded ones are gone
    folded = 0 if fold == "off" or kept or (run_dir / "folded.f16.gguf").is_file() else info.file_size
    in_run = cache_root.resolve().is_relative_to(run_dir.resolve())
    return DiskNeeds(
        folded=folded,
        cache_per_folding=cache,
        # check: the unfolded model is measured too when the check keeps it (the 7B shape's was), after the
        # folded copy and (in the run folder) the folded cache are deleted
        foldings_measured=2 if fold == "auto" or (fold == "check" and not kept) else 1,
        quantizer=q8 * jobs,
        output=hi * (2 if split else 1),
        scratch=(1 + jobs) * hi,
        held=disk_bytes(run_dir, cache_root),
        released=info.file_size + cache * in_run if fold == "check" and not kept else 0,
    )


def _free(path: Path) -> int:
    p = path
    while not p.exists():  # the run folder may not exist yet: its nearest existing parent's filesystem
        p = p.parent
    return shutil.disk_usage(p).free


def check_resources(
    n: DiskNeeds, run_dir: Path, fold: str, n_types: int, memory_saves: int = 0
) -> None:
    """Refuse, in one line naming what would make it fit, a run whose disk or scratch space is not there.
    `memory_saves`: what --tensor-cache memory would save (0 when the run already keeps it in memory)."""
    free = _free(run_dir)
    if n.disk > free:
        saves = [f"--tensor-cache memory saves {memory_saves / GIB:.1f} GiB"] if memory_saves else []
        if n.folded:
            saves.append(f"--fold off saves {n.folded / GIB:.1f} GiB")
        one = replace(n, foldings_measured=1, released=0).disk
        if fold in ("auto", "check") and one < n.disk:
            saves.append(f"--fold on saves {(n.disk - one) / GIB:.1f} GiB")
        if n_types > 2 and not memory_saves:
            per = n.cache_per_folding * n.foldings_measured / n_types
            saves.append(f"each --types dropped saves ~{per / GIB:.1f} GiB")
        raise RampError(
            f"this run needs {n.disk / GIB:.1f} GiB more on {run_dir} and {free / GIB:.1f} GiB is free "
            f"(folded copy {n.folded / GIB:.1f}, tensor cache {n.cache_per_folding / GIB:.1f} x "
            f"{n.foldings_measured}, quantizer output {n.quantizer / GIB:.1f}, GGUF {n.output / GIB:.1f}); "
            + "; ".join([*saves, "or --out on a larger disk"])
        )
    scratch = scratch_root()
    sfree = _free(scratch)
    if n.scratch > sfree:
        raise RampError(
            f"probe files need {n.scratch / GIB:.1f} GiB in {scratch} and {sfree / GIB:.1f} GiB is free: "
            f"set RAMP_SCRATCH_DIR to a folder with room"
        )


def fits(n: DiskNeeds, run_dir: Path) -> bool:
    """Whether the disk has room for what the run will write."""
    return n.disk <= _free(run_dir)


def check_plan_resources(
    info: ModelInfo, cc: CandidateConfig, fold: str, hi: int, run_dir: Path, cache_root: Path, jobs: int = 1,
    in_memory: bool = False, split: bool = False,
) -> DiskNeeds:
    n = disk_needs(info, cc, fold, hi, run_dir, cache_root, jobs, in_memory, split)
    saves = 0
    if not in_memory:
        m = disk_needs(info, cc, fold, hi, run_dir, cache_root, jobs, True, split)
        saves = n.disk - m.disk
    check_resources(n, run_dir, fold, len(cc.requested()), saves)
    return n
