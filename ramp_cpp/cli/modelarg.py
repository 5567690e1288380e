"""The model argument of every command that takes one (`search`, `paper-search`, `apply`, `quantize`,
`inspect`, `eval` and its `--base`, `calibrate`, `measure`, `fold`, `offgrid`, `pad`, `upcycle`, `features`):
a GGUF, a split set's first shard or a Hugging Face checkpoint folder, resolved by
`llama.inputs.resolve_model` (a folder's conversion shown as a progress bar the first time; later runs find
it in the cache). tests/test_model_inputs.py holds every such command to it."""

from __future__ import annotations

from pathlib import Path

from ramp_cpp.cli.common import bar, chunk_progress

MODEL_HELP = "an F16/BF16/F32 GGUF, a split GGUF's first shard or a Hugging Face checkpoint folder"


def resolved_model(model: Path) -> Path:
    from ramp_cpp.llama.inputs import resolve_model

    if not model.is_dir():
        return resolve_model(model)
    with bar("converting") as p:
        return resolve_model(model, chunk_progress(p, f"convert_hf_to_gguf.py {model.name}"))
