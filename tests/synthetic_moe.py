"""A tiny mixture-of-experts GGUF for the tests of the expert statistics and of folding with a router: random
weights, synthetic.py's vocabulary, llama.cpp's Mixtral-style `llama` MoE (llama.expert_count /
llama.expert_used_count, blk.N.ffn_gate_inp.weight and 3-D blk.N.ffn_{gate,up,down}_exps.weight) or
`qwen2moe`, which adds a shared expert (ffn_{gate,up,down}_shexp) and its gate vector ffn_gate_inp_shexp.
The upcycled benchmark models are another matter (fold/offgrid.py); these only need llama.cpp to load them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import synthetic
from gguf import GGUFWriter


@dataclass(frozen=True)
class MoeSpec:
    arch: str = "llama"  # or "qwen2moe" (shared expert, q/k/v biases)
    n_layer: int = 2
    n_embd: int = 256
    n_ff: int = 256  # each expert's width
    n_ff_shexp: int = 256  # qwen2moe's shared expert
    n_expert: int = 4
    n_expert_used: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 256
    seed: int = 0


def write_moe(path: Path, spec: MoeSpec = MoeSpec()) -> Path:
    rng = np.random.default_rng(spec.seed)
    toks, scores, types = synthetic.vocab()
    hd = spec.n_embd // spec.n_head
    a = spec.arch
    w = GGUFWriter(str(path), a)
    w.add_name(f"synthetic-{a}-{spec.n_expert}x{spec.n_ff}")
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(spec.n_expert)
    w.add_expert_used_count(spec.n_expert_used)
    if a == "qwen2moe":
        w.add_expert_feed_forward_length(spec.n_ff)
        w.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
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
        n_in = shape[-1]
        m = rng.standard_normal(shape).astype(np.float32) * (scale / np.sqrt(n_in))
        m[..., rng.choice(n_in, size=max(1, n_in // 64), replace=False)] *= 4.0  # outlier input channels
        return m.astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    e, f, d = spec.n_expert, spec.n_ff, spec.n_embd
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(toks), d)) * 0.5).astype(np.float16))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(d))
        for role, n_out in (("attn_q", d), ("attn_k", spec.n_head_kv * hd), ("attn_v", spec.n_head_kv * hd)):
            w.add_tensor(p + role + ".weight", mat(n_out, d))
            if a == "qwen2moe":
                w.add_tensor(p + role + ".bias", (0.1 * rng.standard_normal(n_out)).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", mat(d, d, scale=0.5))
        g = norm(d)
        g[rng.choice(d, size=4, replace=False)] *= 6.0  # outliers in the experts' input: folding has work
        w.add_tensor(p + "ffn_norm.weight", g)
        # a router of large logits, so that top-k routing differs clearly from token to token
        router = rng.standard_normal((e, d)) * 2.0 / np.sqrt(d)
        w.add_tensor(p + "ffn_gate_inp.weight", router.astype(np.float32))
        w.add_tensor(p + "ffn_gate_exps.weight", mat(e, f, d))
        w.add_tensor(p + "ffn_up_exps.weight", mat(e, f, d))
        w.add_tensor(p + "ffn_down_exps.weight", mat(e, d, f, scale=0.5))
        if a == "qwen2moe":
            gate = rng.standard_normal(d) / np.sqrt(d)
            w.add_tensor(p + "ffn_gate_inp_shexp.weight", gate.astype(np.float32))
            w.add_tensor(p + "ffn_gate_shexp.weight", mat(spec.n_ff_shexp, d))
            w.add_tensor(p + "ffn_up_shexp.weight", mat(spec.n_ff_shexp, d))
            w.add_tensor(p + "ffn_down_shexp.weight", mat(d, spec.n_ff_shexp, scale=0.5))
    w.add_tensor("output_norm.weight", norm(d))
    w.add_tensor("output.weight", mat(len(toks), d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
