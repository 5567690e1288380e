"""Architecture knowledge as tables of records.

llama.cpp names every architecture's tensors the same way (`blk.N.attn_q.weight`, `token_embd.weight`, ...),
so the role of a tensor follows from its name; one table serves llama, qwen2, gemma3 and the other
`blk.N.*` architectures. Nothing here branches on the architecture name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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
