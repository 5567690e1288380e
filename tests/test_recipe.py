"""The allocation as a recipe for stock llama-quantize (llama/recipe.py): patterns that match one tensor each,
and — against the llama-quantize built from the vendored llama.cpp — the same tensor bytes as ramp-cpp's own
quantization from the same F16 and imatrix."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ramp_cpp.calibration.artifact import CalibConfig, write_imatrix
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.llama.ggufio import open_reader, read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.llama.recipe import anchored, tensor_type_lines, write_recipe, written_types


@pytest.mark.parametrize(
    ("name", "other", "matches"),
    [
        ("blk.1.attn_q.weight", "blk.1.attn_q.weight", True),
        ("blk.1.attn_q.weight", "blk.11.attn_q.weight", False),  # '.' would match any character unescaped
        ("blk.1.attn_q.weight", "blk.1.attn_qkv.weight", False),
        ("blk.1.attn_q.weight", "xblk.1.attn_q.weight", False),  # regex_search: anchored at both ends
        ("output.weight", "output.weight", True),
        ("token_embd.weight", "per_layer_token_embd.weight", False),
    ],
)
def test_pattern_matches_its_tensor_alone(name: str, other: str, matches: bool) -> None:
    # std::regex (ECMAScript) and Python's re agree on ^, $, \. and literals
    assert (re.search(anchored(name), other) is not None) == matches


def test_lines_name_type_in_map_order() -> None:
    lines = tensor_type_lines({"blk.0.ffn_down.weight": T.Q6_K, "blk.0.attn_q.weight": T.IQ4_XS})
    assert lines == [r"^blk\.0\.ffn_down\.weight$=q6_k", r"^blk\.0\.attn_q\.weight$=iq4_xs"]
    # llama-quantize splits each line at its first '=' and reads whitespace-separated words
    assert all(line.count("=") == 1 and " " not in line for line in lines)


@pytest.mark.slow
def test_stock_llama_quantize_writes_the_same_tensor_bytes(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    from vendored import tool

    exe = tool("llama-quantize")
    info = read_inventory(tiny_model)
    cal = calibrate(tiny_model, text_file.read_text(), CalibConfig(text=str(text_file), samples=2, ctx=64))
    # a mixed map: K-quants, legacy, IQ (needs the imatrix) and a float, over every searched tensor
    kinds = (T.Q4_K, T.Q6_K, T.Q5_0, T.IQ4_XS, T.Q8_0, T.F16)
    names = [t.name for t in info.tensors if t.searched]
    types = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    ours = tmp_path / "ours.gguf"
    quantize_map(tiny_model, ours, types, T.Q8_0, QuantizeOptions(imatrix=cal.imatrix()))
    imatrix = write_imatrix(cal, tmp_path / "imatrix.gguf")
    stock = tmp_path / "stock.gguf"
    written = written_types(ours, tiny_model)
    types_file = tmp_path / "tensor-types.txt"
    recipe = write_recipe(types_file, written, tiny_model, imatrix, stock, program=str(exe))
    r = subprocess.run([*recipe.command, "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    a = {t.name: t for t in open_reader(ours).tensors}
    b = {t.name: t for t in open_reader(stock).tensors}
    assert a.keys() == b.keys()
    assert {int(a[n].tensor_type) for n in names} >= {int(k) for k in kinds if k != T.F16} - {int(T.F16)}
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, n
        assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n


@pytest.mark.slow
@pytest.mark.parametrize("fold", ["on", "off"])
def test_a_runs_recipe_remakes_its_file_with_stock_llama_quantize(
    tiny_model: Path, text_file: Path, tmp_path: Path, fold: str
) -> None:
    """A sized greedy run writes imatrix.gguf, tensor-types.txt and README.md beside its GGUF; its recipe's
    command, run by the vendored llama-quantize, writes the same bytes for every tensor (folded: from the
    run's folded copy, with the folded imatrix)."""
    from test_sized_run import cfg
    from vendored import tool

    from ramp_cpp.measure.candidates import CandidateConfig
    from ramp_cpp.pipeline.card import CARD, TYPES_FILE
    from ramp_cpp.pipeline.plan import size_range
    from ramp_cpp.pipeline.request import SizedRequest
    from ramp_cpp.pipeline.run import run_direct

    exe = tool("llama-quantize")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    r = run_direct(SizedRequest(tiny_model, tmp_path / "run", "greedy", size, cfg(text_file), presets=(),
                                fold=fold))  # fmt: skip
    lines = (r.run_dir / TYPES_FILE).read_text().split()
    assert len(lines) == len(read_inventory(tiny_model).tensors)
    card = (r.run_dir / CARD).read_text()
    assert card.startswith("---\nbase_model: ") and "- gguf\n- llama.cpp\n" in card and TYPES_FILE in card
    cmd = card.split("```bash\n")[-1].split("\n```")[0].split()
    assert cmd[0] == "llama-quantize" and ("folded" in " ".join(cmd)) == (fold == "on")
    stock = tmp_path / "stock"
    stock.mkdir()
    done = subprocess.run([str(exe), *cmd[1:], "2"], cwd=stock, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    a = {t.name: t for t in open_reader(r.gguf).tensors}
    b = {t.name: t for t in open_reader(stock / r.gguf.name).tensors}
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, n
        assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n
