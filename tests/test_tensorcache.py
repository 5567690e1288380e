from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import ModelInfo, read_inventory, tensor_types
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure import tensorcache
from ramp_cpp.measure.candidates import searchable
from ramp_cpp.measure.tensorcache import build_cache
from ramp_cpp.model.ladder import bits_per_weight, written_type
from ramp_cpp.write.assemble import assemble
from ramp_cpp.write.cachefiles import TensorCache, imatrix_digest

LADDER = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q2_K", "IQ4_NL", "IQ4_XS")

#: Models whose reference files differ in the ways that matter for the header and the fallbacks.
SPECS = {
    # rows of 256 keep the K-quants, ffn_down's rows of 384 fall back (Q4_K -> Q5_0, ...)
    "default": synthetic.Spec(),
    # no output.weight: token_embd is the output too
    "tied": synthetic.Spec(tied=True, seed=1),
    # rows of 320 everywhere but ffn_down (640): every K-quant of q k v o gate up falls back
    "narrow": synthetic.Spec(n_embd=320, n_ff=640, n_head=4, n_head_kv=2, seed=2),
}

#: (model, with an imatrix): both ways on the default model, one way on each of the others
CASES = [("default", False), ("default", True), ("tied", False), ("narrow", True)]


def _imatrix(info: ModelInfo, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.random(t.n_per_row) ** 4 * 100 + 1e-3).astype(np.float32) for t in info.tensors}


def _random_map(info: ModelInfo, rng: np.random.Generator, cover: float = 1.0) -> dict[str, Any]:
    """A type per searchable tensor, embeddings included (some left out when cover < 1: they get the base
    type), named by string or enum at random."""
    out: dict[str, Any] = {}
    for t in searchable(info):
        if rng.random() < cover:
            name = LADDER[rng.integers(len(LADDER))]
            out[t.name] = name if rng.random() < 0.5 else T.__members__[name]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("tc-models")
    yield {k: synthetic.write(d / f"{k}.f16.gguf", spec) for k, spec in SPECS.items()}


def _build_all(
    models: dict[str, Path], factory: pytest.TempPathFactory, folder: str, in_memory: bool
) -> dict[tuple[str, bool], tuple[TensorCache, dict[str, np.ndarray] | None, Path]]:
    """The cache over the ladder of each case, linears and embeddings searched, each in its own folder."""
    root = factory.mktemp(folder)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        # the autouse per-test cache isolation does not reach module fixtures
        mp.setenv("RAMP_CACHE_DIR", str(factory.getbasetemp() / "cache"))
        for k, with_im in CASES:
            info = read_inventory(models[k])
            im = _imatrix(info, seed=len(k)) if with_im else None
            names = [t.name for t in searchable(info)]
            d = root / k / str(with_im)
            out[(k, with_im)] = (build_cache(models[k], LADDER, d, imatrix=im, searched=names,
                                             in_memory=in_memory), im, d)
    return out


@pytest.fixture(scope="module")
def caches(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, bool], tuple[TensorCache, dict[str, np.ndarray] | None]]]:
    """The cache on disk of each case (built once for the module)."""
    yield {k: (c, im) for k, (c, im, _) in _build_all(models, tmp_path_factory, "tc-cache", False).items()}


@pytest.mark.parametrize(
    ("spec", "with_im"), CASES, ids=[f"{k}-{'imatrix' if i else 'plain'}" for k, i in CASES]
)
def test_assembled_file_is_quantize_map_file(
    spec: str, with_im: bool, models: dict[str, Path], caches: Any, tmp_path: Path
) -> None:
    cache, im = caches[(spec, with_im)]
    src = models[spec]
    rng = np.random.default_rng(CASES.index((spec, with_im)))
    maps = [_random_map(cache.info, rng), _random_map(cache.info, rng), _random_map(cache.info, rng, 0.5), {}]
    for i, m in enumerate(maps):
        ref, out = tmp_path / f"ref{i}.gguf", tmp_path / f"asm{i}.gguf"
        quantize_map(src, ref, m, opts=QuantizeOptions(imatrix=im))
        r = assemble(cache, m, out)
        assert r.file_size == out.stat().st_size == ref.stat().st_size
        assert out.read_bytes() == ref.read_bytes(), f"map {i} of {spec}"
    written = {t for n, (t, _, _) in tensor_types(tmp_path / "asm0.gguf").items() if n.startswith("blk.")}
    assert written - {"F32"}, "no quantized tensor in the episode"


