"""Cost accounting: the counters move with the work that is done (tokens decoded by llama.cpp, quantizer
passes), and a stage's meter reads them with time, memory and bytes written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from ramp_cpp.costs import COUNTERS, Meter
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, perplexity
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.pipeline.request import Hooks, SizedRequest


def test_a_stage_counts_the_tokens_it_decodes(tiny_model: Path, tiny_text: str) -> None:
    cfg = EvalConfig(n_ctx=64, n_chunks=3)
    meter = Meter(eval_tokens=2 * 64)
    seen = []
    meter.on_stage = seen.append
    with meter.stage("ppl"):
        perplexity(tiny_model, tiny_text, cfg, RuntimeOptions(n_ctx=64))
    with meter.stage("nothing"):
        pass
    ppl, idle = meter.stages
    assert ppl.tokens == 3 * 64 and ppl.E == 1.5  # three chunks of 64 = 1.5 units of two chunks
    assert idle.tokens == 0 and idle.E == 0 and idle.quant_passes == 0
    assert ppl.wall_s > 0 and ppl.cpu_s > 0 and ppl.peak_rss > 0
    assert seen == meter.stages
    total = meter.total()
    assert total.tokens == ppl.tokens and total.wall_s >= ppl.wall_s


def test_each_quantizer_call_is_one_pass_and_its_file_is_written(tiny_model: Path, tmp_path: Path) -> None:
    info = read_inventory(tiny_model)
    names = [t.name for t in info.tensors if t.name.startswith("blk.")]
    meter = Meter(eval_tokens=1)
    with meter.stage("two passes"):
        for t in ("Q8_0", "Q4_0"):
            out = tmp_path / f"{t}.gguf"
            quantize_map(tiny_model, out, {n: GGMLQuantizationType[t] for n in names}, opts=QuantizeOptions())
    (c,) = meter.stages
    assert c.quant_passes == 2 and c.tokens == 0
    # the bytes reach storage through the page cache: counted when dirtied, on Linux with task I/O accounting
    if Path("/proc/self/io").is_file():
        assert c.written >= (tmp_path / "Q4_0.gguf").stat().st_size


def test_counters_are_process_wide(tiny_model: Path) -> None:
    before = COUNTERS.tokens
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=32)) as m:
        m.logits(np.arange(3, 19, dtype=np.int32), 0, 16)
    assert COUNTERS.tokens - before == 16


@pytest.mark.parametrize("tensor_cache", ["disk", "memory"])
def test_a_sized_run_reports_what_each_stage_cost(
    tensor_cache: str, tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """Costs are counted, not estimated: a cold greedy run quantizes once per candidate type for its tensor
    cache on disk (in memory: the base type's pass, and every other candidate's weights counted), once for its
    preset, and its last stage scores exactly the reward chunks (1 E); a second run on the same folder and
    caches computes nothing."""
    import json

    from ramp_cpp.calibration.artifact import CalibConfig
    from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors
    from ramp_cpp.pipeline.plan import size_range
    from ramp_cpp.pipeline.run import run_direct
    from ramp_cpp.pipeline.sizedconfig import SizedConfig

    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=tuple(GGMLQuantizationType[t] for t in ("Q4_0", "Q5_0", "Q8_0")))
    lo, hi = size_range(read_inventory(tiny_model), cc)
    size = f"{(lo + hi) // 2}"
    shown = []
    r = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", size, cfg, cc, presets=("Q4_K_M",),
        cache_root=tmp_path / "cache", fold="on", tensor_cache=tensor_cache),
        hooks=Hooks(on_cost=shown.append))
    by = {c.stage: c for c in r.costs}
    assert shown == list(r.costs)
    assert list(by) == [
        "calibrate", "fold", "base log-probs", "presets", "tensor cache + proxy (folded)", "fold decision",
        "allocate", "evaluate",
    ]
    assert by["presets"].quant_passes == 1
    cache = by["tensor cache + proxy (folded)"]
    searched = sum(t.n_params for t in searched_tensors(read_inventory(tiny_model), True))
    if tensor_cache == "disk":  # Q8_0 is both a candidate and the base
        assert (cache.quant_passes, cache.quant_weights) == (3, 0)
    else:  # the proxy reads Q4_0 and Q5_0 of every searched tensor, made in memory
        assert (cache.quant_passes, cache.quant_weights) == (1, 2 * searched)
    assert by["calibrate"].tokens == 2 * 64 and by["calibrate"].E == 1.0
    assert by["evaluate"].E == 1.0 and by["allocate"].E == 0 and by["fold decision"].E == 0
    assert by["fold"].held >= (tmp_path / "run" / "folded.f16.gguf").stat().st_size
    report = json.loads(r.report.read_text())
    assert report["costs"]["total"]["quant_passes"] == sum(c.quant_passes for c in r.costs)
    again = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", size, cfg, cc, presets=(),
        cache_root=tmp_path / "cache", fold="on", tensor_cache=tensor_cache))
    assert sum(c.quant_passes for c in again.costs) == 0
    assert [c.stage for c in again.costs if c.tokens] == ["evaluate"]  # base log-probs: from the cache


def test_a_resumed_run_quantizes_and_scores_its_presets_and_fold_check_once(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """The presets' sizes and scores and the fold check's per-chunk KLDs are kept with the run: the same
    command again (a run resumed after a kill) makes no quantizer pass and decodes no token for them, and
    reports the same figures; a file of them saved for another model is not read."""
    import json

    from ramp_cpp.calibration.artifact import CalibConfig
    from ramp_cpp.pipeline.run import run_direct
    from ramp_cpp.pipeline.sizedconfig import SizedConfig
    from ramp_cpp.pipeline.stages import PRESETS, SCORES

    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))

    def go() -> tuple[dict[str, object], dict[str, object]]:
        r = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", "Q4_K_M", cfg, presets=("Q4_K_M",
            "Q5_K_M"), cache_root=tmp_path / "cache", fold="check"))
        report = json.loads(r.report.read_text())
        points = [p for p in report["points"] if p["kind"] == "preset"]
        return {c.stage: c for c in r.costs}, {"target": r.target_bytes, "fold": report["summary"]["fold"],
                                               "points": points}

    cold, first = go()
    assert cold["presets"].quant_passes == 2 and cold["fold decision"].tokens > 0
    warm, again = go()
    assert (warm["presets"].quant_passes, warm["presets"].tokens) == (0, 0)
    assert (warm["fold decision"].quant_passes, warm["fold decision"].tokens) == (0, 0)
    assert again == first
    for name in (PRESETS, SCORES):  # saved under another model's sha256: computed again
        f = tmp_path / "run" / name
        d = json.loads(f.read_text())
        d["key"] = {**d["key"], "model_sha256": "0" * 64} if name == PRESETS else {"format": 0}
        f.write_text(json.dumps(d))
    cold2, third = go()
    assert cold2["presets"].quant_passes == 2 and cold2["fold decision"].tokens > 0
    assert third == first
