"""A run's shared plumbing, used by the paper's search (pipeline/paper.py), the sized run (pipeline/run.py and
its stages), `apply` and the demo: the model and calibration every method quantizes (calibrated, then folded
when asked, both kept in the run folder), output names, scratch space and the stage callbacks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.costs import Meter, stage
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.store.cache import SHARD_NAME, scratch_dir

if TYPE_CHECKING:
    from ramp_cpp.fold.folding import FoldConfig
    from ramp_cpp.llama.ggufio import ModelInfo

Progress = Callable[[str, int, int], None]  # (stage, done, total)
CALIB = "calib.safetensors"  # the unfolded model's calibration, kept with the run


class SourceSettings(Protocol):
    """What `calibrated_source` reads of a run's settings (the paper's SearchConfig and the sized run's
    SizedConfig have both)."""

    @property
    def calib(self) -> CalibConfig: ...

    @property
    def fold(self) -> bool: ...


def staged(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    """A stage's (done, total) callback reporting to a (stage, done, total) progress callback."""
    if progress is None:
        return None
    cb = progress
    return lambda done, total: cb(name, done, total)


def visited_tensors(model: Any, include_embeddings: bool) -> list[Any]:
    """The searched tensors in visiting order; with embeddings, token_embd first and output last."""
    ts = list(model.searched)
    if include_embeddings:
        emb = [t for t in model.tensors if t.role == "token_embd"]
        head = [t for t in model.tensors if t.role == "output"]
        ts = emb + ts + head
    return ts


#: Precision tags a model file's name may end with before `.gguf`; the output names drop them.
PRECISION_TAGS = ("f16", "bf16", "f32")


def model_stem(path: str | os.PathLike[str]) -> str:
    """The model's name for output files: its file name less a trailing `.gguf` and then a trailing
    precision tag (`PRECISION_TAGS`, any case); every other dot stays (`Qwen2.5-0.5B-Instruct.f16.gguf`
    -> `Qwen2.5-0.5B-Instruct`). A split set's first shard is named by its set (`M.f16-00001-of-00004.gguf`
    -> `M`): an output named like a shard would read as one."""
    name = Path(path).name
    shard = SHARD_NAME.match(name)
    if shard is not None:
        name = shard["prefix"] + ".gguf"
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    stem, dot, tag = name.rpartition(".")
    return stem if dot and stem and tag.lower() in PRECISION_TAGS else name


def ramp_output_name(model_path: str | os.PathLike[str], label: str) -> str:
    """`MODEL.ramp-LABEL.gguf` (LABEL: the budget, e.g. 5.5, or a --size target)."""
    return f"{model_stem(model_path)}.ramp-{label}.gguf"


def workdir() -> Path:
    """Scratch space for the episode GGUF (`cache.scratch_dir`: tmpfs when there is one)."""
    return scratch_dir("episode")


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Source:
    """What every method quantizes: the model (folded or not), its inventory and its calibration; `base_cal`
    is the unfolded model's (the presets' imatrix)."""

    path: Path
    cal: Calibration
    base_cal: Calibration
    info: ModelInfo = field(compare=False, repr=False)


def calibrated_source(
    model_path: str | os.PathLike[str],
    run_dir: Path,
    cfg: SourceSettings,
    opts: RuntimeOptions,
    calib: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    original: ModelInfo | None = None,
    meter: Meter | None = None,
    fold_cfg: FoldConfig | None = None,
) -> Source:
    """Calibrate (or reuse `calib` / the run's own), then fold when `cfg.fold`, with `fold_cfg` (default: the
    paper's exponent 0.5); both kept in `run_dir`. `original`: `model_path`'s inventory when the caller has
    read it (read here otherwise)."""
    from ramp_cpp.calibration.artifact import check_matches, load_calibration, save_calibration
    from ramp_cpp.calibration.collect import calibrate
    from ramp_cpp.fold.folding import FoldConfig, fold, folded_calibration_from_file
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.store.texts import load_text

    original = original or read_inventory(model_path)
    cal_path = run_dir / CALIB
    if calib is not None:
        cal = load_calibration(calib)
        if not cal_path.is_file():  # kept with the run, so --resume needs no --calib
            save_calibration(cal, cal_path)
    elif cal_path.is_file():
        cal = load_calibration(cal_path)
    else:
        cal_text, _ = load_text(cfg.calib.text)
        with stage(meter, "calibrate"):
            cal = calibrate(model_path, cal_text, cfg.calib, opts, staged(progress, "calibrate"), original)
            save_calibration(cal, cal_path, force=True)
    check_matches(cal, original)
    if not cfg.fold:
        return Source(Path(model_path), cal, cal, original)
    fcfg = fold_cfg or FoldConfig()
    folded = run_dir / "folded.f16.gguf"
    if folded.is_file():
        finfo = read_inventory(folded)  # the folded file's own, read once for every stage after
        return Source(folded, folded_calibration_from_file(cal, folded, fcfg, info=finfo), cal, finfo)
    with stage(meter, "fold"):
        fres = fold(model_path, cal, folded, force=True, progress=staged(progress, "fold"), info=original,
                    cfg=fcfg)
    return Source(folded, fres.calibration, cal, read_inventory(folded))
