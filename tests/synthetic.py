"""Tiny GGUF models written with gguf-py's writer, for tests: random weights, a real SentencePiece-style
vocabulary in the metadata (so llama.cpp tokenizes and runs them), and row lengths chosen so that both the
K-quants and llama.cpp's row-length fallbacks are exercised."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter, TokenType

WORDS = (
    "the of and to in is was for on as with by he at from his an were are which this be has or had it "
    "first one their its new after but who not they have her she two been other when there all during "
    "into school time may years more most only over city some world would where later up such used many "
    "can state about national out known university united then made"
).split()


def vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, 256 byte tokens, printable characters, then whole words with SentencePiece's
    word-start marker; higher score = merged first."""
    toks = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    toks += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    chars = ["\u2581"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    toks += chars
    types += [TokenType.NORMAL] * len(chars)
    pieces: list[str] = []
    for w in WORDS:
        full = "\u2581" + w
        pieces += [full[:i] for i in range(2, len(full) + 1)]
    seen = set(toks)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            toks.append(p)
            types.append(TokenType.NORMAL)
    n_fixed = 3 + 256 + len(chars)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-100.0] * len(chars)
    scores += [10.0 * len(t) for t in toks[n_fixed:]]  # longer words merge first
    return toks, scores, [int(t) for t in types]