#: Maps giving the embeddings other types than the base: (token_embd, output); the output is skipped on the
#: tied model, where token_embd is the head too. On `narrow` (rows of 320) Q4_K falls back to Q5_0 and
#: IQ4_XS to IQ4_NL.
EMBEDDING_MAPS = [("Q4_K", "Q6_K"), ("IQ4_NL", "Q4_K"), ("Q6_K", "IQ4_XS"), ("Q2_K", "Q8_0")]


@pytest.mark.parametrize(("spec", "with_im"), CASES, ids=[f"{k}-{'im' if i else 'plain'}" for k, i in CASES])
def test_embeddings_searched_assemble_identically_and_load(
    spec: str, with_im: bool, models: dict[str, Path], caches: Any, tiny_text: str, tmp_path: Path
) -> None:
    cache, im = caches[(spec, with_im)]
    tied = "output.weight" not in {t.name for t in cache.info.tensors}
    assert tied == (spec == "tied")
    q = "blk.0.attn_q.weight"
    for i, (emb, head) in enumerate(EMBEDDING_MAPS):
        m = {"token_embd.weight": emb, q: "Q4_K"} | ({} if tied else {"output.weight": head})
        ref, out = tmp_path / f"ref{i}.gguf", tmp_path / f"asm{i}.gguf"
        quantize_map(models[spec], ref, m, opts=QuantizeOptions(imatrix=im))
        assemble(cache, m, out)
        assert out.read_bytes() == ref.read_bytes(), f"{spec} {m}"
        written = tensor_types(out)["token_embd.weight"][0]
        assert written == written_type(T[emb], cache.info.tensor("token_embd.weight").n_per_row).name
        if emb in ("Q4_K", "IQ4_NL"):  # 4-bit in every model, after its fallback
            assert bits_per_weight(T[written]) < 6
    with LlamaModel(tmp_path / "asm0.gguf", RuntimeOptions(n_ctx=64)) as lm:
        toks = lm.tokenize(tiny_text)[:64]
        assert np.isfinite(lm.logits(toks, 0, 64)).all()


def test_fallbacks_and_written_types_are_served(caches: Any, models: dict[str, Path], tmp_path: Path) -> None:
    """A request that llama.cpp turns into its fallback is served from the bytes of that fallback, and
    naming the fallback type itself (Q5_0 for a row of 384) finds the same bytes."""
    cache, _ = caches[("default", False)]
    down = "blk.0.ffn_down.weight"
    assert cache.info.tensor(down).n_per_row == 384
    for m in ({down: "Q4_K"}, {down: "Q5_0"}, {down: "Q2_K", "blk.1.ffn_down.weight": "Q6_K"}):
        ref = tmp_path / "ref.gguf"
        quantize_map(models["default"], ref, m, opts=QuantizeOptions(force=True))
        assemble(cache, m, tmp_path / "asm.gguf", force=True)
        assert (tmp_path / "asm.gguf").read_bytes() == ref.read_bytes()
    assert tensor_types(tmp_path / "asm.gguf")["blk.1.ffn_down.weight"][0] == "Q8_0"
    assert tensor_types(tmp_path / "asm.gguf")[down][0] == "Q4_0"


def test_assembled_file_runs_like_the_reference(
    caches: Any, models: dict[str, Path], tiny_text: str, tmp_path: Path
) -> None:
    cache, im = caches[("default", True)]
    m = _random_map(cache.info, np.random.default_rng(7))
    quantize_map(models["default"], tmp_path / "ref.gguf", m, opts=QuantizeOptions(imatrix=im))
    assemble(cache, m, tmp_path / "asm.gguf")
    opts = RuntimeOptions(n_ctx=128)
    with LlamaModel(tmp_path / "ref.gguf", opts) as a, LlamaModel(tmp_path / "asm.gguf", opts) as b:
        toks = a.tokenize(tiny_text)[:128]
        ref = a.logits(toks, 0, 128).copy()
        got = b.logits(toks, 0, 128)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, ref)
    # and the logits are the quantized model's, not the F16 source's
    with LlamaModel(models["default"], opts) as f16:
        assert not np.array_equal(f16.logits(toks, 0, 128), ref)


