from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ramp_cpp.allocate.sac.agent import SAC, Actor, SACConfig, SoftQNetwork, action_to_unit
from ramp_cpp.allocate.sac.checkpoint import checkpoint_tensors, from_checkpoint
from ramp_cpp.allocate.sac.policyfile import actor_tensors, read_actor
from ramp_cpp.allocate.sac.replay import ReplayBuffer
from ramp_cpp.errors import RampError

OBS = 11
SMALL = SACConfig(hidden=(32, 32, 16), batch_size=16, buffer_size=64, seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks gain nothing from threads, and OpenMP workers spin badly on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fill(agent: SAC, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, OBS))
    act, rew, done = rng.uniform(-1, 1, (n, 1)), rng.normal(size=n), rng.random(n) < 0.2
    agent.buffer.add(obs, act, rew, np.roll(obs, -1, 0), done)


def _weights(agent: SAC) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(agent)[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_paper_architecture() -> None:
    """Table 27: FC-512-LN-ReLU -> FC-512-LN-ReLU -> FC-256-ReLU -> FC-2 (actor) / FC-1 on s+a (critic)."""
    ag = SAC(OBS)
    spec = [
        (nn.Linear, 11, 512),
        (nn.LayerNorm,),
        (nn.ReLU,),
        (nn.Linear, 512, 512),
        (nn.LayerNorm,),
        (nn.ReLU,),
        (nn.Linear, 512, 256),
        (nn.ReLU,),
    ]
    for net, n_in, n_out in ((ag.actor, OBS, 2), (ag.qf1, OBS + 1, 1), (ag.qf2_target, OBS + 1, 1)):
        layers = list(net.trunk)
        assert [type(m) for m in layers] == [s[0] for s in spec]
        assert layers[0].in_features == n_in
        assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)][1:] == [
            (512, 512),
            (512, 256),
        ]
        assert (net.head.in_features, net.head.out_features) == (256, n_out)
    c = ag.cfg
    assert (c.lr, c.batch_size, c.buffer_size) == (3e-4, 128, 30_000)
    assert (c.gamma, c.tau, c.grad_clip) == (0.99, 0.005, 1.0)
    assert ag.alpha == pytest.approx(0.2) and ag.log_alpha.item() == pytest.approx(math.log(0.2))
    assert ag.target_entropy == -1.0 and c.warmup_episodes == 20


def test_targets_start_equal_to_critics_and_init_is_torch_like() -> None:
    ag = SAC(OBS, SMALL)
    for a, b in ((ag.qf1, ag.qf1_target), (ag.qf2, ag.qf2_target)):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
    assert not torch.equal(ag.qf1.head.weight, ag.qf2.head.weight)
    w = ag.actor.trunk[0].weight
    assert w.abs().max() <= 1 / math.sqrt(OBS) and w.std() > 0.5 / math.sqrt(3 * OBS)
    assert torch.equal(ag.actor.trunk[1].weight, torch.ones(32))


def test_log_prob_matches_torch_tanh_normal() -> None:
    """Reference: torch.distributions' TanhTransform of the same Normal gives the same log-density."""
    ag = SAC(OBS, SMALL)
    obs = torch.randn(64, OBS, generator=torch.Generator().manual_seed(0))
    a, logp, a_det = ag.actor.get_action(obs, torch.Generator().manual_seed(1))
    mean, log_std = ag.actor(obs)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.transforms.TanhTransform()]
    )
    x = mean + log_std.exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, torch.tanh(x))
    assert torch.allclose(logp, ref.log_prob(torch.tanh(x)).sum(-1, keepdim=True), atol=1e-4)
    assert torch.equal(a_det, torch.tanh(mean))
    assert a.shape == logp.shape == (64, 1) and bool((a.abs() <= 1).all())
    lo, hi = SMALL.log_std_min, SMALL.log_std_max
    assert bool(((log_std >= lo) & (log_std <= hi)).all())


def test_log_prob_finite_where_tanh_saturates() -> None:
    """A sample far in the tail makes tanh round to 1 in float32; the log-density must stay finite."""
    actor = Actor(OBS, hidden=(8,), gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        actor.head.bias.copy_(torch.tensor([30.0, -50.0]))  # mean 30, log_std at its minimum
    _, logp, _ = actor.get_action(torch.zeros(4, OBS), torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(logp).all())


@pytest.mark.parametrize(
    ("a", "u"),
    [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.75), (-1.5, 0.0), (1.0000001, 1.0)],
)
def test_action_to_unit(a: float, u: float) -> None:
    assert float(action_to_unit(a)) == pytest.approx(u)


def test_action_to_unit_is_sigmoid_of_twice_pre_tanh() -> None:
    x = np.linspace(-6, 6, 101)
    assert np.allclose(action_to_unit(np.tanh(x)), 1 / (1 + np.exp(-2 * x)))


