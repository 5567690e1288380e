"""The Soft Actor-Critic allocators of the whole-file search: the agent as the paper writes it (`agent`:
`Actor`, `SoftQNetwork`, `update()`), its replay buffer (`replay`) and checkpoint as plain tensors
(`checkpoint`), the episode rollout over layer embeddings (`rollout`), the reward (`reward`, Eq. 19–21),
scoring an allocation through llama.cpp (`scoring`), the sized search warm-started from greedy (`search`),
training one policy across models on that rollout (`across`) and the policy files (`policyfile`, safetensors
only). The paper's `--budget` search is its own package beside this one (ramp_cpp/allocate/paper/), on the
same agent.
"""
