"""The model argument of `search`, `apply`, `quantize` and `inspect`: a GGUF, a split set's first shard or a
Hugging Face checkpoint folder, resolved by `llama.inputs.resolve_model` (a folder's conversion shown as a
progress bar the first time; later runs find it in the cache)."""

from __future__ import annotations

from pathlib import Path

from ramp_cpp.cli.common import bar, chunk_progress


def resolved_model(model: Path) -> Path:
    from ramp_cpp.llama.inputs import resolve_model

    if not model.is_dir():
        return resolve_model(model)
    with bar("converting") as p:
        return resolve_model(model, chunk_progress(p, f"convert_hf_to_gguf.py {model.name}"))
