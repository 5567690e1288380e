"""The paper's `--budget` search as an allocator (`search`: paper §3, Algorithm 1, its episodes, training loop
and checkpoints), apart from the whole-file search of `ramp_cpp.allocate.sac`, whose agent (`sac.agent`),
reward (`sac.reward`) and checkpoint tensors (`sac.checkpoint`) it shares. Run by `ramp-cpp paper-search`
(ramp_cpp/pipeline/paper/).
"""
