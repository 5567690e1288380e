"""The edge to llama.cpp: the only code that reads or writes GGUF (`ggufio`), talks to llama_cpp (`backend`:
model, context, decode, log-probs; `native`: the C++ helper that runs llama.cpp's own quantizer and collects
activation statistics), quantizes (`quantize`: per-tensor type maps and presets), measures PPL/KLD
(`evaluate`) and runs lm-evaluation-harness tasks (`downstream`). What a model argument may be (`inputs`): a
GGUF, a split set read as one (`shards`), or a Hugging Face checkpoint converted by llama.cpp's own converter
(`convert`, from the sdist's vendored llama.cpp: `sdist`). A written file cut into a split set
(`splitout`, for `--split-max-size`).

Floor 3: imports `errors`, `store` and `model` only. It deals in its own types (`ModelInfo`, `InputStats`,
type maps) and plain arrays, never in the artifacts of the stages above it.
"""
