"""Architecture knowledge as tables of records.

llama.cpp names every architecture's tensors the same way (`blk.N.attn_q.weight`, `token_embd.weight`, ...),
so the role of a tensor follows from its name; one table serves llama, qwen2, gemma3 and the other
`blk.N.*` architectures. Nothing here branches on the architecture name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ramp_cpp.errors import RampError


@dataclass(frozen=True)
class Role:
    """What a weight tensor does in the network.

    `order` is its place in the visiting order within a block (paper Alg. 1: q, k, v, o, gate, up, down; the
    other roles where llama.cpp's graph computes them); `type_scalar` is dim 6 of the layer embedding (paper
    Table 24). `experts`: a 3-D tensor of n_expert slices (ggml ne[2], `{arch}.expert_count`), which llama.cpp
    reads through MUL_MAT_ID and writes in one type for all its experts. `why_not`: for a tensor llama.cpp
    quantizes that no search moves, the reason (it then keeps the run's base type).
    """

    name: str
    order: int
    type_scalar: float
    searched: bool  # visited by the RAMP policy (the paper's "quantizable linear layers")
    experts: bool = False
    why_not: str = ""


_MTP = "the multi-token-prediction layer, which llama.cpp does not run when it evaluates the model"

#: Every role whose tensors llama.cpp quantizes (src/llama-quant.cpp, tensor_allows_quantization) in the
#: architectures ramp-cpp knows, by llama.cpp's tensor name (src/llama-arch.cpp); checked against the models
#: of src/models/ (llama, qwen2, gemma3, qwen3moe, olmoe, granitemoe, llama4, deepseek2, glm4moe, gpt-oss,
#: qwen3next, qwen35moe, lfm2).
ROLES: tuple[Role, ...] = (
    # attention
    Role("attn_q_a", 5, 0.0, True),  # MLA (deepseek2): q's low-rank down projection
    Role("attn_q_b", 8, 0.0, True),
    Role("attn_q", 10, 0.0, True),
    Role("attn_kv_a_mqa", 12, 0.0, True),  # MLA: the compressed kv and the rope key
    Role("attn_kv_b", 14, 0.0, True),
    Role("attn_k_b", 16, 0.0, True),  # MLA's kv_b split into k and v (absorbed attention)
    Role("attn_v_b", 18, 0.0, True),
    Role("attn_k", 20, 0.0, True),
    Role("attn_v", 30, 0.0, True),
    Role("attn_qkv", 30, 0.0, True),  # fused QKV (phi3, qwen3next, ...): one tensor in place of q, k, v
    Role("attn_gate", 32, 0.0, True),  # qwen3next/qwen35: the gate on attention's output
    # state-space and convolution mixers of the hybrids
    Role("ssm_in", 34, 0.0, True),  # mamba's in_proj, qwen3next's in_proj_qkvz
    Role("shortconv.in_proj", 34, 0.0, True),  # lfm2
    Role("ssm_x", 35, 0.0, True),  # mamba's x_proj
    Role("ssm_dt", 36, 0.0, True),  # mamba's dt_proj (qwen3next has only its bias)
    Role("ssm_ba", 37, 0.0, True),  # qwen3next's in_proj_ba
    Role("ssm_alpha", 37, 0.0, True),  # qwen35: in_proj_a
    Role("ssm_beta", 38, 0.0, True),  # qwen35: in_proj_b
    Role("ssm_out", 39, 0.25, True),
    Role("shortconv.out_proj", 39, 0.25, True),
    Role("attn_output", 40, 0.25, True),
    # feed-forward: dense, routed experts (3-D), shared experts
    Role("ffn_gate", 50, 0.5, True),
    Role("ffn_gate_exps", 51, 0.5, True, experts=True),
    Role("ffn_gate_up_exps", 55, 0.55, True, experts=True),  # gate and up fused along the rows
    Role("ffn_up", 60, 0.6, True),
    Role("ffn_up_exps", 61, 0.6, True, experts=True),
    Role("ffn_down", 70, 0.75, True),
    Role("ffn_down_exps", 71, 0.75, True, experts=True),
    Role("ffn_gate_shexp", 80, 0.5, True),
    Role("ffn_up_shexp", 81, 0.6, True),
    Role("ffn_down_shexp", 82, 0.75, True),
    # the router: a 2-D weight llama.cpp keeps in its source type (tensor_allows_quantization)
    Role("ffn_gate_inp", 45, 0.5, False, why_not="the MoE router, which llama.cpp never quantizes"),
    # the MTP head some checkpoints ship in extra blocks (glm4moe, qwen3next): quantized, never evaluated
    Role("nextn.eh_proj", 90, 1.0, False, why_not=_MTP),
    Role("nextn.embed_tokens", 91, 1.0, False, why_not=_MTP),
    Role("nextn.shared_head_head", 92, 1.0, False, why_not=_MTP),
    # searched as embeddings (measure/candidates.py), outside the blocks
    Role("token_embd", -1, 1.0, False),
    Role("output", 999, 1.0, False),
)
ROLE_BY_NAME: dict[str, Role] = {r.name: r for r in ROLES}
OTHER = Role("other", 500, 1.0, False)

# role names hold dots where llama.cpp nests them (shortconv.in_proj, nextn.eh_proj)
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_.]+)\.weight$")
_GLOBAL_TENSOR = re.compile(r"^([A-Za-z0-9_]+)\.weight$")


def classify(name: str) -> tuple[Role, int | None]:
    """(role, block index or None) of a tensor name in llama.cpp's naming scheme."""
    m = _BLOCK_TENSOR.match(name)
    if m:
        return ROLE_BY_NAME.get(m.group(2), OTHER), int(m.group(1))
    m = _GLOBAL_TENSOR.match(name)
    if m and m.group(1) in ROLE_BY_NAME:
        return ROLE_BY_NAME[m.group(1)], None
    return OTHER, None


@dataclass(frozen=True)
class NeverQuantized:
    """A substring of tensor names llama.cpp never quantizes (`tensor_allows_quantization` in
    src/llama-quant.cpp); `archs`, when set, the only architectures the rule applies to."""

    part: str
    archs: tuple[str, ...] = ()


#: A type map naming one of these is refused instead of silently ignored; the router (ffn_gate_inp), norms,
#: conv1d and the tiny per-arch projections stay at their source type.
NEVER_QUANTIZED: tuple[NeverQuantized, ...] = (
    *(NeverQuantized(p) for p in (
        "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
        "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
        "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
        "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
        "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
        "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
        "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    )),
    *(NeverQuantized(p, ("glm5-next",)) for p in (
        "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
        "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
        "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
    )),
)
#: Whole names llama.cpp never quantizes (BERT's position embeddings and token types).
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def quantizable(name: str, n_dims: int, arch: str = "") -> bool:
    """Whether llama.cpp's quantizer converts this tensor (2-D and 3-D weights not excluded by name)."""
    if n_dims < 2 or not name.endswith("weight") or name in NEVER_QUANTIZED_NAMES:
        return False
    return not any(r.part in name and (not r.archs or arch in r.archs) for r in NEVER_QUANTIZED)


def check_known(name: str, n_dims: int, arch: str) -> None:
    """One line for a tensor llama.cpp quantizes whose role the tables do not know: the search could neither
    price nor move it, and leaving it silently at the base type would misstate what the search covered."""
    role, _ = classify(name)
    if role is OTHER and quantizable(name, n_dims, arch):
        raise RampError(
            f"{name}: llama.cpp quantizes this tensor, but its role is not in ramp-cpp's tables "
            f"(model/arch.py ROLES), so it cannot be searched; this {arch} model is not supported yet"
        )


# -- scale folding (paper §4.3, Algorithm 2) -------------------------------------------------------------


@dataclass(frozen=True)
class FoldGroup:
    """The linears of one block that read one RMSNorm's output, and only they: the norm's weight can then
    absorb 1/s while their input columns absorb s. `stats_from` is the tensor whose input statistics give s
    (they all read the same input, so any would do; Alg. 2 names q_proj and gate_proj). A block holding a
    tensor named in `also_read_by` feeds the norm's output to it too (a MoE router): folding is refused.
    `optional`: linears that read the norm's output too where a block has them (shared experts and their
    gate), folded with the others."""

    norm: str
    linears: tuple[str, ...]
    stats_from: str
    also_read_by: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


ATTN_GROUP = FoldGroup("attn_norm", ("attn_q", "attn_k", "attn_v"), "attn_q")
ATTN_FUSED_GROUP = FoldGroup("attn_norm", ("attn_qkv",), "attn_qkv")  # create_tensor_qkv's fused variant
FFN_GROUP = FoldGroup("ffn_norm", ("ffn_gate", "ffn_up"), "ffn_gate", also_read_by=("ffn_gate_inp",))
# llm_graph_context::build_moe_ffn: the router and every expert's gate and up read the normalized input, and
# so do the shared experts and their gate (qwen2moe's ffn_gate_inp_shexp, a vector); s comes from the expert
# tensor's statistics pooled over its experts (folding.py says why)
MOE_GROUP = FoldGroup(
    "ffn_norm",
    ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps"),
    "ffn_gate_exps",
    optional=("ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_inp_shexp"),
)
# create_tensor_gate_up_exps' fused variant: one ffn_gate_up_exps (each expert's gate rows, then its up rows,
# all reading the normalized input) in place of ffn_gate_exps and ffn_up_exps. llama-arch.cpp names no dense
# fused gate_up, so there is no dense counterpart to FFN_GROUP.
MOE_FUSED_GROUP = replace(
    MOE_GROUP, linears=("ffn_gate_inp", "ffn_gate_up_exps"), stats_from="ffn_gate_up_exps"
)
# hy_v3 runs its shared expert through build_ffn whether the block has one or not, and build_ffn with no
# weights returns silu(y) of the normalized input y itself, which no fold preserves: its shared expert is
# required (a block without one is refused as feeding none of the groups)
_HY_SHEXP = ("ffn_gate_shexp", "ffn_up_shexp")
HY_MOE_GROUPS = tuple(
    replace(g, linears=g.linears + _HY_SHEXP, optional=()) for g in (MOE_GROUP, MOE_FUSED_GROUP)
)


@dataclass(frozen=True)
class FoldArch:
    """How scale folding applies to one llama.cpp architecture.

    `groups` lists, per norm, its alternatives in order of preference (the first whose linears a block has
    is used). llama.cpp's RMSNorm multiplies by (stored weight + `norm_offset`). `refused`, when set, says
    why folding would change the network (a norm feeding something besides the group's linears)."""

    arch: str
    groups: tuple[FoldGroup, ...]
    norm_offset: float = 0.0
    refused: str = ""
    source: str = ""  # where in llama.cpp this record was checked


FOLD_ARCHS: dict[str, FoldArch] = {
    a.arch: a
    for a in (
        FoldArch(
            "llama", (ATTN_GROUP, ATTN_FUSED_GROUP, FFN_GROUP, MOE_GROUP), source="src/models/llama.cpp"
        ),
        # q/k/v biases are added after the matmul: W·diag(s)·(x/s) + b = W·x + b, nothing to change
        FoldArch("qwen2", (ATTN_GROUP, ATTN_FUSED_GROUP, FFN_GROUP), source="src/models/qwen2.cpp"),
        FoldArch("qwen2moe", (ATTN_GROUP, ATTN_FUSED_GROUP, MOE_GROUP), source="src/models/qwen2moe.cpp"),
        # attn_q_norm/attn_k_norm act on q and k after the projection: unchanged by folding
        FoldArch("qwen3moe", (ATTN_GROUP, ATTN_FUSED_GROUP, MOE_GROUP), source="src/models/qwen3moe.cpp"),
        # Gemma3RMSNorm computes x·(1+w); conversion/gemma.py (norm_shift) stores 1+w, so llama.cpp's
        # build_norm multiplies by the stored value (offset 0). attn_q_norm/attn_k_norm act on q, k and
        # post_attention_norm/post_ffw_norm on the sub-block outputs: all unchanged by folding.
        FoldArch("gemma3", (ATTN_GROUP, ATTN_FUSED_GROUP, FFN_GROUP), source="src/models/gemma3.cpp"),
        # q/k norms as qwen3moe's; the sigmoid router's selection bias ffn_exp_probs_b is added to its
        # output, not its input; leading dense blocks have ffn_gate/ffn_up; the MoE blocks' experts are
        # separate or fused (create_tensor_gate_up_exps)
        FoldArch(
            "hy_v3", (ATTN_GROUP, ATTN_FUSED_GROUP, FFN_GROUP, *HY_MOE_GROUPS), source="src/models/hy-v3.cpp"
        ),
        FoldArch(
            "command-r",
            (),
            refused="attn_norm feeds attention and the FFN in parallel",
            source="src/models/command-r.cpp",
        ),
        FoldArch(
            "phi2",
            (),
            refused="attn_norm (a LayerNorm with bias) feeds attention and the FFN in parallel",
            source="src/models/phi2.cpp",
        ),
    )
}


def fold_arch(arch: str) -> FoldArch:
    """The folding record of `arch`; one RampError line for an architecture folding does not support."""
    supported = ", ".join(a.arch for a in FOLD_ARCHS.values() if not a.refused)
    rec = FOLD_ARCHS.get(arch)
    if rec is None:
        raise RampError(f"scale folding supports {supported}; this model is {arch!r}")
    if rec.refused:
        raise RampError(f"scale folding would change a {arch} model ({rec.refused}); it supports {supported}")
    return rec


# -- off-grid rescaling (benchmark bases) -----------------------------------------------------------


@dataclass(frozen=True)
class ChannelPair:
    """The output rows of `producer` reach the input columns of `consumer` through an operation that acts on
    each channel alone and linearly (attention's weighted sum over V; the GLU product act(gate)·up), so
    dividing producer row r (and its bias) by t_r and multiplying consumer column r by t_r leaves the
    network's function unchanged. `per_head`: the producer's rows are the kv heads and the consumer's columns
    the query heads (grouped-query attention: query head h reads kv head h // (n_head / n_head_kv))."""

    producer: str
    consumer: str
    per_head: bool


V_TO_O = ChannelPair("attn_v", "attn_output", per_head=True)
UP_TO_DOWN = ChannelPair("ffn_up", "ffn_down", per_head=False)


@dataclass(frozen=True)
class ResidualStream:
    """Every tensor that touches the residual stream's n_embd channels, by role: `readers`' input columns
    are those channels (the embeddings' rows, the head's and the normed-input linears' columns), `writers`'
    output rows (and biases) are, and `norms` are 1-D weights over them. RMSNorm's mean of squares does not
    depend on the channels' order, so one permutation π applied to all of them (reader column j := column
    π_j, writer row j := row π_j, norm weight j := weight π_j) leaves the network's function unchanged."""

    readers: tuple[str, ...]
    writers: tuple[str, ...]
    norms: tuple[str, ...]


LLAMA_RESIDUAL = ResidualStream(
    readers=("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_qkv", "ffn_gate", "ffn_up",
             "ffn_gate_inp"),
    writers=("attn_output", "ffn_down"),
    norms=("attn_norm", "ffn_norm", "output_norm"),
)


@dataclass(frozen=True)
class RescaleArch:
    """Which function-preserving channel rescales apply to an architecture: the norm groups of its
    `FOLD_ARCHS` record (norm weight / s, the group's input columns · s), these producer→consumer pairs, and
    the tensors of its residual stream (a permutation of its channels: `offgrid --permute`)."""

    arch: str
    pairs: tuple[ChannelPair, ...]
    residual: ResidualStream = LLAMA_RESIDUAL
    source: str = ""


RESCALE_ARCHS: dict[str, RescaleArch] = {
    a.arch: a
    for a in (
        RescaleArch("llama", (V_TO_O, UP_TO_DOWN), source="src/models/llama.cpp"),
        # attn_v.bias is added before attention: it is divided with V's rows
        RescaleArch("qwen2", (V_TO_O, UP_TO_DOWN), source="src/models/qwen2.cpp"),
        # q/k norms act on q and k, post_attention_norm / post_ffw_norm on the outputs of attn_output and
        # ffn_down: none sees a rescaled channel
        # post_attention_norm / post_ffw_norm normalize what attn_output / ffn_down add to the residual:
        # weights over its channels, permuted with them
        RescaleArch(
            "gemma3", (V_TO_O, UP_TO_DOWN),
            residual=replace(
                LLAMA_RESIDUAL, norms=(*LLAMA_RESIDUAL.norms, "post_attention_norm", "post_ffw_norm")
            ),
            source="src/models/gemma3.cpp",
        ),
    )
}


def rescale_arch(arch: str) -> RescaleArch:
    rec = RESCALE_ARCHS.get(arch)
    if rec is None:
        raise RampError(f"off-grid rescaling supports {', '.join(RESCALE_ARCHS)}; this model is {arch!r}")
    return rec
