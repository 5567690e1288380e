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

    `order` is its place in the visiting order within a block (paper Alg. 1: q, k, v, o, gate, up, down);
    `type_scalar` is dim 6 of the layer embedding (paper Table 24).
    """

    name: str
    order: int
    type_scalar: float
    searched: bool  # visited by the RAMP policy (the paper's "quantizable linear layers")


ROLES: tuple[Role, ...] = (
    Role("attn_q", 0, 0.0, True),
    Role("attn_k", 1, 0.0, True),
    Role("attn_v", 2, 0.0, True),
    Role("attn_qkv", 2, 0.0, True),  # fused QKV (phi3, ...): one tensor in place of q, k, v
    Role("attn_output", 3, 0.25, True),
    Role("ffn_gate", 4, 0.5, True),
    Role("ffn_up", 5, 0.6, True),
    Role("ffn_down", 6, 0.75, True),
    Role("token_embd", -1, 1.0, False),
    Role("output", 99, 1.0, False),
)
ROLE_BY_NAME: dict[str, Role] = {r.name: r for r in ROLES}
OTHER = Role("other", 50, 1.0, False)

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.weight$")
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


#: Substrings of tensor names llama.cpp never quantizes (`tensor_allows_quantization` in llama-quant.cpp):
#: a type map naming one of these is refused instead of silently ignored.
NEVER_QUANTIZED: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "position_embd.weight",
    "token_types.weight",
)


def quantizable(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and not any(s in name for s in NEVER_QUANTIZED)


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
