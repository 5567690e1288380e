"""Tiny random Hugging Face checkpoints written by `transformers` itself, for the conversion tests: a
SentencePiece tokenizer trained on a few sentences (the converter reads tokenizer.model without any
pre-tokenizer fingerprint), a config of hidden size 64 and 2 layers, weights saved in the asked dtype. The
MoE ones (qwen2moe: routed experts and a gated shared expert; mixtral: routed experts) have 4 experts, 2
used per token."""

from __future__ import annotations

import io
from pathlib import Path

from tests.synthetic import text

#: architecture -> (config class, model class) in transformers.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}

#: Config keys of the MoE architectures beside the dense ones.
MOE = {
    "qwen2moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                 "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}  # fmt: skip


#: 3 specials, 256 byte pieces (llama.cpp's SentencePiece tokenizer maps characters the vocabulary lacks, a
#: newline among them, to byte pieces, and aborts when there are none), the rest merges.
VOCAB = 320


def tokenizer_model(vocab_size: int = VOCAB) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text(3000).splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


def write(folder: Path, arch: str = "llama", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A checkpoint folder: config.json, model.safetensors, tokenizer.model (+ tokenizer_config.json)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tokenizer_model())
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true, "add_eos_token": false}')
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    cfg = cfg_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, **MOE.get(arch, {}),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # random init is tiny (std 0.02): wider weights make the logits differ per token
        for p in model.parameters():
            if p.dim() >= 2:  # 3-D: transformers' fused experts
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder
