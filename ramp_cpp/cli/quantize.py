"""`quantize`: llama.cpp's quantizer with an exact per-tensor type map or one of its presets; the written file
is read back and checked against the prediction.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from ramp_cpp.cli.common import ForceOpt, JsonOpt, SplitOpt, ThreadsOpt, emit, err, out, parse_split
from ramp_cpp.cli.modelarg import resolved_model
from ramp_cpp.errors import RampError


def _load_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RampError(f"{path}: no such file") from None
    except ValueError as e:
        raise RampError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tensors" in data and isinstance(data["tensors"], dict):
        data = {k: (v["type"] if isinstance(v, dict) else v) for k, v in data["tensors"].items()}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RampError(f"{path}: a type map is a JSON object of tensor name -> ggml type name")
    return data


def quantize(
    model: Annotated[
        Path,
        typer.Argument(help="F16/BF16/F32 GGUF, a split GGUF's first shard or a HF checkpoint folder."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output GGUF.")],
    types: Annotated[Path | None, typer.Option("--types", help="JSON map: tensor name -> ggml type.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="llama.cpp file type, e.g. Q4_K_M.")] = None,
    base: Annotated[str, typer.Option("--base", help="Type of quantizable tensors not in --types.")] = "Q8_0",
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="llama.cpp importance matrix (GGUF).")
    ] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Accept a quantized input.")
    ] = False,
    force: ForceOpt = False,
    split: SplitOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantize through llama.cpp with an exact per-tensor type map or one of its presets."""
    from ramp_cpp.llama.ggufio import read_imatrix
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map, quantize_preset
    from ramp_cpp.llama.splitout import check_split_output, write_split
    from ramp_cpp.model.ladder import type_from_name

    if (types is None) == (preset is None):
        raise RampError("give exactly one of --types MAP.json or --preset NAME")
    split_max = parse_split(split)
    if split_max is not None:
        check_split_output(output, force)
    model = resolved_model(model)
    im = read_imatrix(imatrix) if imatrix else None
    opts = QuantizeOptions(im, threads, force or split_max is not None, allow_requantize)

    def write(dst: Path) -> Any:
        if types is not None:
            return quantize_map(model, dst, _load_map(types), type_from_name(base), opts)
        assert preset is not None
        return quantize_preset(model, dst, preset, opts)

    with err.status("quantizing"):
        if split_max is None:
            r, shards = write(output), None
        else:
            r, shards = write_split(write, output, split_max, force)
    path = str(output) if shards is None else str(shards.first)
    if as_json:
        emit(asdict(r) | {"path": path, **({"split": shards.to_json()} if shards else {})})
        return
    counts: dict[str, int] = {}
    for x in r.tensors:
        counts[x.ggml_type] = counts.get(x.ggml_type, 0) + 1
    out.print(
        f"wrote {path}: {r.file_size / 2**20:.2f} MiB, {r.bpw_searched:.3f} bpw over searched tensors, "
        f"{r.bpw_file:.3f} bpw over the file; types "
        + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
        + (f"; {r.n_fallback} row-length fallbacks" if r.n_fallback else "")
        + (f"; {shards.describe()}" if shards else "")
    )
