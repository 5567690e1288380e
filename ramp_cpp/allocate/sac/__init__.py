"""The Soft Actor-Critic allocators: the agent as the paper writes it (`agent`: `Actor`, `SoftQNetwork`,
`update()`), the episode rollout over layer embeddings (`rollout`), the reward (`reward`, Eq. 19–21), scoring an
allocation through llama.cpp (`scoring`), the sized search warm-started from greedy (`search`), the paper's
`--budget` search loop (`paper`) and the policy files (`policyfile`, safetensors only).
"""
