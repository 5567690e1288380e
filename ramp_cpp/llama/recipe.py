"""The allocation as a recipe stock `llama-quantize` reproduces: its `--tensor-type-file` and the command.

A line of the file is `PATTERN=TYPE`; llama-quantize lowercases PATTERN and matches it against each tensor
name with `std::regex_search`, first line that matches wins. Each line here is one tensor's name anchored and
escaped (`^blk\\.1\\.attn_q\\.weight$`), the same patterns the native helper hands `llama_model_quantize`
(native/ramp_native.cpp, anchored_pattern), so "blk.1" never also matches "blk.11" and the file means
exactly the type map. With `--pure` every tensor not named keeps the file type's default; every quantizable
tensor is named, so the file type (its first positional argument) only labels the output, as in
`quantize.file_type_for`.

The types listed are the ones the written file holds (after llama.cpp's row-length fallback), so the recipe
describes the file, not the request that made it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from ramp_cpp.llama.ggufio import read_inventory, tensor_types
from ramp_cpp.llama.quantize import ftype_label
from ramp_cpp.store.atomic import atomic_path

_SPECIAL = set("\\^$.|?*+()[]{}")


def anchored(name: str) -> str:
    """`name` as a pattern that std::regex_search matches on that name alone."""
    return "^" + "".join("\\" + c if c in _SPECIAL else c for c in name) + "$"


def tensor_type_lines(types: Mapping[str, GGMLQuantizationType]) -> list[str]:
    """One `PATTERN=type` line per tensor, in the map's order; type names as ggml spells them (lowercase is
    what llama-quantize's own help shows; it compares case-insensitively)."""
    return [f"{anchored(n)}={t.name.lower()}" for n, t in types.items()]


@dataclass(frozen=True)
class Recipe:
    types_file: Path  # the --tensor-type-file
    command: tuple[str, ...]  # llama-quantize's argv, program name first
    ftype: str  # the positional file type (a label: every quantizable tensor is named)

    def shell(self) -> str:
        return shlex.join(self.command)


def written_types(
    gguf: str | os.PathLike[str], source: str | os.PathLike[str]
) -> dict[str, GGMLQuantizationType]:
    """name -> type in `gguf` of every weight the source's inventory lists (what a type map can name)."""
    weights = {t.name for t in read_inventory(source).tensors}
    return {n: GGMLQuantizationType[t] for n, (t, _, _) in tensor_types(gguf).items() if n in weights}


def write_recipe(
    dst: str | os.PathLike[str],
    types: Mapping[str, GGMLQuantizationType],
    source: str | os.PathLike[str],
    imatrix: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    program: str = "llama-quantize",
) -> Recipe:
    """Write `dst` (the --tensor-type-file) atomically and return the command that makes `output` from
    `source` with it: `llama-quantize --pure [--imatrix IM] --tensor-type-file DST SOURCE OUTPUT FTYPE`."""
    with atomic_path(dst, force=True) as tmp:
        tmp.write_text("\n".join(tensor_type_lines(types)) + "\n")
    ftype = ftype_label(types)
    cmd = [program, "--pure"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += ["--tensor-type-file", str(dst), str(source), str(output), ftype]
    return Recipe(Path(dst), tuple(cmd), ftype)
