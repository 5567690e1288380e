from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.report import DPI, write_report

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tensors(n_blocks: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "name": f"blk.{b}.{r}.weight",
            "role": r,
            "block": b,
            "n_params": 4096 if r.startswith("ffn") else 1024,
        }
        for b in range(n_blocks)
        for r in ROLES
    ]


def _episode(i: int, bits: list[int], **kw: Any) -> dict[str, Any]:
    bpw = float(np.mean(bits)) + 0.1
    ppl = 20.0 + 30.0 * np.exp(-i / 5)
    e = {
        "episode": i,
        "random": i < 5,
        "reward": -ppl / 20,
        "r_q": -ppl / 25,
        "r_b": -0.1,
        "metric": "ppl",
        "quality": ppl,
        "ppl": ppl,
        "kld": None,
        "bpw": bpw,
        "bpw_nominal": float(np.mean(bits)),
        "file_bytes": 1_000_000 + 1000 * i,
        "in_budget": bpw <= 4.25,
        "best_quality": None,
        "t_assemble": 0.5,
        "t_load": 0.25,
        "t_eval": 2.0,
        "t_update": 0.75,
        "memo": False,
        "bits": bits,
    }
    e.update(kw)
    return e


def _log(n: int, n_tensors: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    log, best = [], None
    for i in range(n):
        e = _episode(i, rng.choice([3, 4, 5], size=n_tensors).tolist(), memo=i % 7 == 6)
        if e["in_budget"]:
            best = e["quality"] if best is None else min(best, e["quality"])
        e["best_quality"] = best
        log.append(e)
    return log


def _best(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    bits = [5 if t["role"] == "attn_v" else 4 if t["block"] else 3 for t in tensors]
    return {
        "episode": 17,
        "bits": bits,
        "types": ["Q4_K"] * len(bits),
        "bpw": 4.1,
        "file_bytes": 1_020_000,
        "quality": 21.5,
    }


POINTS = [
    {"label": "Q4_K_M", "file_bytes": 1_050_000, "quality": 22.0, "kind": "preset"},
    {"label": "Q3_K_M", "file_bytes": 900_000, "quality": 26.0, "kind": "preset"},
    {"label": "Q8_0", "file_bytes": 1_800_000, "quality": 20.1, "kind": "preset"},
    {"label": "RAMP 4.25", "file_bytes": 1_020_000, "quality": 21.5, "kind": "ramp"},
]


def _png_size(p: Path) -> tuple[int, int]:
    data = p.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_writes_all_files_as_valid_pngs(tmp_path: Path) -> None:
    tensors = _tensors()
    out = write_report(
        tmp_path / "run",
        _log(30, len(tensors)),
        tensors,
        _best(tensors),
        POINTS,
        {"model": "tiny", "budget": 4.25, "target": 4.0, "base_quality": 19.5},
    )
    assert set(out) == {"report", "training", "best_so_far", "bits_depth", "bits_role", "pareto"}
    for name, p in out.items():
        assert p.is_file() and p.parent == tmp_path / "run"
        if name != "report":
            assert p.name == f"{name}.png" and p.stat().st_size > 5000
    assert _png_size(out["training"]) == (9 * DPI, 8 * DPI)  # all three panels drawn at the set size
    assert _png_size(out["pareto"]) == (8 * DPI, 5 * DPI)
    assert sorted(x.name for x in (tmp_path / "run").iterdir()) == sorted(p.name for p in out.values())


def test_summary_numbers_come_from_the_log(tmp_path: Path) -> None:
    tensors = _tensors(1)
    bits = [4] * 7
    log = [
        _episode(0, bits, random=True, in_budget=False, t_eval=3.0, t_assemble=1.0),
        _episode(1, bits, random=True, in_budget=True, best_quality=30.0, t_eval=5.0),
        _episode(
            2,
            bits,
            random=False,
            memo=True,
            in_budget=True,
            best_quality=30.0,
            t_eval=0.0,
            t_assemble=0.0,
            t_load=0.0,
        ),
        _episode(3, bits, random=False, in_budget=True, best_quality=25.0, t_eval=4.0, reward=2.5),
    ]
    best = {
        "episode": 3,
        "bits": [3, 4, 5, 6, 4, 4, 8],
        "types": ["x"] * 7,
        "bpw": 4.2,
        "file_bytes": 9,
        "quality": 25.0,
    }
    out = write_report(tmp_path, log, tensors, best, [], {"note": "hand"})
    report = json.loads(out["report"].read_text())
    s = report["summary"]
    assert report["meta"] == {"note": "hand"}
    assert (s["episodes"], s["random_episodes"], s["in_budget_episodes"], s["memo_episodes"]) == (4, 2, 3, 1)
    assert s["first_in_budget_episode"] == 1 and s["metric"] == "ppl" and s["best"] == best
    # t_eval: (3 + 5 + 0 + 4) / 4 = 3.0 over all episodes, (3 + 5 + 4) / 3 = 4.0 over evaluated ones
    assert s["time_mean_s"]["eval"] == pytest.approx(3.0)
    assert s["time_mean_s_evaluated"]["eval"] == pytest.approx(4.0)
    # t_assemble: (1 + 0.5 + 0 + 0.5) / 4 = 0.5; t_load (0.25 * 3 + 0) / 4; t_update 0.75 each
    assert s["time_mean_s"]["assemble"] == pytest.approx(0.5)
    assert s["time_mean_s"]["load"] == pytest.approx(0.1875)
    assert s["time_mean_s"]["total"] == pytest.approx(0.5 + 0.1875 + 3.0 + 0.75)
    assert s["time_total_s"]["eval"] == pytest.approx(12.0)
    assert s["reward_max"] == pytest.approx(2.5)
    # one tensor per role here, so mean and weighted equal that tensor's bits
    assert s["bits_by_role"]["attn_v"] == {"n": 1, "mean_bits": 5.0, "weighted_bits": 5.0}
    assert "pareto" not in out


def test_bits_by_role_mean_and_parameter_weighted(tmp_path: Path) -> None:
    tensors = [
        {"name": "blk.0.ffn_up.weight", "role": "ffn_up", "block": 0, "n_params": 3000},
        {"name": "blk.1.ffn_up.weight", "role": "ffn_up", "block": 1, "n_params": 1000},
        {"name": "blk.0.attn_q.weight", "role": "attn_q", "block": 0, "n_params": 10},
    ]
    best = {
        "episode": 0,
        "bits": [3, 5, 4],
        "types": ["Q3_K", "Q5_K", "Q4_K"],
        "bpw": 3.5,
        "file_bytes": 1,
        "quality": 1.0,
    }
    out = write_report(tmp_path, [_episode(0, [3, 5, 4])], tensors, best, [], {})
    roles = json.loads(out["report"].read_text())["summary"]["bits_by_role"]
    assert list(roles) == ["ffn_up", "attn_q"]
    # ffn_up: mean (3 + 5) / 2 = 4; weighted (3 * 3000 + 5 * 1000) / 4000 = 3.5
    assert roles["ffn_up"] == {"n": 2, "mean_bits": 4.0, "weighted_bits": 3.5}


def test_no_best_and_kld_metric(tmp_path: Path) -> None:
    tensors = _tensors(1)
    log = [
        _episode(
            i, [5] * 7, metric="kld", quality=0.5 / (i + 1), ppl=None, kld=0.5 / (i + 1), in_budget=False
        )
        for i in range(6)
    ]
    out = write_report(tmp_path, log, tensors, None, [], {})
    assert set(out) == {"report", "training", "best_so_far"}
    s = json.loads(out["report"].read_text())["summary"]
    assert s["best"] is None and s["bits_by_role"] is None and s["first_in_budget_episode"] is None
    assert s["metric"] == "kld"


def test_rewrites_an_existing_report(tmp_path: Path) -> None:
    tensors = _tensors(1)
    write_report(tmp_path, _log(3, 7), tensors, None, [], {"n": 1})
    out = write_report(tmp_path, _log(5, 7), tensors, None, [], {"n": 2})
    assert json.loads(out["report"].read_text())["summary"]["episodes"] == 5


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda log, t, b: log.clear(), "empty"),
        (lambda log, t, b: log[1].pop("bpw"), "entry 1 lacks bpw"),
        (lambda log, t, b: b["bits"].pop(), "bit-widths"),
        (lambda log, t, b: t[0].pop("role"), "tensor list"),
    ],
)
def test_bad_input_is_one_ramp_error(tmp_path: Path, mutate: Any, message: str) -> None:
    tensors = _tensors(1)
    log, best = _log(3, 7), _best(tensors)
    mutate(log, tensors, best)
    with pytest.raises(RampError, match=message):
        write_report(tmp_path, log, tensors, best, [], {})
    assert not list(tmp_path.iterdir())
