"""A Hugging Face checkpoint folder in: converted by llama.cpp's own convert_hf_to_gguf.py (vendored in the
llama-cpp-python sdist) once and cached; the GGUF keeps the checkpoint's float type, loads in llama.cpp and
gives transformers' logits; a folder missing a piece or holding an architecture the converter lacks is
refused in one line before any work; the commands take the folder where they take a model."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import hfcheckpoint
import numpy as np
import pytest
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.convert import (
    convert_checkpoint,
    converted_path,
    read_checkpoint,
    supported_architectures,
)
from ramp_cpp.llama.ggufio import tensor_types
from ramp_cpp.llama.inputs import resolve_model

runner = CliRunner()


def _folder(
    d: Path, dtype: str = "bfloat16", config: bool = True, weights: str | None = "model.safetensors",
    tokenizer: tuple[str, ...] = ("tokenizer.json",), arch: str = "LlamaForCausalLM",
) -> Path:  # fmt: skip
    """A checkpoint-shaped folder by hand (for the checks that read only config and headers)."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    if config:
        (d / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama"}))
    if weights:
        t = {"model.embed_tokens.weight": torch.zeros(8, 4, dtype=getattr(torch, dtype)),
             "model.norm.weight": torch.ones(4, dtype=torch.float32)}  # fmt: skip
        save_file(t, str(d / weights))
    for name in tokenizer:
        (d / name).write_text("{}")
    return d


@pytest.mark.parametrize(
    ("kw", "expect"),
    [
        ({"config": False}, "no config.json"),
        ({"weights": None}, "no \\*.safetensors weights"),
        ({"weights": "pytorch_model.bin"}, "found pytorch_model.bin: only safetensors"),
        ({"tokenizer": ()}, "no tokenizer"),
        ({"tokenizer": ("vocab.json",)}, "no tokenizer"),  # GPT-2 style needs merges.txt too
        ({"dtype": "int8"}, "weights are I8"),
    ],
)
def test_a_folder_missing_a_piece_fails_in_one_line(tmp_path: Path, kw: dict, expect: str) -> None:
    d = _folder(tmp_path / "ck", **kw)
    with pytest.raises(RampError, match=expect) as e:
        resolve_model(d)
    assert "\n" not in str(e.value)


def test_a_weight_file_the_index_lists_must_be_there(tmp_path: Path) -> None:
    d = _folder(tmp_path / "ck", weights="model-00001-of-00002.safetensors")
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(RampError, match="model-00002-of-00002.safetensors is missing"):
        read_checkpoint(d)


@pytest.mark.parametrize(("dtype", "outtype"), [("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32")])
def test_the_checkpoints_float_type_is_kept(tmp_path: Path, dtype: str, outtype: str) -> None:
    # the 8x4 embedding outweighs the F32 norm of 4: the dtype of most weight elements decides
    assert read_checkpoint(_folder(tmp_path / "ck", dtype=dtype)).outtype == outtype


@pytest.mark.parametrize(("given", "cwd"), [("ck", "."), (".", "ck"), ("..", "ck/sub")])
def test_the_conversion_is_named_after_the_folder_however_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str, cwd: str
) -> None:
    """`.` was named `model.bf16.gguf` (`apply` then wrote `model.ramp-SIZE.gguf`), `..` `...bf16.gguf`."""
    (_folder(tmp_path / "ck") / "sub").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    assert converted_path(read_checkpoint(given), "0" * 64).name == "ck.bf16.gguf"


def test_a_missing_path_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(RampError, match="no such file or folder"):
        resolve_model(tmp_path / "nothing")


@pytest.fixture(scope="module")
def pip_cache() -> Iterator[None]:
    """The user's pip cache for `pip download` of the sdist (the session's HOME is an empty temp folder,
    which would fetch 76 MB again); read, and written only by pip."""
    real = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "pip"
    with pytest.MonkeyPatch.context() as mp:
        if "PIP_CACHE_DIR" not in os.environ and real.is_dir():
            mp.setenv("PIP_CACHE_DIR", str(real))
        yield


@pytest.mark.slow
def test_an_architecture_the_converter_lacks_fails_before_converting(tmp_path: Path, pip_cache: None) -> None:
    d = _folder(tmp_path / "ck", arch="NotARealModelForCausalLM")
    with pytest.raises(RampError, match="NotARealModelForCausalLM is not one llama.cpp's convert_hf_to_gguf"):
        convert_checkpoint(d)
    assert not (Path(os.environ["RAMP_CACHE_DIR"]) / "converted").exists()
    from ramp_cpp.llama.sdist import converter_source

    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= supported_architectures(converter_source())


#: (architecture, checkpoint dtype, GGUF type of its matrices, max |logit difference| / max |logit|).
#: llama.cpp rounds activations to the weights' type in its matrix products (BF16: 8 mantissa bits), and
#: transformers here runs in F32 on the same (rounded) weights.
CASES = [
    ("llama", "bfloat16", "BF16", 0.03),
    ("qwen2", "bfloat16", "BF16", 0.03),
    ("llama", "float32", "F32", 0.005),
    ("qwen2", "float16", "F16", 0.01),
]


