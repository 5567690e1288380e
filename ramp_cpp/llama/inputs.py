"""What a command's model argument may name, turned into the GGUF every stage reads: a GGUF file, the
first shard of a split GGUF set (read as one model, shards.py), or a Hugging Face checkpoint folder
(converted once by llama.cpp's converter, convert.py). Checked here, before any work."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ramp_cpp.errors import RampError
from ramp_cpp.llama.convert import convert_checkpoint


def resolve_model(
    path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
) -> Path:
    """The GGUF to read for the model argument `path`: a folder's conversion (from the cache once made;
    `progress(done, total)` counts its tensors), else the file itself, a split set's shards checked to be
    all there and of one model. One RampError line otherwise."""
    from ramp_cpp.llama.ggufio import open_reader

    p = Path(path)
    if p.is_dir():
        return convert_checkpoint(p, progress)
    if not p.exists():
        raise RampError(f"{p}: no such file or folder")
    open_reader(p, tokenizer=False)  # a split set is joined here: a missing or foreign shard is one line now
    return p
