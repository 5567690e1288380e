"""A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer) as a GGUF, converted by
llama.cpp's own `convert_hf_to_gguf.py` (the one vendored in the installed llama-cpp-python's sdist, run
with the `gguf-py` beside it, which it puts on its own path), never by a converter of ours. Converted
once: the GGUF is kept in the user cache under the checkpoint's hash.

The hash is the full sha256 of every file the converter reads (names, sizes and contents), remembered per
(path, size, mtime) by `store.cache.file_sha256_cached`. A hash of names, sizes and safetensors headers
alone would be free, but a checkpoint trained further and saved over the same folder keeps its names,
shapes and sizes, and would get the stale conversion; the full hash costs one read of the weights the
first time, which the conversion reads anyway, and nothing after."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ramp_cpp.errors import RampError
from ramp_cpp.llama.sdist import converter_source
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.cache import cache_dir, file_sha256_cached

#: Any one of these makes a tokenizer the converter reads (SentencePiece, HF tokenizers, Mistral's tekken,
#: GPT-2 style vocab + merges).
TOKENIZER_FILES = (("tokenizer.model",), ("tokenizer.json",), ("tekken.json",), ("vocab.json", "merges.txt"))

#: Files of the folder the conversion depends on, hashed into the cache key.
_INPUT_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja")

#: The safetensors dtype holding most weight elements -> the converter's --outtype: the checkpoint's own
#: float format, so nothing is rounded at conversion (BF16 stays BF16).
OUTTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}

#: Bytes per element of the safetensors dtypes a checkpoint's weights may have.
_ST_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds, checked before anything runs."""

    folder: Path
    architecture: str  # config.json's architectures[0] (its text_config's where it has one)
    outtype: str  # convert_hf_to_gguf.py --outtype
    weights: tuple[str, ...]  # the .safetensors files
    n_tensors: int


def _st_header(path: Path) -> dict[str, dict[str, object]]:
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 30:
                raise ValueError(f"header length {n}")
            head = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise RampError(f"{path}: not a readable safetensors file ({e})") from None
    head.pop("__metadata__", None)
    return head


def read_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint in `folder`, or one RampError line naming the missing piece (config.json, weights, a
    shard the index lists, a tokenizer). Reads only config.json and the safetensors headers."""
    d = Path(folder)
    if not d.is_dir():
        raise RampError(f"{d}: no such folder")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise RampError(f"{d}: no config.json: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise RampError(f"{cfg_path}: not readable JSON ({e})") from None
    arches = (cfg.get("text_config") or {}).get("architectures") or cfg.get("architectures") or []
    if not arches:
        raise RampError(f"{cfg_path}: no 'architectures' entry: which model class is it?")
    weights = sorted(p.name for p in d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise RampError(f"{index}: no readable weight_map ({e})") from None
        missing = [n for n in listed if not (d / n).is_file()]
        if missing:
            raise RampError(f"{d}: {missing[0]} is missing ({len(missing)} of the {len(listed)} weight files "
                            f"{index.name} lists)")
    if not weights:
        found = sorted(p.name for p in d.glob("*.bin"))
        hint = f" (found {found[0]}: only safetensors checkpoints are taken)" if found else ""
        raise RampError(f"{d}: no *.safetensors weights{hint}")
    if not any(all((d / f).is_file() for f in group) for group in TOKENIZER_FILES):
        names = ", ".join(" + ".join(g) for g in TOKENIZER_FILES)
        raise RampError(f"{d}: no tokenizer (one of {names})")
    elements: Counter[str] = Counter()
    n_tensors = 0
    for w in weights:
        for t in _st_header(d / w).values():
            n_tensors += 1
            shape = t.get("shape") or []
            n = 1
            for x in shape if isinstance(shape, list) else []:
                n *= int(x)
            elements[str(t.get("dtype"))] += n
    if not elements:
        raise RampError(f"{d}: the safetensors files hold no tensors")
    dtype = elements.most_common(1)[0][0]
    if dtype not in OUTTYPES:
        raise RampError(f"{d}: weights are {dtype}; only F32/F16/BF16 checkpoints are converted")
    return Checkpoint(d, str(arches[0]), OUTTYPES[dtype], tuple(weights), n_tensors)


def supported_architectures(source: Path) -> frozenset[str]:
    """The Hugging Face model classes the vendored converter handles: the keys of TEXT_MODEL_MAP in its
    `conversion/__init__.py`, read as a literal (no torch import)."""
    init = source / "conversion" / "__init__.py"
    for node in ast.parse(init.read_text()).body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        elif isinstance(node, ast.Assign):
            targets = node.targets
        if any(isinstance(t, ast.Name) and t.id == "TEXT_MODEL_MAP" for t in targets):
            assert isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
            return frozenset(ast.literal_eval(node.value))
    raise RampError(f"{init}: no TEXT_MODEL_MAP: a converter of another layout")


def checkpoint_key(ck: Checkpoint, converter: str) -> str:
    """sha256 over (name, size, sha256) of every input file and the converter's name and --outtype."""
    files = sorted(p for p in ck.folder.iterdir() if p.is_file() and p.suffix in _INPUT_SUFFIXES)
    rows = [(p.name, p.stat().st_size, file_sha256_cached(p)) for p in files]
    blob = json.dumps({"files": rows, "converter": converter, "outtype": ck.outtype})
    return hashlib.sha256(blob.encode()).hexdigest()


def converted_path(ck: Checkpoint, key: str) -> Path:
    name = Path(os.path.abspath(ck.folder)).name  # `.` and `..` named like the folders they are
    return cache_dir() / "converted" / key[:16] / f"{name or 'model'}.{ck.outtype}.gguf"


#: A converter log line naming one tensor it wrote (`blk.0.attn_q.weight, torch.bfloat16 --> BF16, ...`).
_TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:\S+,\s+torch\.\w+\s+-->")


def convert_checkpoint(
    folder: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
) -> Path:
    """The GGUF of the checkpoint in `folder`: converted once by llama.cpp's converter and kept in the cache,
    then found there. `progress(done, total)` counts the tensors the converter has prepared (total: the
    checkpoint's tensors; the converter may write a few more or fewer)."""
    ck = read_checkpoint(folder)
    source = converter_source()
    if ck.architecture not in supported_architectures(source):
        raise RampError(f"{ck.folder}: architecture {ck.architecture} is not one llama.cpp's "
                        f"convert_hf_to_gguf.py ({source.name}) converts")
    key = checkpoint_key(ck, source.name)
    out = converted_path(ck, key)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the vendored gguf-py, always
    with atomic_path(out, force=True) as tmp, log.open("w") as logf:
        cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(ck.folder.resolve()),
               "--outfile", str(tmp), "--outtype", ck.outtype]  # fmt: skip
        logf.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")  # fmt: skip
        assert proc.stdout is not None
        done = 0
        tail: list[str] = []
        for line in proc.stdout:
            logf.write(line)
            tail = [*tail[-19:], line.rstrip()]
            if _TENSOR_LINE.match(line):
                done += 1
                if progress:
                    progress(min(done, ck.n_tensors), ck.n_tensors)
        if proc.wait() != 0 or not tmp.is_file():
            why = next((t for t in reversed(tail) if t and not t.startswith(" ")), "no output")
            raise RampError(f"convert_hf_to_gguf.py failed on {ck.folder} ({why}); log: {log}")
    with atomic_path(out.parent / "source.json", force=True) as tmp:
        tmp.write_text(json.dumps({"folder": str(ck.folder.resolve()), "architecture": ck.architecture,
                                   "outtype": ck.outtype, "converter": source.name, "key": key}))
    return out
