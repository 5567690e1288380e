"""Stage 3, measure: what each candidate type costs each tensor. The candidate types per tensor
(`candidates`), llama.cpp's quantization of every tensor to every candidate, kept on disk or made in memory
(`tensorcache` builds it; the write stage reads it back), the proxy error (`proxy`), the sensitivity
artifact reused for every budget (`sensitivity`), and the per-group KLD probes that rescale the proxy into
the measured sensitivity (`groups`).

Floor 5: imports `calibration` and everything below it, never `fold`.
"""
