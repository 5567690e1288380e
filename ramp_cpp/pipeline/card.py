"""The model card a run writes beside its GGUF: `README.md` in the Hugging Face model-card format (a YAML
header with `base_model`, `quantized_by` and the tags `gguf`, `llama.cpp`), made from what the run already
wrote (report.json, allocation.json) and its recipe, so it can be made again from a finished run folder.

It says what the file is (size against the target, types per role), how good it is as measured — on the
reward text by the run (labelled so: it is the search's own text, not held-out), and on held-out text only
where `ramp-cpp eval` results are passed in — and how to make it again (the command and the llama-quantize
recipe).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ramp_cpp.calibration.artifact import Calibration, write_imatrix
from ramp_cpp.llama.recipe import Recipe, write_recipe, written_types
from ramp_cpp.llama.splitout import SplitOutput
from ramp_cpp.model.arch import classify
from ramp_cpp.store.atomic import atomic_path

MIB = 1 << 20


def _yaml_list(key: str, items: Sequence[str]) -> list[str]:
    return [f"{key}:", *(f"- {x}" for x in items)]


def roles_mix(rows: Sequence[Mapping[str, Any]]) -> dict[str, Counter[str]]:
    """role -> Counter of types over allocation.json's tensor rows."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        out[classify(r["name"])[0].name][r["type"]] += 1
    return dict(out)


def card_text(
    report: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    gguf_name: str,
    recipe: Recipe | None = None,
    command: str | None = None,
    held_out: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The card as markdown. `report`: report.json; `rows`: allocation.json's "tensors"; `held_out`: rows of
    {"label", "file_bytes", "kld", "ppl", "text"} measured on held-out text, if any."""
    s = report["summary"]
    q = s.get("quality", {})
    head = [
        "---",
        f"base_model: {s['model']}",
        "quantized_by: ramp-cpp",
        *_yaml_list("tags", ["gguf", "llama.cpp", "ramp-cpp", "mixed-precision"]),
        "---",
        "",
        f"# {gguf_name}",
        "",
        f"A per-tensor mixed-precision GGUF of `{s['model']}` made by ramp-cpp (method `{s['method']}`) "
        f"at the whole-file size of `{s['size']}`: {s['file_bytes'] / MIB:.2f} MiB "
        f"(target {s['target_bytes'] / MIB:.2f} MiB), {s['bpw_file']:.3f} bits per weight. "
        "It runs in stock llama.cpp and ollama.",
        *_gpu_lines(s.get("gpu")),
        *_split_lines(s.get("split")),
        "",
        "## Types per role",
        "",
        "| role | tensors | types |",
        "|---|---|---|",
    ]
    for role, mix in sorted(roles_mix(rows).items()):
        kinds = ", ".join(f"{t} ×{n}" for t, n in mix.most_common())
        head.append(f"| {role} | {sum(mix.values())} | {kinds} |")
    body = ["", "## Quality", ""]
    pts = [p for p in report.get("points", []) if p.get("quality") is not None]
    if pts:
        body += [
            f"KLD to the unquantized model on the search's reward text ({q.get('text', '?')}, "
            f"{q.get('chunks', '?')} chunks; not held-out):",
            "",
            "| file | MiB | KLD | PPL |",
            "|---|---|---|---|",
            *(
                f"| {p['label']} | {p['file_bytes'] / MIB:.2f} | {p['quality']:.4f} | "
                f"{p['ppl']:.3f} |" if p.get("ppl") is not None else
                f"| {p['label']} | {p['file_bytes'] / MIB:.2f} | {p['quality']:.4f} | |"
                for p in sorted(pts, key=lambda p: p["file_bytes"])
            ),
        ]
    if held_out:
        body += [
            "",
            f"Held-out ({held_out[0].get('text', '?')}):",
            "",
            "| file | MiB | KLD | PPL |",
            "|---|---|---|---|",
            *(
                f"| {h['label']} | {h['file_bytes'] / MIB:.2f} | {h['kld']:.4f} | {h['ppl']:.3f} |"
                for h in held_out
            ),
        ]
    else:
        body += ["", "Not evaluated on held-out text: `ramp-cpp eval FILE --kld --base MODEL` does that."]
    how = ["", "## How it was made", ""]
    if command:
        how += ["```bash", command, "```", ""]
    else:
        how += ["Every setting of the run is in its `run.json`; `report.json` has each stage's costs.", ""]
    if recipe is not None:
        how += [
            f"The same tensors with stock `llama-quantize` (the type map: `{recipe.types_file.name}`):",
            "",
            "```bash",
            recipe.shell(),
            *_gguf_split_command(s.get("split"), recipe),
            "```",
        ]
    return "\n".join(head + body + how) + "\n"


def _split_lines(split: Mapping[str, Any] | None) -> list[str]:
    if not split:
        return []
    names = split["shards"]
    return [
        "",
        f"The file is split in {len(names)} shards of at most {split['max_bytes']} bytes each "
        f"(llama.cpp's gguf-split convention, `{names[0]}` to `{names[-1]}`): give llama.cpp the first, "
        "it finds the others beside it.",
    ]


def _gguf_split_command(split: Mapping[str, Any] | None, recipe: Recipe) -> list[str]:
    """llama.cpp's own tool splitting the recipe's output: its --split-max-size takes whole MB (10^6) and
    counts tensor data only, so its shard boundaries may differ from this set's; the tensors are the same."""
    if not split or split["max_bytes"] < 10**6:
        return []
    one = recipe.command[-2]  # llama-quantize ... SOURCE OUTPUT FTYPE
    prefix = one.removesuffix(".gguf")
    return [f"llama-gguf-split --split --split-max-size {split['max_bytes'] // 10**6}M {one} {prefix}"]


def write_card(dst: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(dst, force=True) as tmp:
        tmp.write_text(text)
    return Path(dst)


IMATRIX = "imatrix.gguf"
TYPES_FILE = "tensor-types.txt"
CARD = "README.md"


def publish(
    run_dir: Path, gguf: Path, source: Path, cal: Calibration, report: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]], split: SplitOutput | None = None,
) -> Recipe:
    """The run folder's recipe and card: `imatrix.gguf` (the imatrix the file was quantized with, as
    llama-imatrix writes it), `tensor-types.txt` (the written file's types, llama/recipe.py) and `README.md`.
    `source`/`cal`: the F16 the file's tensors were quantized from and its calibration — the folded copy and
    its statistics when the run folded, the model and its own when the preset's file was written. With
    `split`, `gguf` is the first shard; the recipe's llama-quantize writes the one file the set was split
    from."""
    imatrix = write_imatrix(cal, run_dir / IMATRIX, force=True)
    output = gguf.name if split is None else split.one_file_name
    recipe = write_recipe(run_dir / TYPES_FILE, written_types(gguf, source), source, imatrix, output)
    write_card(run_dir / CARD, card_text(report, rows, gguf.name, recipe))
    return recipe


def _gpu_lines(g: Mapping[str, Any] | None) -> list[str]:
    """The card's words on a --gpu-size run: what stays on the GPU when the experts are offloaded."""
    if not g:
        return []
    return [
        "",
        f"Made for `llama-server -ngl 99 {g['offload']}` (experts in CPU memory): the tensors left on the "
        f"GPU take {g['resident_bytes'] / MIB:.2f} MiB, plus {g['kv_bytes'] / MIB:.2f} MiB of KV cache "
        f"({g['kv_from']}): {g['resident_plus_kv'] / MIB:.2f} MiB within the cap of "
        f"{g['cap_bytes'] / MIB:.2f} MiB.",
    ]
