"""Mixture-of-experts models (issue 35): expert tensors (3-D, n_expert slices) are searched like the other
linears. On a tiny synthetic MoE (`synthetic.write_moe`, llama.cpp's `llama` architecture with a router and
3-D experts): llama.cpp loads and runs it; the inventory, the bytes predicted and written for every type, the
tensor cache (disk and in memory) against llama.cpp's quantizer with a per-expert importance matrix, the proxy
weighted by each expert's usage, the groups, and the one-line refusals of bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ramp_cpp.calibration.artifact import CalibConfig, Calibration, check_matches
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats, LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import read_inventory, tensor_types
from ramp_cpp.llama.quantize import QuantizeOptions, complete_map, predict, quantize_map
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors
from ramp_cpp.measure.groups import groups_of
from ramp_cpp.measure.proxy import MeasureConfig, measure
from ramp_cpp.measure.tensorcache import build_cache, dequantized_spans
from ramp_cpp.model.ladder import TYPES, tensor_nbytes
from ramp_cpp.store.cache import file_sha256_cached
from ramp_cpp.write.assemble import assemble

T = GGMLQuantizationType
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SHEXP = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("moe")
    return synthetic.write_moe(d / "moe.gguf", synthetic.MoESpec(arch="granitemoe", n_ff_shexp=256))


def imatrix_of(path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """An importance matrix that differs from expert to expert (so a slice given to the wrong expert shows
    in the bytes): (n_expert, n_in) for an expert tensor, (n_in,) for a 2-D one."""
    rng = np.random.default_rng(seed)
    info = read_inventory(path)
    shape = {t.name: (t.n_expert, t.n_per_row)[t.n_expert == 1:] for t in info.tensors}
    return {n: rng.uniform(0.05, 20.0, s).astype(np.float32) for n, s in shape.items() if "blk." in n}


def _moe_logits(moe: Path, tmp_path: Path, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """The logits of a 32-token sequence and those of its first token decoded alone, copied while the model
    lives: `LlamaModel.logits` is a view of llama.cpp's output buffer, which `close` frees (read after the
    `with`, row 0 held the allocator's free-list pointers: denormals, at times NaN)."""
    spec = synthetic.MoESpec(n_layer=1) if arch == "llama" else None
    path = synthetic.write_moe(tmp_path / "m.gguf", spec) if spec else moe
    with LlamaModel(path, RuntimeOptions(n_ctx=64, n_threads=2)) as m:
        toks = m.tokenize("the city of the world was first known as the school of the state")[:32]
        logits = m.logits(toks, 0, len(toks)).copy()
        first = m.logits(toks[:1], 0, 1).copy()
    assert logits.shape[0] == len(toks)
    return logits, first[0]


@pytest.mark.parametrize("arch", ["llama", "granitemoe"])
def test_llama_cpp_loads_and_runs_the_moe(moe: Path, tmp_path: Path, arch: str) -> None:
    logits, first = _moe_logits(moe, tmp_path, arch)
    assert np.isfinite(logits).all()
    assert float(np.abs(logits).max()) > 0
    # position 0 sees token 0 only: the batch's row 0 is that token decoded alone (up to the matmul's
    # summation order); freed or uninitialised memory there differs by orders of magnitude
    np.testing.assert_allclose(logits[0], first, rtol=1e-3, atol=1e-4)


def test_inventory_holds_the_experts(moe: Path) -> None:
    info = read_inventory(moe)
    assert (info.n_expert, info.n_expert_used) == (4, 2)
    by_role: dict[str, list[Any]] = {}
    for t in info.tensors:
        by_role.setdefault(t.role, []).append(t)
    for role in EXPS:
        (t0, t1) = by_role[role]
        assert t0.searched and t0.n_expert == 4 and t0.n_rows == 4 * 256 and t0.shape == (256, 256, 4)
        assert t0.n_params == 4 * 256 * 256
    for role in SHEXP:
        assert all(t.searched and t.n_expert == 1 for t in by_role[role])
    # the router is a 2-D weight llama.cpp never quantizes: listed, not searched, not in a type map
    router = info.tensor("blk.0.ffn_gate_inp.weight")
    assert router.role == "ffn_gate_inp" and not router.searched
    with pytest.raises(RampError, match="never quantizes"):
        complete_map(info, {router.name: T.Q4_K}, T.Q8_0)
    # visiting order within a block: attention, experts gate/up/down, shared expert
    roles = [t.role for t in info.searched if t.block == 1]
    assert roles == ["attn_q", "attn_k", "attn_v", "attn_output", *EXPS, *SHEXP]
    assert [t.role for t in searched_tensors(info)][0] == "token_embd"


