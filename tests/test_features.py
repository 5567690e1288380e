"""Layer embeddings (paper Table 24) and their standardization (Eq. 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGUFReader

from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.calibration.features import FeatureConfig, model_features, saturation
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.llama.ggufio import read_inventory


def fake_calibration(path: Path, scale: float, seed: int = 0) -> Calibration:
    """Statistics of the right shapes (what calibrate() would produce), values chosen by the test."""
    m = read_inventory(path)
    rng = np.random.default_rng(seed)
    stats = {}
    for t in m.tensors:
        mx = (scale * rng.uniform(0.5, 2.0, t.n_per_row)).astype(np.float32)
        stats[t.name] = InputStats(max_abs=mx, sum_sq=(mx.astype(np.float64) ** 2) * 10, count=10)
    return Calibration(path.name, "0" * 64, m.arch, CalibConfig(samples=1, ctx=16), 16, stats)


TYPE_SCALAR = {
    "attn_q": 0.0,
    "attn_k": 0.0,
    "attn_v": 0.0,
    "attn_output": 0.25,
    "ffn_gate": 0.5,
    "ffn_up": 0.6,
    "ffn_down": 0.75,
}


def test_paper_dims_by_hand(tiny_model: Path) -> None:
    cal = fake_calibration(tiny_model, scale=1e-4)
    f = model_features(tiny_model, cal, FeatureConfig(variant="paper"))
    r = GGUFReader(tiny_model)
    data = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    n_blocks = 2
    for name, row in zip(f.names, f.raw, strict=True):
        block, role = int(name.split(".")[1]), name.split(".")[2]
        w = data[name]
        n_out, n_in = w.shape
        act = cal.stats[name].max_abs.astype(np.float64)
        want = [
            block / (n_blocks - 1),
            np.log2(n_in / 16),
            np.log2(n_out / 16),
            min(w.std() * 10, 1.0),
            min(np.abs(w).mean() * 10, 1.0),
            TYPE_SCALAR[role],
            0.0 if block == 0 else 1.0,  # 2 blocks: depth 0 is early, depth 1 late
            min(act.mean() * 100, 1.0),
            min(act.max() * 1000, 1.0),
            0.0,
            0.0,
        ]
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_visiting_order(tiny_model: Path) -> None:
    f = model_features(tiny_model, fake_calibration(tiny_model, 1.0))
    roles = [n.split(".")[2] for n in f.names[:7]]
    assert roles == ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert [int(n.split(".")[1]) for n in f.names] == [0] * 7 + [1] * 7


def test_paper_clip_saturates_and_ramp_does_not(tiny_model: Path) -> None:
    """Real activations have max |x| >> 0.001, so the paper's dims 8-9 read 1.0 for every tensor."""
    cal = fake_calibration(tiny_model, scale=3.0)
    paper = {d.name: d for d in saturation(model_features(tiny_model, cal, FeatureConfig(variant="paper")))}
    assert paper["act_mean"].at_clip == 1.0 and paper["act_mean"].useless
    assert paper["act_max"].at_clip == 1.0 and paper["act_max"].useless
    ramp = {d.name: d for d in saturation(model_features(tiny_model, cal, FeatureConfig(variant="ramp")))}
    assert not ramp["act_mean"].useless and not ramp["act_max"].useless
    assert ramp["act_max"].std > 0


def test_standardization(tiny_model: Path) -> None:
    f = model_features(tiny_model, fake_calibration(tiny_model, 1.0))
    z = f.standardized()
    for d in range(9):
        col = z[:, d]
        if np.ptp(f.raw[:, d]) == 0:
            assert np.all(col == 0)  # constant dim: Eq. 13 gives 0, not NaN
        else:
            assert abs(col.mean()) < 1e-9 and col.std() == pytest.approx(1.0, rel=1e-6)
    s = f.state(3, prev_bits=4, avg_bits=4.5, z=z)
    assert s[9] == pytest.approx(0.5) and s[10] == pytest.approx(4.5 / 8)
    np.testing.assert_allclose(s[:9], z[3, :9], rtol=1e-6)


def test_json_round_trip(tiny_model: Path) -> None:
    from ramp_cpp.calibration.features import Features

    f = model_features(tiny_model, fake_calibration(tiny_model, 1.0))
    g = Features.from_json(f.to_json())
    np.testing.assert_array_equal(f.standardized(), g.standardized())


def test_calibration_of_another_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    other = synthetic.write(tmp_path / "wide.gguf", synthetic.Spec(n_embd=512, n_ff=768))
    with pytest.raises(RampError, match="input columns"):
        model_features(tiny_model, fake_calibration(other, 1.0))
    with pytest.raises(RampError, match="unknown feature variant"):
        model_features(tiny_model, fake_calibration(tiny_model, 1.0), FeatureConfig(variant="nope"))
