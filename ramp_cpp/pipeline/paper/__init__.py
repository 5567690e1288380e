"""The paper's own product, apart from the whole-file search: `paper-search --budget` (`run`: calibrate,
fold, the tensor cache and base statistics, Algorithm 1's SAC search of `ramp_cpp.allocate.paper.search`,
resumable, then the policy, allocation, GGUF and report) and `apply` of a policy it trained (`apply`: the
policy's mean action on another model at a bit budget, repaired to fit, quantized by llama.cpp).

Floor 7 with the rest of the pipeline; nothing in the sized run imports it.
"""
