"""`--split-max-size`: the written GGUF as a split set in llama.cpp's gguf-split convention
(NAME-0000i-of-0000N.gguf, split.no / split.count / split.tensors.count, every other key in the first shard,
whole tensors in order). llama.cpp loads the set from its first shard with the unsplit file's logits, bit
for bit; shards.py reads it back as the same model with the same tensor bytes; every shard is within the max
unless one tensor alone is larger (then it has a shard of its own, as gguf-split gives it); a bad
--split-max-size or shards already there are one line before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import open_reader, read_inventory, tensor_types
from ramp_cpp.llama.splitout import move_set, plan_shards, split_gguf
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.plan import size_range

runner = CliRunner()

#: (info bytes, data bytes per tensor, first header, later header, max, alignment) -> tensors per shard,
#: worked by hand from the rule: a new shard when pad(header + infos) + data would pass the max, never an
#: empty one.
PLANS = [
    # everything fits: one shard
    ((10, 10), (32, 32), 20, 20, 1000, 32, [[0, 1]]),
    # pad(20 + 10) + 32 = 64 fits 64; adding the second gives pad(40) + 64 = 128 > 64
    ((10, 10, 10), (32, 32, 32), 20, 20, 64, 32, [[0], [1], [2]]),
    # the second tensor (96 bytes of data) is over the max alone: a shard of its own, the third after it
    ((10, 10, 10), (32, 96, 32), 20, 20, 100, 32, [[0], [1], [2]]),
    # a small later header lets two tensors share a shard the big first header could not
    ((4, 4, 4, 4, 4), (32, 32, 32, 32, 32), 60, 4, 96, 32, [[0], [1, 2], [3, 4]]),
    # the first shard's header alone is over the max: it still holds one tensor
    ((4, 4), (32, 32), 500, 4, 100, 32, [[0], [1]]),
]


@pytest.mark.parametrize(("infos", "data", "first", "later", "mx", "align", "want"), PLANS)
def test_the_shard_plan(
    infos: tuple[int, ...], data: tuple[int, ...], first: int, later: int, mx: int, align: int, want: list
) -> None:
    assert plan_shards(infos, data, first, later, mx, align) == want


@pytest.fixture(scope="module")
def quantized(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    """The tiny model at Q8_0 as one file, and through `quantize --split-max-size` as three shards."""
    d = tmp_path_factory.mktemp("split-out")
    one = d / "one.gguf"
    r = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(one), "--preset", "Q8_0"])
    assert r.exit_code == 0, r.output
    # 40 % of the file: no two of the three big runs of tensors fit one shard, every shard holds several
    mx = one.stat().st_size * 2 // 5
    r = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(d / "split.gguf"), "--preset", "Q8_0",
                            "--split-max-size", str(mx), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return {"one": one, "first": Path(json.loads(r.stdout)["path"]), "max": mx, "dir": d}


def test_three_shards_named_and_keyed_as_gguf_split_makes_them(quantized: dict) -> None:
    d, first = quantized["dir"], quantized["first"]
    names = sorted(p.name for p in d.glob("split*"))
    assert names == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]  # the one file is gone
    assert first.name == names[0]
    whole = GGUFReader(quantized["one"])
    readers = [GGUFReader(d / n) for n in names]
    for i, r in enumerate(readers):
        f = {k: r.fields[k] for k in ("split.no", "split.count", "split.tensors.count")}
        assert [int(x.contents()) for x in f.values()] == [i, 3, len(whole.tensors)]
        assert [x.types[0] for x in f.values()] == [GGUFValueType.UINT16, GGUFValueType.UINT16,
                                                    GGUFValueType.INT32]  # fmt: skip
        assert len(r.tensors) >= 2
        assert (d / names[i]).stat().st_size <= quantized["max"]
    own = [k for k in whole.fields if not k.startswith("GGUF.")]
    # the first shard: every key of the file, in its order, then the split keys; the others: those alone
    assert [k for k in readers[0].fields if not k.startswith("GGUF.")] == [
        *own, "split.no", "split.count", "split.tensors.count"]  # fmt: skip
    for k in own:
        assert readers[0].fields[k].contents() == whole.fields[k].contents()
    assert all(len([k for k in r.fields if not k.startswith("GGUF.")]) == 3 for r in readers[1:])
    assert [t.name for r in readers for t in r.tensors] == [t.name for t in whole.tensors]


def test_our_reader_reads_the_set_as_the_one_file(quantized: dict) -> None:
    one, first = quantized["one"], quantized["first"]
    a, b = open_reader(one), open_reader(first)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(bytes(x.data) == bytes(y.data) for x, y in zip(a.tensors, b.tensors, strict=True))
    assert tensor_types(one) == tensor_types(first)
    ia, ib = read_inventory(one).to_json(), read_inventory(first).to_json()
    ia.pop("path"), ib.pop("path")
    assert ia == ib  # file_size and data_offset: the one file's, computed for the set


def test_llama_cpp_gives_the_one_files_logits(quantized: dict) -> None:
    toks = np.array([1, 50, 300, 7, 9, 120, 33, 2], dtype=np.int32)
    out = []
    for p in (quantized["one"], quantized["first"]):
        with LlamaModel(p, RuntimeOptions(n_ctx=64, n_threads=1)) as m:
            out.append(np.array(m.logits(toks, 0, len(toks))))
    np.testing.assert_array_equal(out[0], out[1])


def test_a_max_under_the_largest_tensor_gives_it_a_shard_of_its_own(quantized: dict, tmp_path: Path) -> None:
    one = quantized["one"]
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(one).tensors}
    big = max(sizes, key=sizes.__getitem__)
    mx = sizes[big] // 2
    src = tmp_path / "w.gguf"
    src.write_bytes(one.read_bytes())
    s = split_gguf(src, tmp_path / "o.gguf", mx)
    assert not src.exists()
    over = {name for name, _ in s.oversized}
    assert big in over and over == {n for n, b in sizes.items() if b > mx - 100}  # header + info < 100 bytes
    for p, n in zip(s.paths, s.shard_bytes, strict=True):
        r = GGUFReader(p)
        assert n == p.stat().st_size
        assert n <= mx or (len(r.tensors) == 1 and r.tensors[0].name in over)
    assert "over the max: each holds a tensor that does not fit it alone" in s.describe()
    assert "\n" not in s.describe()
    with LlamaModel(s.first, RuntimeOptions(n_ctx=64, n_threads=1)) as m:
        assert m.n_vocab > 0


def test_a_set_moved_under_another_name_still_loads(quantized: dict, tmp_path: Path) -> None:
    src = tmp_path / "w.gguf"
    src.write_bytes(quantized["one"].read_bytes())
    s = split_gguf(src, tmp_path / "a.gguf", quantized["max"])
    moved = move_set(s.paths, tmp_path / "b.gguf")
    assert [p.name for p in moved] == [f"b-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not any(p.exists() for p in s.paths)
    assert tensor_types(moved[0]) == tensor_types(quantized["one"])


def test_a_rewrite_with_force_replaces_a_set_of_another_count(quantized: dict, tmp_path: Path) -> None:
    one = quantized["one"]
    # a set of one is the file and its three split keys (82 bytes, and the header's padding)
    for mx, n in ((quantized["max"], 3), (one.stat().st_size + 82 + 32, 1)):
        src = tmp_path / "w.gguf"
        src.write_bytes(one.read_bytes())
        s = split_gguf(src, tmp_path / "o.gguf", mx, force=True)
        assert len(s.paths) == n
        assert sorted(tmp_path.iterdir()) == list(s.paths)  # no shard of the earlier count is left
    # a set of one is named as gguf-split names it and loads as one file
    assert s.first.name == "o-00001-of-00001.gguf"
    assert tensor_types(s.first) == tensor_types(one)


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("0", "--split-max-size must be a positive size"),
        ("lots", "--split-max-size takes a number with an optional unit"),
        ("2TB", "--split-max-size takes a number with an optional unit"),
    ],
)
def test_a_bad_max_is_one_line(tiny_model: Path, tmp_path: Path, spec: str, expect: str) -> None:
    for cmd in (
        ["quantize", str(tiny_model), "-o", str(tmp_path / "q.gguf"), "--preset", "Q8_0"],
        ["search", "--model", str(tmp_path / "no-model"), "--size", "Q4_K_M", "--out", str(tmp_path / "r")],
    ):
        r = runner.invoke(app, [*cmd, "--split-max-size", spec])
        assert r.exit_code != 0
        assert expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == []


def test_shards_already_there_are_refused_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "q-00001-of-00002.gguf").write_bytes(b"x")
    r = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q.gguf"), "--preset", "Q8_0",
                            "--split-max-size", "1MB"])  # fmt: skip
    assert r.exit_code != 0 and "q-00001-of-00002.gguf exists (use --force" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q-00001-of-00002.gguf"]
    with pytest.raises(RampError, match="no such directory"):
        split_gguf(tiny_model, tmp_path / "nowhere" / "q.gguf", 10**6)


@pytest.mark.slow  # a uniform sized run, then the same run folder resumed without the split (~30 s)
def test_search_writes_the_set_and_names_its_first_shard(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = (lo + hi) // 2
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    rd = tmp_path / "run"
    base = ["search", "--model", str(tiny_model), "--method", "uniform", "--size", str(size), "--out",
            str(rd), "--text", str(text_file), "--chunks", "2", "--ctx", "64", "--recipe", str(recipe),
            "--threads", "1"]  # fmt: skip
    mx = size * 2 // 5
    r = runner.invoke(app, [*base, "--split-max-size", str(mx)])
    assert r.exit_code == 0, r.output
    shards = sorted(rd.glob("*.ramp-*.gguf"))
    assert len(shards) == 3 and shards[0].name.endswith("-00001-of-00003.gguf")
    assert all(p.stat().st_size <= mx for p in shards)
    summary = json.loads((rd / "report.json").read_text())["summary"]
    assert summary["split"]["shards"] == [p.name for p in shards]
    assert summary["file_bytes"] == summary["split"]["one_file_bytes"] <= size  # the budget's one file
    card = (rd / "README.md").read_text()
    assert f"# {shards[0].name}" in card and "split in 3 shards" in card
    one_name = shards[0].name.replace("-00001-of-00003", "")
    assert f" {one_name} " in card and "llama-gguf-split --split" not in card  # max under 1 MB
    assert shards[0].name in r.output
    # resumed without the split: the one file, the same tensors, and no shard left beside it
    kept = tmp_path / "kept"
    kept.mkdir()
    for p in shards:
        shutil.copy(p, kept / p.name)
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    (one,) = rd.glob("*.ramp-*.gguf")
    assert one.name == one_name and one.stat().st_size == summary["file_bytes"]
    a, b = open_reader(one), open_reader(kept / shards[0].name)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(bytes(x.data) == bytes(y.data) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_a_split_run_asks_disk_for_the_one_file_and_its_shards(tiny_model: Path, tmp_path: Path) -> None:
    from ramp_cpp.pipeline.resources import disk_needs

    info, cc = read_inventory(tiny_model), CandidateConfig()
    rd, croot = tmp_path / "r", tmp_path / "c"
    one, split = (disk_needs(info, cc, "on", 10**6, rd, croot, split=s) for s in (False, True))
    assert (one.output, split.output) == (10**6, 2 * 10**6)


@pytest.mark.slow  # a sized policy's apply and a --budget policy's (~40 s)
def test_apply_moves_the_set_onto_the_output(
    tiny_model: Path, text_file: Path, policy: Path, tmp_path: Path
) -> None:
    sized = Path(__file__).resolve().parents[1] / "policies" / "across-3-proxy.policy.safetensors"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    text = ["--text", str(text_file), "--recipe", str(recipe), "--threads", "1"]
    cases = [(sized, ["--size", str((lo + hi) // 2)]), (policy, ["--budget", "6"])]
    for i, (pol, how) in enumerate(cases):
        out = tmp_path / f"o{i}.gguf"
        mx = (lo + hi) // 5
        r = runner.invoke(app, ["apply", str(pol), str(tiny_model), "-o", str(out), *how, *text,
                                "--split-max-size", str(mx)])  # fmt: skip
        assert r.exit_code == 0, r.output
        shards = sorted(tmp_path.glob(f"o{i}-*.gguf"))
        assert len(shards) >= 3 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
        assert not out.exists() and shards[0].name in r.output
        assert all(p.stat().st_size <= mx for p in shards)
        with LlamaModel(shards[0], RuntimeOptions(n_ctx=64, n_threads=1)) as m:
            assert m.n_vocab > 0
    assert not list((tmp_path / "o0.run").glob("*.ramp-*.gguf"))  # the run folder's set was moved
