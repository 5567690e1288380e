"""Model-shaped F16 GGUFs with random weights, for measuring what a run costs at scale where no real 7B can be
downloaded: `7b` is llama-2-7b's shape (32 blocks, 4096 / 11008, 32 heads, 32k vocabulary, 13.5 GB), `1b`
TinyLlama-1.1B's (22 blocks, 2048 / 5632, 32 heads / 4 KV heads, 2.2 GB) for quick checks, `olmoe7b`
OLMoE-1B-7B's mixture of experts (16 blocks, 2048 wide, 64 experts of 1024, top-8, 50k vocabulary, 6.9B
parameters, 13.8 GB) written as llama.cpp's `llama` architecture with Mixtral-style expert tensors
(`ffn_{gate,up,down}_exps`, router `ffn_gate_inp`): OLMoE's own q/k norms are tiny tensors that change no
cost, and the `llama` loader is the one every other shape uses. The files load and
run in llama.cpp (a SentencePiece-style vocabulary padded to the shape's size), so every stage's time, peak
memory and disk are real; their quality figures mean nothing and are never reported.

Weights are N(0, 1/n_in) per row, with 1/64 of the input channels scaled 4x (the activation outliers that
Scale Folding moves); norms are 1 + N(0, 0.1). The file is streamed tensor by tensor (peak memory: one
tensor) and written under a temporary name, then renamed.

    .venv/bin/python -m bench.shapes 7b                  # ~/.cache/ramp-cpp/models/shape-7b.f16.gguf
    .venv/bin/python -m bench.shapes 1b -o /tmp/x.gguf
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, Keys, TokenType

from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import cache_dir


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 32000
    n_ctx: int = 4096
    n_expert: int = 0  # 0: a dense FFN of n_ff; else n_expert experts of n_ff each, n_expert_used per token
    n_expert_used: int = 0


SHAPES = {
    s.name: s
    for s in (
        Shape("7b", n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),  # llama-2-7b config.json
        Shape("1b", n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_ctx=2048),  # TinyLlama-1.1B
        Shape("olmoe7b", n_layer=16, n_embd=2048, n_ff=1024, n_head=16, n_head_kv=16, n_vocab=50304,
              n_expert=64, n_expert_used=8),  # allenai/OLMoE-1B-7B-0924 config.json
    )
}


def vocabulary(n: int) -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, 256 byte tokens, the printable characters, then filler words up to `n` tokens."""
    toks = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *[TokenType.BYTE] * 256]
    chars = ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]
    toks += chars
    types += [TokenType.NORMAL] * len(chars)
    n_fixed = len(toks)
    toks += [f"\u2581w{i}" for i in range(n - n_fixed)]
    types += [TokenType.NORMAL] * (n - n_fixed)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-100.0] * len(chars) + [-1.0] * (n - n_fixed)
    return toks, scores, [int(t) for t in types]


def tensors(s: Shape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape ([experts,] rows, cols), kind) in llama.cpp's order; kind: `norm`, `router` (F32,
    as llama.cpp keeps it) or `linear`."""
    hd = s.n_embd // s.n_head
    kv = s.n_head_kv * hd
    yield "token_embd.weight", (s.n_vocab, s.n_embd), "linear"
    for i in range(s.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (s.n_embd,), "norm"
        yield p + "attn_q.weight", (s.n_embd, s.n_embd), "linear"
        yield p + "attn_k.weight", (kv, s.n_embd), "linear"
        yield p + "attn_v.weight", (kv, s.n_embd), "linear"
        yield p + "attn_output.weight", (s.n_embd, s.n_embd), "linear"
        yield p + "ffn_norm.weight", (s.n_embd,), "norm"
        if s.n_expert:
            yield p + "ffn_gate_inp.weight", (s.n_expert, s.n_embd), "router"
            yield p + "ffn_gate_exps.weight", (s.n_expert, s.n_ff, s.n_embd), "linear"
            yield p + "ffn_up_exps.weight", (s.n_expert, s.n_ff, s.n_embd), "linear"
            yield p + "ffn_down_exps.weight", (s.n_expert, s.n_embd, s.n_ff), "linear"
            continue
        yield p + "ffn_gate.weight", (s.n_ff, s.n_embd), "linear"
        yield p + "ffn_up.weight", (s.n_ff, s.n_embd), "linear"
        yield p + "ffn_down.weight", (s.n_embd, s.n_ff), "linear"
    yield "output_norm.weight", (s.n_embd,), "norm"
    yield "output.weight", (s.n_vocab, s.n_embd), "linear"


def weights(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
    cols = shape[-1]
    m = rng.standard_normal(shape, dtype=np.float32)
    m *= np.float32(1.0 / np.sqrt(cols))
    m[..., rng.choice(cols, size=max(1, cols // 64), replace=False)] *= np.float32(4.0)
    return m if kind == "router" else m.astype(np.float16)


def header(s: Shape) -> dict[str, object]:
    """The model's metadata as llama.cpp's llama loader reads it (llama-2's hyperparameters)."""
    a = "llama"
    return {
        Keys.General.NAME: f"random-{s.name}-shaped",
        Keys.LLM.BLOCK_COUNT.format(arch=a): s.n_layer,
        Keys.LLM.CONTEXT_LENGTH.format(arch=a): s.n_ctx,
        Keys.LLM.EMBEDDING_LENGTH.format(arch=a): s.n_embd,
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): s.n_ff,
        Keys.Attention.HEAD_COUNT.format(arch=a): s.n_head,
        Keys.Attention.HEAD_COUNT_KV.format(arch=a): s.n_head_kv,
        Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a): 1e-5,
        Keys.Rope.DIMENSION_COUNT.format(arch=a): s.n_embd // s.n_head,
        Keys.Rope.FREQ_BASE.format(arch=a): 10000.0,
        **({Keys.LLM.EXPERT_COUNT.format(arch=a): s.n_expert,
            Keys.LLM.EXPERT_USED_COUNT.format(arch=a): s.n_expert_used} if s.n_expert else {}),
        Keys.General.FILE_TYPE: 1,  # MOSTLY_F16
        Keys.Tokenizer.MODEL: "llama",
        Keys.Tokenizer.BOS_ID: 1,
        Keys.Tokenizer.EOS_ID: 2,
        Keys.Tokenizer.UNK_ID: 0,
        Keys.Tokenizer.ADD_BOS: True,
        Keys.Tokenizer.ADD_EOS: False,
    }


def _vtype(value: object) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def write(s: Shape, out: Path, seed: int = 0, force: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    toks, scores, types = vocabulary(s.n_vocab)
    with atomic_path(out, force) as tmp:
        w = GGUFWriter(str(tmp), "llama")
        for key, value in header(s).items():
            w.add_key_value(key, value, _vtype(value))
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(types)
        plan = list(tensors(s))
        for name, shape, kind in plan:
            dtype = np.float16 if kind == "linear" else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, shape, kind in plan:
            w.write_tensor_data(weights(shape, kind, rng))
        w.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("-o", "--output", type=Path, help="default: <cache>/models/shape-SHAPE.f16.gguf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    s = SHAPES[a.shape]
    out = a.output or cache_dir() / "models" / f"shape-{s.name}.f16.gguf"
    if out.is_file() and not a.force:
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write(s, out, a.seed, a.force)
    gib = out.stat().st_size / 2**30
    print(f"wrote {out}: {gib:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