def text(n_words: int = 4000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    lines = [" ".join(words[i : i + 12]) + " ." for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Spec:
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 256  # a multiple of 256: K-quants apply to q, k, v, o, gate, up
    n_ff: int = 384  # not a multiple of 256: ffn_down falls back (Q4_K -> Q5_0, ...)
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 256
    tied: bool = False
    seed: int = 0
    extra_block_tensors: tuple[str, ...] = field(default=())  # e.g. gemma3's attn_q_norm
    arch_tensors: bool = False  # also write what llama.cpp needs to load `arch` (ARCH_EXTRAS)
    fused_qkv: bool = False  # one blk.N.attn_qkv.weight in place of attn_q/k/v


@dataclass(frozen=True)
class ArchExtras:
    """Per-block tensors an architecture's llama.cpp loader requires beyond llama's
    (src/models/<arch>.cpp, load_arch_tensors)."""

    qkv_bias: bool = False  # attn_q.bias, attn_k.bias, attn_v.bias
    head_norms: tuple[str, ...] = ()  # (n_embd_head,) norms on q and k
    embd_norms: tuple[str, ...] = ()  # (n_embd,) norms on the sub-block outputs


ARCH_EXTRAS: dict[str, ArchExtras] = {
    "qwen2": ArchExtras(qkv_bias=True),
    "gemma3": ArchExtras(
        head_norms=("attn_q_norm.weight", "attn_k_norm.weight"),
        embd_norms=("post_attention_norm.weight", "post_ffw_norm.weight"),
    ),
}


def _hyperparameters(w: GGUFWriter, spec: Spec | MoESpec) -> None:
    """The keys a dense and an MoE synthetic model share, in the order both write them."""
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    w.add_rope_freq_base(10000.0)


def write(path: Path, spec: Spec = Spec()) -> Path:
    rng = np.random.default_rng(spec.seed)
    toks, scores, types = vocab()
    n_vocab = len(toks)
    hd = spec.n_embd // spec.n_head
    a = spec.arch
    w = GGUFWriter(str(path), a)
    w.add_name(f"synthetic-{a}-{spec.n_layer}x{spec.n_embd}")
    _hyperparameters(w, spec)
    w.add_file_type(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        m = rng.standard_normal((n_out, n_in)).astype(np.float32) * (scale / np.sqrt(n_in))
        # a few outlier input channels, as real activations/weights have
        m[:, rng.choice(n_in, size=max(1, n_in // 64), replace=False)] *= 4.0
        return m.astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, spec.n_embd)) * 0.5).astype(np.float16))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(spec.n_embd))
        qkv = [mat(spec.n_embd, spec.n_embd), mat(spec.n_head_kv * hd, spec.n_embd)]
        qkv.append(mat(spec.n_head_kv * hd, spec.n_embd))
        if spec.fused_qkv:  # rows q, then k, then v: the split build_qkv makes
            w.add_tensor(p + "attn_qkv.weight", np.concatenate(qkv, axis=0))
        else:
            for role, m in zip(("attn_q", "attn_k", "attn_v"), qkv, strict=True):
                w.add_tensor(p + role + ".weight", m)
        w.add_tensor(p + "attn_output.weight", mat(spec.n_embd, spec.n_embd, 0.5))
        w.add_tensor(p + "ffn_norm.weight", norm(spec.n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(spec.n_ff, spec.n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(spec.n_ff, spec.n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(spec.n_embd, spec.n_ff, 0.5))
        for extra in spec.extra_block_tensors:
            w.add_tensor(p + extra, norm(hd))
        x = ARCH_EXTRAS.get(a, ArchExtras()) if spec.arch_tensors else ArchExtras()
        if x.qkv_bias:
            for role, m in zip(("attn_q", "attn_k", "attn_v"), qkv, strict=True):
                w.add_tensor(p + role + ".bias", (0.1 * rng.standard_normal(m.shape[0])).astype(np.float32))
        for n in x.head_norms:
            if n not in spec.extra_block_tensors:
                w.add_tensor(p + n, norm(hd))
        for n in x.embd_norms:
            w.add_tensor(p + n, norm(spec.n_embd))
    w.add_tensor("output_norm.weight", norm(spec.n_embd))
    if not spec.tied:
        w.add_tensor("output.weight", mat(n_vocab, spec.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass(frozen=True)
class MoESpec:
    """A tiny Mixtral-style MoE in llama.cpp's `llama` architecture (src/models/llama.cpp: n_expert > 0 gives
    each block a router ffn_gate_inp and 3-D experts ffn_{gate,up,down}_exps, ne = [in, out, n_expert]),
    `granitemoe` (the same tensors), whose loader also reads a shared expert (`n_ff_shexp`:
    `expert_shared_feed_forward_length`, ffn_{gate,up,down}_shexp), `qwen2moe` (MOE_ARCH: q/k/v biases, a
    shared expert with its gate vector ffn_gate_inp_shexp) or `hy_v3` (q/k norms; `fused_gate_up`). Random weights: for tests of the machinery, never
    of quality (the upcycled benchmark models are fold/offgrid.py's)."""

    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 256  # K-quants fit every expert's gate/up rows
    n_ff: int = 256  # and down's: the 3-D tensors take every candidate type
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_shexp: int = 0  # > 0: a shared expert of that width (qwen2moe requires one)
    n_ctx: int = 256
    seed: int = 0
    expert_count_meta: int | None = None  # the `llama.expert_count` written (default n_expert): bad input
    extra_tensor: str = ""  # a 2-D blk.N.<this>.weight of a role no table knows: bad input
    nextn_layers: int = 0  # `nextn_predict_layers`: the last blocks are an MTP head llama.cpp does not run
    norm_outliers: int = 0  # channels of ffn_norm's scale x 6: outliers in the experts' input (folding's work)
    router_scale: float = 1.0  # larger router logits: top-k routing differs clearly from token to token
    fused_gate_up: bool = False  # one ffn_gate_up_exps (rows: each expert's gate, then its up) in place of two


#: the MoE of the tests of folding and of the expert statistics: outliers in the experts' input for a fold to
#: move, a router whose top-k varies clearly from token to token
ROUTED: dict[str, Any] = {"norm_outliers": 4, "router_scale": 2.0}


@dataclass(frozen=True)
class MoEArch:
    """What an MoE architecture's llama.cpp loader requires beyond llama's (src/models/<arch>.cpp)."""

    kv: tuple[tuple[str, float], ...] = ()  # float32 `<arch>.<key>` metadata
    qkv_bias: bool = False  # attn_q.bias, attn_k.bias, attn_v.bias
    shexp_gate: bool = False  # ffn_gate_inp_shexp: the shared expert's sigmoid gate vector
    expert_ff_length: bool = False  # `expert_feed_forward_length` (each expert's width)
    head_norms: bool = False  # attn_q_norm, attn_k_norm: (n_embd_head,) RMSNorms of q and k


MOE_ARCH: dict[str, MoEArch] = {
    "granitemoe": MoEArch(kv=(("logit_scale", 1.0),)),
    "qwen2moe": MoEArch(qkv_bias=True, shexp_gate=True, expert_ff_length=True),
    # src/models/hy-v3.cpp: a sigmoid router, an ungated shared expert, create_tensor_gate_up_exps (fused or not)
    "hy_v3": MoEArch(expert_ff_length=True, head_norms=True),
}


def write_moe(path: Path, spec: MoESpec = MoESpec()) -> Path:
    """`spec` as a GGUF llama.cpp loads and runs (tests/test_moe.py checks that it does)."""
    rng = np.random.default_rng(spec.seed)
    toks, scores, types = vocab()
    hd = spec.n_embd // spec.n_head
    x = MOE_ARCH.get(spec.arch, MoEArch())
    w = GGUFWriter(str(path), spec.arch)
    w.add_name(f"synthetic-moe-{spec.n_layer}x{spec.n_embd}-{spec.n_expert}e")
    _hyperparameters(w, spec)
    w.add_expert_count(spec.n_expert if spec.expert_count_meta is None else spec.expert_count_meta)
    w.add_expert_used_count(spec.n_expert_used)
    if x.expert_ff_length:
        w.add_expert_feed_forward_length(spec.n_ff)
    if spec.n_ff_shexp:
        w.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    if spec.nextn_layers:
        w.add_uint32(f"{spec.arch}.nextn_predict_layers", spec.nextn_layers)
    for k, v in x.kv:
        w.add_float32(f"{spec.arch}.{k}", v)
    w.add_file_type(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(*shape: int, scale: float = 1.0) -> np.ndarray:
        """numpy order: (..., n_out, n_in); a few outlier input channels per matrix."""
        m = rng.standard_normal(shape).astype(np.float32) * (scale / np.sqrt(shape[-1]))
        m[..., rng.choice(shape[-1], size=max(1, shape[-1] // 64), replace=False)] *= 4.0
        return m.astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    e, d, f = spec.n_expert, spec.n_embd, spec.n_ff
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(toks), d)) * 0.5).astype(np.float16))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(d))
        for role, n_out in (("attn_q", d), ("attn_k", spec.n_head_kv * hd), ("attn_v", spec.n_head_kv * hd)):
            w.add_tensor(p + role + ".weight", mat(n_out, d))
            if x.qkv_bias:
                w.add_tensor(p + role + ".bias", (0.1 * rng.standard_normal(n_out)).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", mat(d, d, scale=0.5))
        if x.head_norms:
            w.add_tensor(p + "attn_q_norm.weight", norm(hd))
            w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        g = norm(d)
        if spec.norm_outliers:
            g[rng.choice(d, size=spec.norm_outliers, replace=False)] *= 6.0
        w.add_tensor(p + "ffn_norm.weight", g)
        router = rng.standard_normal((e, d)) * spec.router_scale / np.sqrt(d)
        w.add_tensor(p + "ffn_gate_inp.weight", router.astype(np.float32))
        if spec.fused_gate_up:
            w.add_tensor(p + "ffn_gate_up_exps.weight", mat(e, 2 * f, d))
        else:
            w.add_tensor(p + "ffn_gate_exps.weight", mat(e, f, d))
            w.add_tensor(p + "ffn_up_exps.weight", mat(e, f, d))
        w.add_tensor(p + "ffn_down_exps.weight", mat(e, d, f, scale=0.5))
        if x.shexp_gate:
            w.add_tensor(p + "ffn_gate_inp_shexp.weight", (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32))
        if spec.n_ff_shexp:
            w.add_tensor(p + "ffn_gate_shexp.weight", mat(spec.n_ff_shexp, d))
            w.add_tensor(p + "ffn_up_shexp.weight", mat(spec.n_ff_shexp, d))
            w.add_tensor(p + "ffn_down_shexp.weight", mat(d, spec.n_ff_shexp, scale=0.5))
        if spec.extra_tensor:
            w.add_tensor(p + spec.extra_tensor + ".weight", mat(d, d))
    w.add_tensor("output_norm.weight", norm(d))
    w.add_tensor("output.weight", mat(len(toks), d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def measured(model: Path, d: Path) -> dict[str, Any]:
    """A text file of synthetic words in `d`, a tiny calibration on it, the proxy sensitivity and the tensor
    cache of `model` under `d/cache`: what the tests of the measured sensitivity start from."""
    from ramp_cpp.calibration.artifact import CalibConfig
    from ramp_cpp.calibration.collect import calibrate
    from ramp_cpp.measure.candidates import CandidateConfig
    from ramp_cpp.measure.proxy import measure
    from ramp_cpp.measure.tensorcache import build_cache

    text_file = d / "words.txt"
    text_file.write_text(text(6000))
    words = text_file.read_text()
    cal = calibrate(model, words, CalibConfig(text=str(text_file), samples=2, ctx=64))
    im = cal.imatrix()
    sens = measure(model, cal, im, cache_root=d / "cache")
    names = [t.name for t in sens.tensors]
    cache = build_cache(model, CandidateConfig().requested(), d / "cache", imatrix=im, searched=names)
    return {"dir": d, "text_file": text_file, "text": words, "cal": cal, "im": im, "sens": sens, "cache": cache}