@pytest.fixture(scope="module")
def moe1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("moe1")
    spec = synthetic.MoESpec(arch="granitemoe", n_layer=1, n_expert=2, n_expert_used=1, n_ff_shexp=256)
    return synthetic.write_moe(d / "moe1.gguf", spec)


#: ggml's 1- and 2-bit IQ quantizers search a grid per block: 10-50 s each here, left to the full suite
SLOW_TYPES = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S}


@pytest.mark.parametrize(
    "t",
    [pytest.param(t, marks=[pytest.mark.slow] if t in SLOW_TYPES else []) for t in sorted(TYPES, key=str)],
    ids=lambda x: x.name,
)
def test_bytes_predicted_are_bytes_written_for_every_type(moe1: Path, tmp_path: Path, t: T) -> None:
    """Every 3-D expert tensor (and the shared experts beside them) at type `t` through llama.cpp's
    quantizer (the native helper): the file's bytes of each are the ladder's prediction."""
    moe = moe1
    info = read_inventory(moe)
    names = [x.name for x in info.searched if x.role in EXPS + SHEXP]
    full = complete_map(info, {n: t for n in names}, T.Q8_0)
    expected = predict(info, full)
    quantize_map(moe, tmp_path / "q.gguf", {n: t for n in names}, T.Q8_0,
                 QuantizeOptions(imatrix=imatrix_of(moe), n_threads=2), info=info)
    written = tensor_types(tmp_path / "q.gguf")
    for n in names:
        assert (written[n][0], written[n][1]) == expected[n], n
        assert written[n][1] == tensor_nbytes(T[written[n][0]], info.tensor(n).n_params)


CACHE_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.IQ4_XS, T.Q5_0, T.Q6_K, T.IQ2_XS)