def both_logits(folder: Path, gguf: Path) -> tuple[np.ndarray, np.ndarray]:
    """transformers' float32 logits of the checkpoint and llama.cpp's of its conversion, on the same tokens
    (copied inside the context: its logits view is freed on close)."""
    import torch
    import transformers

    from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions

    toks = np.array([1, 5, 17, 33, 60, 7, 90, 42, 11, 3], dtype=np.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor(toks[None].astype(np.int64))).logits[0].numpy()
    with LlamaModel(gguf, RuntimeOptions(n_ctx=64, n_threads=1)) as m:
        got = np.array(m.logits(toks, 0, len(toks)))
    return ref, got


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype", "gguf_type", "tol"), CASES)
def test_converted_model_gives_transformers_logits(
    tmp_path: Path, pip_cache: None, arch: str, dtype: str, gguf_type: str, tol: float
) -> None:


    d = hfcheckpoint.write(tmp_path / f"tiny-{arch}", arch, dtype)
    seen: list[tuple[int, int]] = []
    gguf = convert_checkpoint(d, lambda a, b: seen.append((a, b)))
    assert seen and seen[-1][0] == seen[-1][1]
    types = tensor_types(gguf)
    assert types["blk.0.attn_q.weight"][0] == gguf_type and types["blk.1.ffn_down.weight"][0] == gguf_type
    ref, got = both_logits(d, gguf)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    # a second call finds the cached file: nothing converted again
    before = gguf.stat().st_mtime_ns
    assert convert_checkpoint(d) == gguf and gguf.stat().st_mtime_ns == before


@pytest.mark.slow
def test_commands_take_the_folder(tmp_path: Path, pip_cache: None, text_file: Path) -> None:
    d = hfcheckpoint.write(tmp_path / "tiny-llama", "llama", "bfloat16")
    r = runner.invoke(app, ["inspect", str(d), "--json"])
    assert r.exit_code == 0, r.output
    inv = json.loads(r.stdout)
    assert inv["arch"] == "llama" and inv["n_blocks"] == 2
    out = tmp_path / "q8.gguf"
    r = runner.invoke(app, ["quantize", str(d), "-o", str(out), "--preset", "Q8_0"])
    assert r.exit_code == 0, r.output
    assert tensor_types(out)["blk.0.attn_q.weight"][0] == "Q8_0"
    # every command resolves the folder the same way (test_model_inputs.py): eval scores its conversion
    ev = ["--text", str(text_file), "--ctx", "64", "--chunks", "2", "--threads", "1", "--json"]
    scores = [runner.invoke(app, ["eval", str(m), *ev]) for m in (d, resolve_model(d))]
    assert all(r.exit_code == 0 for r in scores), scores[0].output
    ppl = [json.loads(r.stdout)["ppl"] for r in scores]
    assert ppl[0]["ppl"] == ppl[1]["ppl"] and ppl[0]["n_tokens"] == ppl[1]["n_tokens"] > 0
    # a changed checkpoint is a new key: converted again, not the stale file
    first = resolve_model(d)
    hfcheckpoint.write(d, "llama", "bfloat16", seed=1)
    assert resolve_model(d) != first


@pytest.mark.slow
def test_greedy_search_from_the_folder(tmp_path: Path, pip_cache: None, text_file: Path) -> None:
    from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.measure.candidates import CandidateConfig, parse_types
    from ramp_cpp.pipeline.plan import size_range

    d = hfcheckpoint.write(tmp_path / "tiny-llama", "llama", "bfloat16")
    types = "Q4_0,Q5_0,Q8_0"  # rows of 64: K-quants would all fall back
    lo, hi = size_range(read_inventory(resolve_model(d)), CandidateConfig(types=parse_types(types)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    out = tmp_path / "run"
    r = runner.invoke(app, ["search", "--model", str(d), "--out", str(out), "--method", "greedy", "--size",
                            str((lo + hi) // 2), "--types", types, "--text", str(text_file), "--chunks", "2",
                            "--ctx", "64", "--recipe", str(recipe), "--threads", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (gguf,) = out.glob("tiny-llama.ramp-*.gguf")
    assert gguf.stat().st_size <= (lo + hi) // 2
    assert {t for t, _, _ in tensor_types(gguf).values()} & {"Q4_0", "Q5_0", "Q8_0"}
    LlamaModel(gguf, RuntimeOptions(n_ctx=64, n_threads=1)).close()


#: An MoE checkpoint (transformers' Mixtral: 4 routed experts, 2 per token), converted to llama.cpp's llama
#: architecture with 3-D expert tensors, the kind the MoE support searches (one type per expert tensor).
#: Qwen2MoeForCausalLM would need a Hugging Face BPE tokenizer the converter recognises by its hash (its
#: set_vocab reads no tokenizer.model); Mixtral's is the llama converter's, which takes the SentencePiece one.
MOE_CASES = [("bfloat16", "BF16", 0.03), ("float32", "F32", 0.005)]


@pytest.mark.slow  # a conversion (~30 s on 2 cores) per dtype
@pytest.mark.parametrize(("dtype", "gguf_type", "tol"), MOE_CASES)
def test_an_moe_checkpoint_converts_with_searched_experts(
    tmp_path: Path, pip_cache: None, dtype: str, gguf_type: str, tol: float
) -> None:


    d = hfcheckpoint.write(tmp_path / "tiny-mixtral", "mixtral", dtype)
    gguf = convert_checkpoint(d)
    types = tensor_types(gguf)
    for b in (0, 1):
        for role in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            t, _, n = types[f"blk.{b}.{role}.weight"]
            assert t == gguf_type and n == 4 * 64 * 128  # 4 experts of 128 x 64 in one tensor
    ref, got = both_logits(d, gguf)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    r = runner.invoke(app, ["inspect", str(d), "--json"])
    assert r.exit_code == 0, r.output
    inv = json.loads(r.stdout)
    assert (inv["arch"], inv["n_expert"], inv["n_expert_used"]) == ("llama", 4, 2)
    rows = {t["name"]: t for t in inv["tensors"]}
    experts = {n for n, t in rows.items() if t["role"].endswith("_exps")}
    assert len(experts) == 6 and all(rows[n]["searched"] and rows[n]["n_expert"] == 4 for n in experts)
    assert not rows["blk.0.ffn_gate_inp.weight"]["searched"]  # the router: llama.cpp never quantizes it
