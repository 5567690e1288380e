"""The Soft Actor-Critic allocators: the agent as the paper writes it (`agent`: `Actor`, `SoftQNetwork`,
`update()`), its replay buffer (`replay`) and checkpoint as plain tensors (`checkpoint`), the episode rollout
over layer embeddings (`rollout`), the reward (`reward`, Eq. 19–21), scoring an allocation through llama.cpp
(`scoring`), the sized search warm-started from greedy (`search`), the paper's `--budget` search (`paper`:
Algorithm 1's episodes, training loop and checkpoints) and the policy files (`policyfile`, safetensors only).
"""
