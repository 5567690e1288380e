"""Checks on the real demo model (SmolLM2-135M F16); skipped when it has not been fetched."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import quantize_preset

pytestmark = pytest.mark.demo
ROOT = Path(__file__).resolve().parent.parent


def test_inventory_of_demo(demo_model: Path) -> None:
    info = read_inventory(demo_model)
    assert (info.arch, info.n_blocks, info.tied_output) == ("llama", 30, True)
    assert len(info.searched) == 210
    assert all(t.ggml_type == "F16" for t in info.tensors)


@pytest.mark.slow
def test_ppl_agrees_with_transformers(demo_model: Path, wikitext: Callable[[str], str]) -> None:
    """The correctness anchor: llama.cpp in process vs PyTorch fp32 through transformers, same tokens."""
    wikitext("wikitext2-test")  # the script reads it: skipped where it cannot be had
    import json

    r = subprocess.run(
        [sys.executable, "-m", "bench.studies.check_ppl_transformers", str(demo_model), "--chunks", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    d = json.loads(r.stdout)
    assert d["relative_difference"] < 0.01, d


@pytest.mark.slow
def test_q8_is_closer_than_q4_k_m(demo_model: Path, tmp_path: Path, wikitext: Callable[[str], str]) -> None:
    text = wikitext("wikitext2-test")
    cfg = EvalConfig(n_chunks=2)
    q8 = quantize_preset(demo_model, tmp_path / "q8.gguf", "Q8_0")
    q4 = quantize_preset(demo_model, tmp_path / "q4.gguf", "Q4_K_M")
    k8, k4 = kld(q8.path, demo_model, text, cfg), kld(q4.path, demo_model, text, cfg)
    assert 0 < k8.kld_mean < k4.kld_mean
    assert k8.same_top_pct > k4.same_top_pct
    assert q8.file_size > q4.file_size
