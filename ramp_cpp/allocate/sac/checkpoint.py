"""The SAC agent as plain tensors plus JSON, and back: everything a search needs to resume bit for bit.

Not part of the agent as the paper writes it (`agent.py`); both searches store what `checkpoint_tensors`
returns with safetensors (`paper.py`'s `checkpoint.safetensors`, `search.py`'s `sac.safetensors`) and rebuild
the agent with `from_checkpoint`. Nothing here pickles.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from ramp_cpp.allocate.sac.agent import SAC, SACConfig
from ramp_cpp.errors import RampError

CHECKPOINT_FORMAT = 1

_NETS = ("actor", "qf1", "qf2", "qf1_target", "qf2_target")


def _nets(agent: SAC) -> dict[str, nn.Module]:
    return {k: getattr(agent, k) for k in _NETS}


def _opts(agent: SAC) -> dict[str, torch.optim.Optimizer]:
    return {"actor": agent.actor_opt, "q": agent.q_opt, "alpha": agent.alpha_opt}


def checkpoint_tensors(agent: SAC) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to resume bit-exactly, as (tensors for safetensors, JSON-able meta).

    Tensors: `<net>.<param>` for actor, qf1, qf2 and both targets; `log_alpha`;
    `opt.<actor|q|alpha>.state.<i>.<key>` (Adam's step, exp_avg, exp_avg_sq per parameter index);
    `buffer.<field>`; `rng.torch` (the generator state, uint8). Meta: format, dimensions, config,
    update count, Adam param_groups, numpy bit-generator state. All tensors are copies."""
    t: dict[str, torch.Tensor] = {}
    for name, net in _nets(agent).items():
        for k, v in net.state_dict().items():
            t[f"{name}.{k}"] = v.detach().clone()
    t["log_alpha"] = agent.log_alpha.detach().clone()
    groups: dict[str, Any] = {}
    for name, opt in _opts(agent).items():
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    raise RampError(f"optimizer {name} holds a non-tensor state {k!r}")
                t[f"opt.{name}.state.{i}.{k}"] = v.detach().clone()
        groups[name] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]
        ]
    for k, arr in agent.buffer.state_dict().items():
        t[f"buffer.{k}"] = torch.from_numpy(np.ascontiguousarray(arr))
    t["rng.torch"] = agent.gen.get_state().clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "obs_dim": agent.obs_dim,
        "act_dim": agent.act_dim,
        "config": asdict(agent.cfg),
        "n_updates": agent.n_updates,
        "param_groups": groups,
        "rng_numpy": agent.rng.bit_generator.state,
    }
    return t, meta


def from_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SAC:
    """Rebuild an agent from `checkpoint_tensors` output (tensors are copied, never aliased)."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RampError(
            f"SAC checkpoint format {meta.get('format')} (this ramp-cpp reads {CHECKPOINT_FORMAT})"
        )
    try:
        conf = dict(meta["config"])
        conf["hidden"] = tuple(conf["hidden"])
        agent = SAC(int(meta["obs_dim"]), SACConfig(**conf), int(meta["act_dim"]))
        for name, net in _nets(agent).items():
            pre = f"{name}."
            own = {k[len(pre) :]: v.clone() for k, v in tensors.items() if k.startswith(pre)}
            net.load_state_dict(own)
        with torch.no_grad():
            agent.log_alpha.copy_(tensors["log_alpha"])
        agent.alpha = float(agent.log_alpha.exp().item())
        for name, opt in _opts(agent).items():
            pre = f"opt.{name}.state."
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(pre):
                    i, key = k[len(pre) :].split(".", 1)
                    state.setdefault(int(i), {})[key] = v.clone()
            fresh = opt.state_dict()["param_groups"]
            groups = [
                {k: (tuple(v) if isinstance(f.get(k), tuple) else v) for k, v in g.items()}
                for g, f in zip(meta["param_groups"][name], fresh, strict=True)
            ]
            opt.load_state_dict({"state": state, "param_groups": groups})
        agent.buffer.load_state_dict(
            {k[len("buffer.") :]: v.numpy().copy() for k, v in tensors.items() if k.startswith("buffer.")}
        )
        agent.gen.set_state(tensors["rng.torch"].clone())
        agent.rng.bit_generator.state = meta["rng_numpy"]
        agent.n_updates = int(meta["n_updates"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise RampError(f"not a usable SAC checkpoint ({type(e).__name__}: {e})") from None
    return agent
