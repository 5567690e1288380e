"""Stage 5, write: a GGUF assembled from stored bytes. The tensor cache's files read back, and the bytes of a
(tensor, type) the cache does not keep made by ggml's row quantizer (`cachefiles`); the file llama.cpp's
quantizer would write for a type map, put together from those bytes and a header template (`assemble`).

Floor 4, beside `calibration` (neither imports the other): the measure stage builds the cache and checks it
with `assemble`, its group probes and the allocators' scoring write files through it, so it sits under them.
Imports `errors`, `costs`, `store`, `model` and `llama`.
"""
