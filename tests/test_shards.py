"""A split GGUF (llama.cpp's gguf-split convention, written here by gguf-py's splitting writer) read as one
model: the same inventory, llama.cpp's logits, quantization and a sized greedy search as the unsplit file;
a later shard, a missing shard or a shard of another model refused in one line before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import splitgguf
import synthetic
from gguf import GGUFReader
from test_sized_run import cfg

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import open_reader, read_inventory, rewrite_gguf, tensor_types
from ramp_cpp.llama.inputs import resolve_model
from ramp_cpp.llama.quantize import quantize_preset
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.store.cache import file_sha256_cached


@pytest.fixture(scope="module")
def pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("split")
    return tiny_model, splitgguf.split(tiny_model, d / "tiny.f16.gguf", 3)


def test_the_shards_are_a_real_split(pair: tuple[Path, list[Path]]) -> None:
    whole, shards = pair
    readers = [GGUFReader(p) for p in shards]
    assert [int(r.get_field("split.no").contents()) for r in readers] == [0, 1, 2]  # type: ignore[union-attr]
    assert all(len(r.tensors) > 0 for r in readers)
    assert sum(len(r.tensors) for r in readers) == len(GGUFReader(whole).tensors)


def test_inventory_is_the_unsplit_ones(pair: tuple[Path, list[Path]]) -> None:
    whole, shards = pair
    a, b = read_inventory(whole).to_json(), read_inventory(shards[0]).to_json()
    assert a.pop("path") != b.pop("path")
    assert a == b  # data_offset and file_size included: the one-file model's, computed for the set
    assert read_inventory(whole).metadata == read_inventory(shards[0]).metadata  # no split.* keys
    assert tensor_types(whole) == tensor_types(shards[0])


def test_llama_cpp_runs_it_as_the_same_model(pair: tuple[Path, list[Path]]) -> None:
    whole, shards = pair
    toks = np.array([1, 50, 300, 7, 9, 120], dtype=np.int32)
    out = []
    for p in (whole, shards[0]):
        with LlamaModel(p, RuntimeOptions(n_ctx=64, n_threads=1)) as m:
            out.append(np.array(m.logits(toks, 0, len(toks))))
    np.testing.assert_array_equal(out[0], out[1])


def test_quantize_and_a_rewrite_give_the_unsplit_files_bytes(
    pair: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    whole, shards = pair
    for name, src in (("whole", whole), ("split", shards[0])):
        quantize_preset(src, tmp_path / f"{name}.q4km.gguf", "Q4_K_M")
        rewrite_gguf(src, tmp_path / f"{name}.copy.gguf", {})  # fold's copy engine: one file, no split.*
    for kind in ("q4km", "copy"):
        whole_bytes = (tmp_path / f"whole.{kind}.gguf").read_bytes()
        assert whole_bytes == (tmp_path / f"split.{kind}.gguf").read_bytes()


def test_the_sets_hash_covers_every_shard(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, shards = pair
    copies = [Path(shutil.copy(p, tmp_path / p.name)) for p in shards]
    before = file_sha256_cached(copies[0])
    with copies[2].open("r+b") as f:  # a weight byte of the last shard
        f.seek(-40, 2)
        b = f.read(1)
        f.seek(-40, 2)
        f.write(bytes([b[0] ^ 1]))
    assert file_sha256_cached(copies[0]) != before


@pytest.mark.slow  # two sized searches, ~40 s on 2 cores
def test_greedy_search_gives_the_same_allocation_and_tensors(
    pair: tuple[Path, list[Path]], text_file: Path, tmp_path: Path
) -> None:
    whole, shards = pair
    lo, hi = size_range(read_inventory(whole), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    a = run_direct(SizedRequest(whole, tmp_path / "whole", "greedy", size, cfg(text_file), presets=()))
    b = run_direct(SizedRequest(shards[0], tmp_path / "split", "greedy", size, cfg(text_file), presets=()))
    assert a.allocation is not None and b.allocation is not None
    assert Path(b.gguf).name == Path(a.gguf).name  # named by the set, not like a shard
    ra, rb = GGUFReader(a.gguf), GGUFReader(b.gguf)
    types = [[(t.name, int(t.tensor_type)) for t in r.tensors] for r in (ra, rb)]
    assert types[0] == types[1]
    assert all(bytes(x.data) == bytes(y.data) for x, y in zip(ra.tensors, rb.tensors, strict=True))
    # the keys that name the source (its file name and hash) are all that differ
    differ = {k for k in ra.fields if k in rb.fields and ra.fields[k].contents() != rb.fields[k].contents()}
    assert differ <= {"ramp.calibration", "ramp.fold.calibration"}, differ
    assert set(ra.fields) == set(rb.fields)


def _set_of(model: Path, d: Path, n: int) -> list[Path]:
    d.mkdir()
    return splitgguf.split(model, d / "m.gguf", n)


@pytest.mark.parametrize("case", ["later shard", "missing shard", "other split count", "other model"])
def test_bad_split_sets_fail_in_one_line(pair: tuple[Path, list[Path]], tmp_path: Path, case: str) -> None:
    mine = _set_of(pair[0], tmp_path / "mine", 3)
    expect = {
        "later shard": "give the first one",
        "missing shard": "is missing m-00002-of-00003.gguf",
        "other split count": "shards of two models",
        "other model": "shards of two models",
    }[case]
    given = mine[0]
    if case == "later shard":
        given = mine[1]
    elif case == "missing shard":
        mine[1].unlink()
    elif case == "other split count":  # shard 2 of a 4-way split of the same model, renamed into the set
        four = _set_of(pair[0], tmp_path / "four", 4)
        shutil.copy(four[1], mine[1])
    else:  # shard 3 of a 3-way split of a 3-layer model: another tensor count
        other = synthetic.write(tmp_path / "other.gguf", synthetic.Spec(n_layer=3))
        shutil.copy(_set_of(other, tmp_path / "o", 3)[2], mine[2])
    for fn in (resolve_model, open_reader, read_inventory):
        with pytest.raises(RampError, match=expect) as e:
            fn(given)
        assert "\n" not in str(e.value)