def test_reuse_resume_and_key(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = tensorcache.quantize_map

    def counting(src: Any, dst: Any, types: Any, **kw: Any) -> Any:
        calls.append(next(iter(types.values())).name)
        if fail_on and calls[-1] == fail_on:
            raise RampError("simulated crash")
        return real(src, dst, types, **kw)

    fail_on = "Q5_K"
    monkeypatch.setattr(tensorcache, "quantize_map", counting)
    root = tmp_path / "cache"
    with pytest.raises(RampError, match="simulated crash"):
        build_cache(tiny_model, ["Q4_K", "Q5_K", "Q6_K"], root)
    assert calls == ["Q8_0", "Q4_K", "Q5_K"]  # the base type first: it fills every other assembly
    (d,) = root.iterdir()
    # the crash left Q8_0 and Q4_K whole, Q5_K absent, and no temp file
    assert sorted(p.name for p in d.iterdir()) == [
        "Q4_K.bin",
        "Q4_K.json",
        "Q8_0.bin",
        "Q8_0.json",
        "fixed.bin",
        "header.bin",
        "layout.json",
    ]

    fail_on = ""
    calls.clear()
    seen: list[tuple[int, int]] = []
    c = build_cache(tiny_model, ["Q4_K", "Q5_K", "Q6_K"], root, progress=lambda i, n: seen.append((i, n)))
    assert calls == ["Q5_K", "Q6_K"]
    assert seen == [(1, 2), (2, 2)]
    assert c.types == (T.Q4_K, T.Q5_K, T.Q6_K) and c.base == T.Q8_0

    calls.clear()
    seen.clear()
    again = build_cache(tiny_model, ["Q6_K", "Q4_K"], root, progress=lambda i, n: seen.append((i, n)))
    assert calls == [] and seen == []
    assert again.directory == c.directory and again.types == (T.Q6_K, T.Q4_K)
    assert again.info == c.info == read_inventory(tiny_model)
    build_cache(tiny_model, ["Q4_K", "Q3_K"], root)
    assert calls == ["Q3_K"]

    info = c.info
    im_a, im_b = _imatrix(info, 1), _imatrix(info, 2)
    calls.clear()
    ca = build_cache(tiny_model, ["Q4_K"], root, imatrix=im_a)
    cb = build_cache(tiny_model, ["Q4_K"], root, imatrix=im_b)
    ca2 = build_cache(tiny_model, ["Q4_K"], root, imatrix={k: v.copy() for k, v in im_a.items()})
    assert len({c.directory, ca.directory, cb.directory}) == 3 and ca2.directory == ca.directory
    assert calls == ["Q8_0", "Q4_K", "Q8_0", "Q4_K"]  # nothing rebuilt for the equal imatrix
    assert imatrix_digest(None) is None and imatrix_digest({}) is None
    assert ca.imatrix_digest == imatrix_digest(im_a) != imatrix_digest(im_b)
    cq = build_cache(tiny_model, ["Q4_K"], root, base="Q6_K")
    assert cq.directory not in {c.directory, ca.directory, cb.directory}

    q = "blk.0.attn_q.weight"
    blobs = []
    for cache in (c, ca, cb):
        assemble(cache, {q: "Q4_K"}, tmp_path / "x.gguf", force=True)
        blobs.append({t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "x.gguf").tensors}[q])
    assert len(set(blobs)) == 3