def test_replay_buffer_ring_and_batches() -> None:
    buf = ReplayBuffer(5, obs_dim=2)
    for i in range(3):
        buf.add(np.full(2, i), [i / 10], float(i), np.full(2, i + 1), 0.0)
    i = np.arange(3, 7)
    buf.add(i[:, None] * np.ones((1, 2)), i / 10, i, np.zeros((4, 2)), 1.0)
    assert (len(buf), buf.pos) == (5, 2)
    # 7 transitions into 5 slots: 5 and 6 overwrote 0 and 1
    assert buf.rewards.tolist() == [5, 6, 2, 3, 4]
    assert buf.obs[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert buf.dones.tolist() == [1, 1, 0, 1, 1]
    b = buf.sample(200, np.random.default_rng(0))
    assert b.obs.shape == (200, 2) and b.actions.shape == (200, 1)
    assert set(b.rewards.tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    assert np.allclose(b.actions[:, 0] * 10, b.rewards)


def test_replay_buffer_state_roundtrip_and_errors() -> None:
    buf = ReplayBuffer(8, obs_dim=3)
    buf.add(np.ones((3, 3)), np.zeros(3), [1, 2, 3], np.ones((3, 3)), 0.0)
    sd = buf.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values()) and sd["obs"].shape == (3, 3)
    other = ReplayBuffer(2, obs_dim=3)
    other.load_state_dict(sd)
    assert (other.capacity, len(other), other.pos) == (8, 3, 3)
    assert other.rewards[:3].tolist() == [1, 2, 3]
    with pytest.raises(RampError):
        ReplayBuffer(4, obs_dim=5).load_state_dict(sd)
    with pytest.raises(RampError):
        ReplayBuffer(4, obs_dim=3).sample(1, np.random.default_rng())
    with pytest.raises(RampError):
        ReplayBuffer(0, obs_dim=3)


def test_act_shapes_and_range() -> None:
    ag = SAC(OBS, SMALL)
    s = np.random.default_rng(0).normal(size=(7, OBS))
    a = ag.act(s)
    assert a.shape == (7, 1) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    assert ag.act(s[0]).shape == (1,)
    state = ag.gen.get_state()
    det = ag.act(s, deterministic=True)
    assert np.array_equal(det, ag.act(s, deterministic=True))
    assert torch.equal(ag.gen.get_state(), state)  # evaluating the policy draws nothing
    assert not np.array_equal(a, ag.act(s))  # sampling advances the generator
    r = ag.random_action(1000)
    assert r.shape == (1000, 1) and r.min() >= -1 and r.max() <= 1 and abs(float(r.mean())) < 0.1


def test_no_global_rng_use() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    ag = SAC(OBS, SMALL)
    _fill(ag, 40)
    ag.act(np.zeros(OBS))
    ag.random_action(3)
    ag.updates(2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


def _run(agent: SAC, steps: list[tuple[str, int]]) -> list[np.ndarray]:
    """Replay a script of ('add', seed) / ('act', n) / ('update', n) calls; return the actions taken."""
    acts = []
    for op, n in steps:
        if op == "add":
            _fill(agent, 10, seed=n)
        elif op == "act":
            acts.append(agent.act(np.full((n, OBS), 0.3)))
            acts.append(agent.random_action(n))
        else:
            agent.updates(n)
    return acts


SCRIPT = [("add", 1), ("add", 2), ("act", 3), ("update", 4), ("add", 3), ("act", 2), ("update", 3)]
MORE = [("add", 4), ("act", 4), ("update", 5), ("add", 5), ("add", 6), ("add", 7), ("update", 2), ("act", 1)]


def test_same_seed_same_run_different_seed_different_run() -> None:
    a, b = SAC(OBS, SMALL), SAC(OBS, SMALL)
    acts_a, acts_b = _run(a, SCRIPT), _run(b, SCRIPT)
    _assert_same(_weights(a), _weights(b))
    assert all(np.array_equal(x, y) for x, y in zip(acts_a, acts_b, strict=True))
    c = SAC(OBS, SACConfig(**{**SMALL.__dict__, "seed": 4}))
    _run(c, SCRIPT)
    assert not torch.equal(_weights(a)["actor.head.weight"], _weights(c)["actor.head.weight"])


def test_resume_from_safetensors_checkpoint_is_bit_exact(tmp_path) -> None:
    straight = SAC(OBS, SMALL)
    _run(straight, SCRIPT)
    tensors, meta = checkpoint_tensors(straight)
    save_file(tensors, str(tmp_path / "ck.safetensors"))  # no pickle: plain tensors + JSON
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    assert any(k.startswith("opt.q.state.") and k.endswith(".exp_avg_sq") for k in tensors)
    assert tensors["rng.torch"].dtype == torch.uint8

    meta_back = json.loads((tmp_path / "ck.json").read_text())
    resumed = from_checkpoint(load_file(str(tmp_path / "ck.safetensors")), meta_back)
    _assert_same(checkpoint_tensors(resumed)[0], tensors)
    assert resumed.n_updates == straight.n_updates == 7 and resumed.alpha == straight.alpha

    acts_straight, acts_resumed = _run(straight, MORE), _run(resumed, MORE)
    assert all(np.array_equal(x, y) for x, y in zip(acts_straight, acts_resumed, strict=True))
    _assert_same(_weights(straight), _weights(resumed))
    # the checkpoint is a copy: training on afterwards did not change it
    assert not torch.equal(tensors["actor.head.weight"], _weights(straight)["actor.head.weight"])


def test_bad_checkpoint_is_one_ramp_error() -> None:
    tensors, meta = checkpoint_tensors(SAC(OBS, SMALL))
    with pytest.raises(RampError, match="format"):
        from_checkpoint(tensors, {**meta, "format": 99})
    del tensors["log_alpha"]
    with pytest.raises(RampError, match="checkpoint"):
        from_checkpoint(tensors, meta)


def test_update_polyak_and_temperature_direction() -> None:
    ag = SAC(OBS, SMALL)
    _fill(ag, 60)
    before = [p.clone() for p in ag.qf1_target.parameters()]
    alpha0 = ag.alpha
    log = ag.update()
    tau = SMALL.tau
    for old, p, tp in zip(before, ag.qf1.parameters(), ag.qf1_target.parameters(), strict=True):
        assert torch.allclose(tp, (1 - tau) * old + tau * p, atol=1e-7)
    assert set(log) >= {"qf_loss", "actor_loss", "alpha_loss", "alpha", "entropy"}
    # Eq. 17: alpha shrinks while the policy's entropy is above the target and grows while it is below
    assert (log["alpha"] < alpha0) == (log["entropy"] > ag.target_entropy)
    assert ag.n_updates == 1 and ag.updates(0) == {}


def test_learns_a_one_step_bandit() -> None:
    """Terminal reward -10 (a + 0.5)^2: the deterministic action must move to near -0.5."""
    cfg = SACConfig(hidden=(32, 32, 16), batch_size=32, buffer_size=2000, lr=3e-3, seed=0)
    ag = SAC(OBS, cfg)
    s = np.random.default_rng(0).normal(size=(1, OBS)).astype(np.float32)
    assert abs(float(ag.act(s, deterministic=True)[0, 0]) + 0.5) > 0.5
    for _ in range(200):
        a = ag.act(s)
        ag.buffer.add(s, a, -((a[0, 0] + 0.5) ** 2) * 10, s, 1.0)
        ag.update()
    assert abs(float(ag.act(s, deterministic=True)[0, 0]) + 0.5) < 0.1


def test_policy_roundtrip(tmp_path) -> None:
    ag = SAC(OBS, SMALL)
    _fill(ag, 30)
    ag.updates(2)
    mu, sd = np.arange(OBS, dtype=np.float32), np.full(OBS, 2.0, np.float32)
    t = actor_tensors(ag.actor, mu, sd)
    assert all(k.startswith("actor.") for k in t if k not in {"obs_mean", "obs_std", "log_std_bounds"})
    save_file(t, str(tmp_path / "policy.safetensors"))
    actor, mu2, sd2 = read_actor(load_file(str(tmp_path / "policy.safetensors")))
    assert np.array_equal(mu, mu2) and np.array_equal(sd, sd2)
    s = np.random.default_rng(1).normal(size=(5, OBS)).astype(np.float32)
    assert np.array_equal(actor.deterministic_action(s), ag.act(s, deterministic=True))
    with pytest.raises(RampError):
        actor_tensors(ag.actor, mu[:3], sd)
    with pytest.raises(RampError, match="policy"):
        read_actor({"obs_mean": t["obs_mean"]})


@pytest.mark.parametrize(
    "bad",
    [
        {"hidden": ()},
        {"batch_size": 0},
        {"gamma": 1.5},
        {"tau": 0.0},
        {"init_alpha": 0.0},
        {"log_std_min": 3.0},
    ],
)
def test_config_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(RampError):
        SACConfig(**bad)


def test_critic_sees_action() -> None:
    q = SoftQNetwork(OBS, hidden=(16,), gen=torch.Generator().manual_seed(0))
    s = torch.zeros(2, OBS)
    assert not torch.equal(q(s, torch.tensor([[-1.0], [1.0]]))[0], q(s, torch.tensor([[-1.0], [1.0]]))[1])


@pytest.mark.parametrize(("done", "lo", "hi"), [(1.0, 2.8, 3.2), (0.0, 3.6, 1e9)])
def test_critic_bootstraps_only_from_non_terminal_transitions(done: float, lo: float, hi: float) -> None:
    """Eq. 18 with r = 3: on terminal transitions y = r, so Q -> 3; otherwise Q keeps growing toward
    r / (1 - gamma) = 300."""
    cfg = SACConfig(hidden=(32, 32, 16), batch_size=32, buffer_size=500, lr=3e-3, seed=1)
    ag = SAC(OBS, cfg)
    obs = np.random.default_rng(0).normal(size=(200, OBS))
    ag.buffer.add(obs, np.zeros(200), 3.0, obs[::-1], done)
    q1 = np.mean([ag.update()["q1"] for _ in range(200)][-20:])
    assert lo < q1 < hi