@pytest.fixture(scope="module")
def caches(moe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("moecache")
    im = imatrix_of(moe)
    info = read_inventory(moe)
    names = [t.name for t in searched_tensors(info)]
    # the disk cache checks every type it adds against llama.cpp's own file (write.assemble.same_file)
    disk = build_cache(moe, CACHE_TYPES, d / "disk", imatrix=im, searched=names, n_threads=2)
    mem = build_cache(moe, CACHE_TYPES, d / "mem", imatrix=im, searched=names, n_threads=2, in_memory=True)
    return {"dir": d, "im": im, "info": info, "names": names, "disk": disk, "mem": mem}


@pytest.mark.parametrize("t", CACHE_TYPES, ids=lambda x: x.name)
def test_in_memory_cache_is_llama_cpps_file_with_a_per_expert_imatrix(caches: dict[str, Any], t: T) -> None:
    """Experts quantized slice by slice, each with its own imatrix slice, are the bytes llama.cpp writes."""
    d, info, im = caches["dir"], caches["info"], caches["im"]
    exps = {n: t for n in caches["names"] if info.tensor(n).n_expert > 1}
    ref = d / f"ref-{t.name}.gguf"
    opts = QuantizeOptions(imatrix=im, n_threads=2, force=True)
    quantize_map(info.path, ref, exps, T.Q8_0, opts, info=info)
    got = assemble(caches["mem"], exps, d / f"mem-{t.name}.gguf", force=True)
    assert Path(got.path).read_bytes() == ref.read_bytes()
    # the disk cache's assembly too (its build checked one map per type; this is the experts-only map)
    assemble(caches["disk"], exps, d / f"disk-{t.name}.gguf", force=True)
    assert (d / f"disk-{t.name}.gguf").read_bytes() == ref.read_bytes()


def test_a_wrong_expert_slice_would_show(moe: Path, tmp_path: Path) -> None:
    """The check above can fail: the experts' imatrix slices rolled by one give other bytes."""
    im = imatrix_of(moe)
    info = read_inventory(moe)
    name = "blk.0.ffn_up_exps.weight"
    rolled = dict(im, **{name: np.roll(im[name], 1, axis=0)})
    files = []
    for k, m in enumerate((im, rolled)):
        files.append(tmp_path / f"{k}.gguf")
        opts = QuantizeOptions(imatrix=m, n_threads=2)
        quantize_map(moe, files[-1], {name: T.Q4_K}, T.Q8_0, opts, info=info)
    data = [next(t.data for t in GGUFReader(f).tensors if t.name == name).tobytes() for f in files]
    assert data[0] != data[1]


def test_rows_across_an_expert_boundary(caches: dict[str, Any]) -> None:
    """The proxy's reads from the in-memory cache (each expert's rows with its slice) equal the disk's."""
    info = caches["info"]
    name = "blk.1.ffn_down_exps.weight"
    per = info.tensor(name).rows_per_expert
    spans = [(per - 3, per + 2), (2 * per + 5, 3 * per + 1), (4 * per - 1, 4 * per)]
    for t in (T.Q4_K, T.IQ2_XS):
        mem, disk = (dequantized_spans(caches[k], name, t, spans) for k in ("mem", "disk"))
        np.testing.assert_array_equal(mem, disk)


def calibration(path: Path, per_expert: bool, seed: int = 3) -> Calibration:
    """Hand-made statistics for every blk.* weight (no text is run): an expert tensor's per expert, with
    uneven usage counts (top-2 of 4 over 1000 tokens), or pooled without counts when not `per_expert`."""
    rng = np.random.default_rng(seed)
    info = read_inventory(path)
    n_tok = 1000
    stats = {}
    for t in info.tensors:
        if t.block is None:
            continue
        if t.n_expert > 1 and per_expert:
            counts = np.array([700, 900, 300, 100], dtype=np.int64)
            sq = rng.uniform(0.1, 5.0, (t.n_expert, t.n_per_row)) * counts[:, None]
            stats[t.name] = InputStats(np.sqrt(sq).astype(np.float32), sq, n_tok, counts)
        else:
            sq = rng.uniform(0.1, 5.0, t.n_per_row) * n_tok
            stats[t.name] = InputStats(np.sqrt(sq).astype(np.float32), sq, n_tok)
    cfg = CalibConfig(samples=1, ctx=8)
    return Calibration(path.name, file_sha256_cached(path), info.arch, cfg, n_tok, stats)


@pytest.mark.parametrize("per_expert", [True, False], ids=["usage-counts", "no-counts"])
def test_proxy_weighs_each_expert_by_its_usage(moe: Path, tmp_path: Path, per_expert: bool) -> None:
    """error(Q4_K) of every expert tensor = Σ_e u_e Σ_j m_ej Σ_i (W − Ŵ)²_eij with u_e = counts_e / tokens
    (u_e = k / n_expert without counts), Ŵ read back from llama.cpp's own Q4_K file."""
    cal = calibration(moe, per_expert)
    info = read_inventory(moe)
    cc = CandidateConfig(types=(T.Q4_K, T.Q8_0), embeddings=False)
    sens = measure(moe, cal, None, MeasureConfig(candidates=cc, n_threads=2), cache_root=tmp_path / "c")
    exps = [t.name for t in info.searched if t.n_expert > 1]
    ref = tmp_path / "q4k.gguf"
    quantize_map(moe, ref, {n: T.Q4_K for n in exps}, T.Q8_0, QuantizeOptions(n_threads=2), info=info)
    src = {t.name: t for t in GGUFReader(moe).tensors}
    out = {t.name: t for t in GGUFReader(ref).tensors}
    by_name = {x.name: x for x in sens.tensors}
    for n in exps:
        w = np.asarray(src[n].data, dtype=np.float64)  # (n_expert, rows, n_in)
        q = dequantize(np.asarray(out[n].data), T.Q4_K).reshape(w.shape).astype(np.float64)
        d = ((w - q) ** 2).sum(axis=1)  # (n_expert, n_in)
        s = cal.stats[n]
        if per_expert:
            weights = s.sum_sq / s.count
        else:
            weights = np.tile(s.sum_sq / s.count * info.n_expert_used / info.n_expert, (info.n_expert, 1))
        want = float((d * weights).sum())
        got = next(o.error for o in by_name[n].options if o.ggml_type == T.Q4_K)
        assert got == pytest.approx(want, rel=1e-6), n


def test_multi_token_prediction_blocks_are_not_searched(tmp_path: Path) -> None:
    """glm4moe-style checkpoints carry an MTP block last (`nextn_predict_layers`): llama.cpp never
    evaluates it, so nothing there can be measured; its tensors keep the base type."""
    m = synthetic.write_moe(tmp_path / "n.gguf", synthetic.MoESpec(n_layer=3, nextn_layers=1))
    info = read_inventory(m)
    assert {t.block for t in info.searched} == {0, 1}
    assert all(not t.searched for t in info.tensors if t.block == 2)


def test_groups_gain_expert_roles(moe: Path) -> None:
    info = read_inventory(moe)
    names = [t.name for t in info.searched]
    groups = groups_of(info, names, n_buckets=2)
    roles = {g.role for g in groups}
    assert set(EXPS + SHEXP) <= roles
    assert {g.name for g in groups if g.role == "ffn_up_exps"} == {"ffn_up_exps@0-0", "ffn_up_exps@1-1"}


# -- bad input: one line each, before any work -----------------------------------------------------------


def test_expert_count_disagreeing_with_the_metadata(tmp_path: Path) -> None:
    bad = synthetic.write_moe(tmp_path / "bad.gguf", synthetic.MoESpec(n_layer=1, expert_count_meta=8))
    with pytest.raises(RampError, match=r"ffn_gate_exps.weight holds 4 experts, the metadata has "
                                        r"llama.expert_count = 8") as e:
        read_inventory(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "n_expert, per_expert, edit, refused",
    [
        (4, True, "", None),
        (8, True, "", "statistics of 4 experts for blk.0.ffn_gate_exps.weight, m.gguf has 8 experts"),
        (2, True, "", "statistics of 4 experts for blk.0.ffn_gate_exps.weight, m.gguf has 2 experts"),
        (8, False, "", None),  # pooled statistics: every expert gets the same row, whatever their number
        (4, True, "blk.1.attn_q.weight", "for blk.1.attn_q.weight, m.gguf has no experts (a 2-D weight)"),
    ],
    ids=["same", "more", "fewer", "pooled", "2-D"],
)
def test_calibration_of_another_expert_count_is_refused(
    moe: Path, tmp_path: Path, n_expert: int, per_expert: bool, edit: str, refused: str | None
) -> None:
    """A calibration's per-expert rows are handed out by expert index: measured on a model with another
    expert count (same names, same widths), it is refused in one line where a calibration is matched to a
    model (the fold and the paper's pipeline take one measured on the unfolded original, not the file's
    own hash)."""
    cal = calibration(moe, per_expert)
    if edit:  # per-expert statistics of a 2-D weight
        s = cal.stats[edit]
        cal.stats[edit] = InputStats(np.tile(s.max_abs, (4, 1)), np.tile(s.sum_sq, (4, 1)), s.count,
                                     np.full(4, s.count // 2, dtype=np.int64))
    spec = synthetic.MoESpec(arch="granitemoe", n_ff_shexp=256, n_expert=n_expert)
    info = read_inventory(synthetic.write_moe(tmp_path / "m.gguf", spec))
    if refused is None:
        check_matches(cal, info)
        return
    with pytest.raises(RampError, match=re.escape(refused) + ": measured on another model$") as e:
        check_matches(cal, info)
    assert "\n" not in str(e.value)


def test_architecture_llama_cpp_cannot_load(tmp_path: Path) -> None:
    bad = synthetic.write(tmp_path / "x.gguf", synthetic.Spec(arch="notllama", n_layer=1))
    with pytest.raises(RampError, match="architecture 'notllama' is not one the llama.cpp"):
        read_inventory(bad)


def test_a_role_the_tables_do_not_know(tmp_path: Path) -> None:
    m = synthetic.write_moe(tmp_path / "u.gguf", synthetic.MoESpec(n_layer=1, extra_tensor="mystery_proj"))
    info = read_inventory(m)  # inspect still lists it
    assert info.tensor("blk.0.mystery_proj.weight").role == "other"
    with pytest.raises(RampError, match=r"blk.0.mystery_proj.weight: llama.cpp quantizes this tensor, but "
                                        r"its role is not in ramp-cpp's tables .* cannot be searched"):
        searched_tensors(info)


def test_dry_run_plans_the_experts(moe: Path, tmp_path: Path) -> None:
    """`search --dry-run`'s plan probes every role × depth group, the experts' and shared experts' included,
    and prices the tensor cache over every searched weight, not the attention's alone."""
    from ramp_cpp.measure.groups import GroupConfig
    from ramp_cpp.pipeline.estimate import estimate
    from ramp_cpp.pipeline.plan import plan_run, size_range
    from ramp_cpp.pipeline.request import SizedRequest
    from ramp_cpp.pipeline.sizedconfig import SizedConfig
    from ramp_cpp.pipeline.speedprobe import speed_probe

    text_file = tmp_path / "words.txt"
    text_file.write_text(synthetic.text(3000))
    cfg = SizedConfig(text=str(text_file), n_ctx=64, chunks=2, calib=CalibConfig(str(text_file), 2, 64))
    cc = CandidateConfig(types=(T.Q4_K, T.Q6_K, T.Q8_0))
    gcfg = GroupConfig(n_buckets=2, pairs=0, chunks=1)
    info = read_inventory(moe)
    lo, hi = size_range(info, cc)
    req = SizedRequest(moe, tmp_path / "run", "greedy", str((lo + hi) // 2), cfg, cc, None,
                       sensitivity="measured", gcfg=gcfg, cache_root=tmp_path / "cache", fold="off")
    plan = plan_run(req)
    assert {t.role for t in searched_tensors(plan.info)} >= set(EXPS + SHEXP)
    opts = RuntimeOptions(n_threads=2)
    stages = {s.stage: s for s in estimate(plan, (), opts, speed_probe(plan, opts, ()))}
    n_groups = len(groups_of(info, [t.name for t in searched_tensors(info)], 2))
    attention_only = len({(t.role, t.block) for t in info.searched if t.role.startswith("attn")}) + 2
    assert n_groups > attention_only
    assert stages["group probes (unfolded)"].note.startswith(f"{1 + n_groups} evaluations")
    # the size range spans the experts' bytes: every searched tensor from its smallest to its largest type
    exps = sum(t.n_params for t in info.searched if t.n_expert > 1)
    assert hi - lo >= exps * (8.5 - 4.5) / 8


# (name, arch, llama.cpp quantizes it, role, searched when in a block that runs): llama-quant.cpp's
# tensor_allows_quantization and llama-arch.cpp's names, for the roles of the MoE and hybrid architectures
ROLE_CASES = [
    ("blk.0.ffn_gate_exps.weight", "qwen3moe", True, "ffn_gate_exps", True),
    ("blk.0.ffn_gate_up_exps.weight", "gpt-oss", True, "ffn_gate_up_exps", True),
    ("blk.0.ffn_down_shexp.weight", "deepseek2", True, "ffn_down_shexp", True),
    ("blk.0.ffn_gate_inp.weight", "qwen3moe", False, "ffn_gate_inp", False),
    ("blk.0.attn_kv_a_mqa.weight", "deepseek2", True, "attn_kv_a_mqa", True),
    ("blk.0.attn_kv_a_mqa.weight", "glm5-next", False, "attn_kv_a_mqa", True),  # glm5-next keeps it
    ("blk.0.attn_gate.weight", "qwen3next", True, "attn_gate", True),
    ("blk.0.ssm_in.weight", "qwen3next", True, "ssm_in", True),
    ("blk.0.ssm_ba.weight", "qwen3next", True, "ssm_ba", True),
    ("blk.0.ssm_out.weight", "qwen35moe", True, "ssm_out", True),
    ("blk.0.ssm_conv1d.weight", "qwen3next", False, "other", False),
    ("blk.0.ssm_a", "qwen3next", False, "other", False),  # no .weight suffix: never quantized
    ("blk.0.shortconv.in_proj.weight", "lfm2", True, "shortconv.in_proj", True),
    ("blk.0.shortconv.conv.weight", "lfm2", False, "other", False),
    ("blk.46.nextn.eh_proj.weight", "glm4moe", True, "nextn.eh_proj", False),
    ("blk.0.attn_sinks.weight", "gpt-oss", True, "other", False),  # 1-D in llama.cpp: n_dims rules it out
    ("blk.0.time_mix_w1.weight", "rwkv7", False, "other", False),
    ("token_types.weight", "bert", False, "other", False),
]


@pytest.mark.parametrize("name, arch, quantized, role, searched", ROLE_CASES)
def test_roles_follow_llama_cpps_rules(
    name: str, arch: str, quantized: bool, role: str, searched: bool
) -> None:
    from ramp_cpp.model.arch import check_known, classify, quantizable

    r, _ = classify(name)
    assert (quantizable(name, 2, arch), r.name, r.searched) == (quantized, role, searched)
    if not r.searched and r.name != "other":
        assert r.why_not  # a known role no search moves says why
    check_known(name, 1, arch)  # a 1-D tensor is never quantized, whatever its name


def test_a_quantizable_tensor_of_unknown_role_is_refused() -> None:
    from ramp_cpp.model.arch import check_known

    check_known("blk.0.altup_proj.weight", 2, "gemma3n")  # never quantized: nothing to search
    with pytest.raises(RampError, match="per_layer_token_embd.weight: llama.cpp quantizes this tensor"):
        check_known("per_layer_token_embd.weight", 2, "gemma3n")