def test_refusals(caches: Any, models: dict[str, Path], tmp_path: Path) -> None:
    cache, _ = caches[("default", False)]
    out = tmp_path / "x.gguf"
    with pytest.raises(RampError, match="not a weight tensor"):
        assemble(cache, {"blk.9.attn_q.weight": "Q4_K"}, out)
    with pytest.raises(RampError, match="unknown ggml type"):
        assemble(cache, {"blk.0.attn_q.weight": "Q4_X"}, out)
    with pytest.raises(RampError, match="no cached bytes for Q4_1"):
        assemble(cache, {"blk.0.attn_q.weight": "Q4_1"}, out)
    with pytest.raises(RampError, match="no cached bytes for Q4_1"):
        assemble(cache, {"output.weight": "Q4_1"}, out)
    # the same key directory served to a search of the linears only: the embeddings stay at the base type
    linears = build_cache(models["default"], ["Q4_K"], cache.directory.parent)
    assert linears.directory == cache.directory and "output.weight" not in linears.names
    with pytest.raises(RampError, match="not a searched tensor"):
        assemble(linears, {"output.weight": "Q4_K"}, out)
    assemble(linears, {"output.weight": "Q8_0"}, out)  # the base type: what the cache holds
    with pytest.raises(RampError, match="exists"):
        assemble(cache, {}, out)
    with pytest.raises(RampError, match="not a searchable tensor"):
        build_cache(models["default"], ["Q4_K"], tmp_path / "c", searched=["output_norm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "x.gguf"]


def test_more_searched_tensors_requantize_only_what_lacks_them(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A type cached for the linears is quantized again when a later search adds the embeddings; a type
    that needs an imatrix is cached only for the tensors the imatrix covers."""
    calls: list[tuple[str, int]] = []
    real = tensorcache.quantize_map

    def counting(src: Any, dst: Any, types: Any, **kw: Any) -> Any:
        calls.append((next(iter(types.values())).name, len(types)))
        return real(src, dst, types, **kw)

    monkeypatch.setattr(tensorcache, "quantize_map", counting)
    root = tmp_path / "cache"
    info = read_inventory(tiny_model)
    n_lin, every = len(info.searched), [t.name for t in searchable(info)]
    build_cache(tiny_model, ["Q4_K", "Q6_K"], root)
    assert calls == [("Q8_0", len(every)), ("Q4_K", n_lin), ("Q6_K", n_lin)]
    calls.clear()
    c = build_cache(tiny_model, ["Q4_K"], root, searched=every)
    assert calls == [("Q4_K", len(every))] and c.names == tuple(every)
    calls.clear()
    build_cache(tiny_model, ["Q4_K"], root, searched=every[:3])
    build_cache(tiny_model, ["Q4_K"], root)
    assert calls == []

    im = {n: v for n, v in _imatrix(info, 3).items() if n.startswith("blk.")}
    calls.clear()
    c = build_cache(tiny_model, ["IQ2_XS"], root, imatrix=im, searched=every)
    assert calls == [("Q8_0", len(every)), ("IQ2_XS", n_lin)]  # token_embd and output have no entry
    # ffn_down's rows of 384 fall back to IQ4_NL
    iq2 = {n for (n, t) in c.searched if t == T.IQ2_XS}
    assert iq2 == {t.name for t in info.searched if t.role != "ffn_down"}
    with pytest.raises(RampError, match="no cached bytes for IQ2_XS"):
        assemble(c, {"token_embd.weight": "IQ2_XS"}, tmp_path / "x.gguf")


def test_recycle_overwrites_in_place(caches: Any, tmp_path: Path) -> None:
    """recycle reuses the old file's pages (same inode) and truncates a shorter episode exactly."""
    cache, _ = caches[("default", False)]
    searched = [t.name for t in cache.info.searched]
    big, small = {n: "Q8_0" for n in searched}, {n: "Q2_K" for n in searched}
    for name, m in (("big", big), ("small", small)):
        assemble(cache, m, tmp_path / f"{name}.gguf")
    out = tmp_path / "ep.gguf"
    assemble(cache, big, out)
    inode = out.stat().st_ino
    r = assemble(cache, small, out, force=True, recycle=True)
    assert out.stat().st_ino == inode and r.file_size == out.stat().st_size
    assert out.read_bytes() == (tmp_path / "small.gguf").read_bytes()
    assemble(cache, big, out, force=True, recycle=True)
    assert out.read_bytes() == (tmp_path / "big.gguf").read_bytes()
    assemble(cache, small, out, force=True)  # default: a new file renamed over the old one
    assert out.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf", "ep.gguf", "small.gguf"]


@pytest.mark.slow
def test_demo_model_assembles_identically(demo_model: Path, tmp_path: Path) -> None:
    cache = build_cache(demo_model, ["Q4_K", "Q6_K"], tmp_path / "cache")
    rng = np.random.default_rng(0)
    m = {t.name: ("Q4_K", "Q6_K", "Q8_0")[rng.integers(3)] for t in cache.info.searched}
    quantize_map(demo_model, tmp_path / "ref.gguf", m)
    r = assemble(cache, m, tmp_path / "asm.gguf")
    assert r.file_size == (tmp_path / "ref.gguf").stat().st_size
    assert (tmp_path / "asm.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_build_refuses_a_cache_that_does_not_reproduce_llama_cpp(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_cache compares its own assembly with llama.cpp's file for every type it adds: a wrong header
    field (here general.file_type) is an error, and the type is not left behind as cached."""
    import ramp_cpp.write.assemble

    monkeypatch.setattr(ramp_cpp.write.assemble, "file_type_for", lambda full: 0)
    with pytest.raises(RampError, match="differs from llama.cpp"):
        build_cache(tiny_model, ["Q4_K"], tmp_path)
    (d,) = tmp_path.iterdir()
    assert not (d / "Q4_K.json").exists() and not (d / "Q8_0.json").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_template_writer_checks_blob_sizes(caches: Any, tmp_path: Path) -> None:
    from ramp_cpp.llama.ggufio import write_from_template

    cache, _ = caches[("default", False)]
    tpl = cache.template
    types = [s.ggml_type for s in tpl.tensors]
    blobs = [memoryview(bytes(1)) for _ in tpl.tensors]
    with pytest.raises(RampError, match="bytes given"):
        write_from_template(tmp_path / "x.gguf", tpl, 7, types, blobs)
    with pytest.raises(RampError, match="tensors"):
        write_from_template(tmp_path / "x.gguf", tpl, 7, types[:-1], blobs)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def memory_caches(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, bool], tuple[TensorCache, dict[str, np.ndarray] | None, Path]]]:
    """The in-memory cache of each case (base type on disk, every other type made when asked)."""
    yield _build_all(models, tmp_path_factory, "tc-memory", True)


@pytest.mark.parametrize(("spec", "with_im"), CASES, ids=[f"{k}-{'im' if i else 'plain'}" for k, i in CASES])
def test_in_memory_cache_writes_llama_cpp_bytes_and_keeps_only_the_base(
    spec: str, with_im: bool, models: dict[str, Path], memory_caches: Any, tmp_path: Path
) -> None:
    """Reference check: ggml's row quantizer in memory gives the file llama.cpp's quantizer writes, for maps
    over the whole ladder (fallbacks and embeddings included), and the cache folder holds only the base."""
    cache, im, root = memory_caches[(spec, with_im)]
    assert cache.in_memory
    bins = sorted(p.name for p in root.rglob("*.bin"))
    assert bins == ["Q8_0.bin", "fixed.bin", "header.bin"], bins
    rng = np.random.default_rng(100 + CASES.index((spec, with_im)))
    maps = [_random_map(cache.info, rng), _random_map(cache.info, rng, 0.5)]
    maps.append({t.name: name for t, name in zip(searchable(cache.info), LADDER * 9, strict=False)})
    for i, m in enumerate(maps):
        ref, out = tmp_path / f"ref{i}.gguf", tmp_path / f"asm{i}.gguf"
        quantize_map(models[spec], ref, m, opts=QuantizeOptions(imatrix=im))
        assert assemble(cache, m, out).file_size == ref.stat().st_size
        assert out.read_bytes() == ref.read_bytes(), f"map {i} of {spec}"


def test_in_memory_rows_and_sizes_match_the_disk_cache(caches: Any, memory_caches: Any) -> None:
    """The proxy's reads (dequantized rows, byte counts) are the same from either cache."""
    disk, _ = caches[("narrow", True)]
    mem, _, _ = memory_caches[("narrow", True)]
    for (name, wt), blob in sorted(disk.searched.items(), key=lambda kv: (kv[0][0], kv[0][1].name))[::7]:
        n = disk.info.tensor(name).n_rows
        a, b = n // 3, n // 3 + 5
        assert tensorcache.blob_nbytes(mem, name, wt) == blob.nbytes
        got = tensorcache.dequantized_rows(mem, name, wt, a, b)
        np.testing.assert_array_equal(got, tensorcache.dequantized_rows(disk, name, wt, a, b))
        # several spans at once (the proxy's sampled rows): the rows read one span at a time, in order
        spans = [(0, 2), (a, b), (n - 3, n)]
        one_by_one = np.concatenate([tensorcache.dequantized_rows(disk, name, wt, x, y) for x, y in spans])
        for cache in (disk, mem):
            np.testing.assert_array_equal(tensorcache.dequantized_spans(cache, name, wt, spans), one_by_one)


def test_in_memory_cache_reuses_types_on_disk_and_refuses_unsearched(
    models: dict[str, Path], caches: Any, tmp_path: Path
) -> None:
    disk, _ = caches[("default", False)]
    names = list(disk.names)
    again = build_cache(models["default"], LADDER, disk.directory.parent, searched=names, in_memory=True)
    assert set(again.searched) == set(disk.searched)  # a full build's bytes are read, not made again
    q0 = ["blk.0.attn_q.weight"]
    few = build_cache(models["default"], ["Q4_K"], tmp_path / "c", searched=q0, in_memory=True)
    with pytest.raises(RampError, match="not a searched tensor"):
        assemble(few, {"blk.1.attn_q.weight": "Q4_K"}, tmp_path / "x.gguf")
    assert not tensorcache.has_bytes(few, "blk.1.attn_q.weight", T.Q4_K)
