"""Issue 21's disk and quantization levers end to end: the tensor cache in memory writes the same GGUF as
the cache on disk and keeps a fraction of its bytes; the proxy measured on sampled rows estimates the
whole tensor's error; bad settings fail before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_cli_errors import one_error_line
from test_sized_run import cfg
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import TensorInfo, read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.proxy import SAMPLE_SPAN, Weighting, row_spans, span_batches, tensor_errors
from ramp_cpp.pipeline.plan import plan_run, size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.resources import disk_needs
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.store.cache import disk_bytes

runner = CliRunner()


@pytest.mark.parametrize(
    ("n_rows", "sample", "step", "spans", "scale"),
    [
        (100, 1, 40, [(0, 40), (40, 80), (80, 100)], 1.0),  # every row, in pieces of `step`
        (128, 2, 999, [(8, 24), (40, 56), (72, 88), (104, 120)], 2.0),  # offset half a stride's gap
        (128, 4, 999, [(24, 40), (88, 104)], 4.0),
        (20, 4, 999, [(4, 20)], 20 / 16),  # fewer rows than a stride: one span, still inside the tensor
        (10, 4, 999, [(0, 10)], 1.0),  # fewer rows than a span: all of them
    ],
)
def test_row_spans(n_rows: int, sample: int, step: int, spans: list[tuple[int, int]], scale: float) -> None:
    got, s = row_spans(n_rows, sample, step)
    assert got == spans and s == pytest.approx(scale)
    assert all(b - a <= max(step, SAMPLE_SPAN) for a, b in got)


class _Source:
    """What tensor_errors reads of gguf-py's tensor: its F32 data and type."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.tensor_type = data, T.F32


def _errors(w: np.ndarray, noise: np.ndarray, cols: np.ndarray, sample: int) -> float:
    t = TensorInfo("blk.0.ffn_up.weight", "ffn_up", 0, w.shape[1], w.shape[0], w.size, "F32", 0, True, 0)
    return tensor_errors(_Source(w), t, [T.Q4_K], Weighting(cols, None),
                         lambda _t, spans, _w: np.concatenate([w[a:b] + noise[a:b] for a, b in spans]),
                         1 << 12, sample)[0]


@pytest.mark.parametrize(
    ("spans", "step", "batches"),
    [
        ([(0, 16), (64, 80), (128, 144)], 32, [[(0, 16), (64, 80)], [(128, 144)]]),
        ([(0, 16), (64, 80), (128, 144)], 48, [[(0, 16), (64, 80), (128, 144)]]),
        ([(0, 40), (40, 80), (80, 100)], 40, [[(0, 40)], [(40, 80)], [(80, 100)]]),  # pieces of `step`
        ([(0, 50), (60, 70)], 40, [[(0, 50)], [(60, 70)]]),  # a span longer than a batch goes alone
        ([], 40, []),
    ],
)
def test_span_batches(spans: list[tuple[int, int]], step: int, batches: list[list[tuple[int, int]]]) -> None:
    assert span_batches(spans, step) == batches


def test_sampled_error_estimates_the_whole_tensor() -> None:
    """Reference: the full sum computed here by hand; the sampled estimate within a few percent of it on a
    tensor whose rows' errors vary, and exactly it without sampling."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 64)).astype(np.float32)
    noise = (rng.standard_normal(w.shape) * rng.uniform(0.5, 1.5, (w.shape[0], 1))).astype(np.float32)
    cols = rng.uniform(0.1, 2.0, 64)
    full = float((noise.astype(np.float64) ** 2).sum(axis=0) @ cols)
    assert _errors(w, noise, cols, 1) == pytest.approx(full, rel=1e-6)
    for k in (2, 4, 8):
        assert _errors(w, noise, cols, k) == pytest.approx(full, rel=0.05), k


def test_memory_cache_writes_the_disk_cache_file_in_less_space(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """The same greedy search with the cache on disk and in memory: byte-identical GGUFs (the allocation
    and the probes saw the same bytes), a cache folder a fraction of the size, and the work counted."""
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = str((lo + hi) // 2)
    runs = {
        mode: run_direct(SizedRequest(tiny_model, tmp_path / mode, "greedy", size, cfg(text_file),
            sensitivity="measured", fold="on", tensor_cache=mode))
        for mode in ("disk", "memory")
    }
    assert runs["memory"].gguf.read_bytes() == runs["disk"].gguf.read_bytes()
    disk, mem = (disk_bytes(tmp_path / m / "cache") for m in ("disk", "memory"))
    assert mem < disk / 3, (mem, disk)
    assert sum(c.quant_weights for c in runs["memory"].costs) > 0
    assert sum(c.quant_weights for c in runs["disk"].costs) == 0
    assert sum(c.quant_passes for c in runs["memory"].costs) < sum(c.quant_passes for c in runs["disk"].costs)


def test_plan_sizes_the_memory_cache_and_sac_keeps_its_own_on_disk(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    info, cc = read_inventory(tiny_model), CandidateConfig()
    lo, hi = size_range(info, cc)
    on_disk, in_mem = (disk_needs(info, cc, "on", hi, tmp_path / "r", tmp_path / "c", 1, m)
                       for m in (False, True))
    assert in_mem.cache_per_folding * 4 < on_disk.cache_per_folding
    size = str((lo + hi) // 2)
    plans: dict[str, Any] = {
        m: plan_run(SizedRequest(tiny_model, tmp_path / m, m, size, cfg(text_file), cc, fold="on"))
        for m in ("greedy", "sac")
    }
    assert plans["greedy"].in_memory and not plans["sac"].in_memory  # auto; the disk here has room
    forced = plan_run(SizedRequest(tiny_model, tmp_path / "f", "sac", size, cfg(text_file), cc, fold="on",
        tensor_cache="memory"))
    assert forced.in_memory
    with pytest.raises(RampError, match="--tensor-cache"):
        plan_run(SizedRequest(tiny_model, tmp_path / "x", "greedy", size, cfg(text_file), cc,
            tensor_cache="ram"))
    with pytest.raises(RampError, match="--row-sample"):
        plan_run(SizedRequest(tiny_model, tmp_path / "y", "greedy", size, cfg(text_file), cc, row_sample=0))
    assert not any((tmp_path / d).exists() for d in ("x", "y"))


def test_cli_refuses_a_bad_tensor_cache_before_work(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["search", "--model", str(tiny_model), "--out", str(out), "--method", "greedy",
                            "--size", "Q4_K_M", "--tensor-cache", "ram"])
    one_error_line(r, "--tensor-cache")
    assert not out.exists()
