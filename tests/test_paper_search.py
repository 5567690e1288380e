"""End to end on synthetic models: search -> policy -> apply to another depth and width; determinism;
resume after kill -9 and Ctrl-C; settings checks; output metadata."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import synthetic
from gguf import GGUFReader

from ramp_cpp.allocate.paper.search import SearchConfig
from ramp_cpp.allocate.sac.agent import SACConfig
from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.errors import RampError
from ramp_cpp.pipeline.paper.apply import ApplyConfig, apply_policy
from ramp_cpp.pipeline.paper.run import search


def small(text_file: Path, **kw: object) -> SearchConfig:
    """Nominal budget 4.5 on {3,4,5,6}: feasible on any model, binding for random allocations."""
    base = SearchConfig(
        budget=4.5,
        budget_mode="nominal",
        text=str(text_file),
        n_ctx=128,
        chunks=2,
        calib=CalibConfig(text=str(text_file), samples=2, ctx=64),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


SAC_SMALL = SACConfig(episodes=5, warmup_episodes=2, updates_per_episode=2, batch_size=32, seed=3)


def log_key(run: Path) -> list[tuple[float, list[int]]]:
    from ramp_cpp.allocate.paper.search import load_checkpoint

    _, st = load_checkpoint(run)
    return [(round(r["reward"], 9), r["bits"]) for r in st.log]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    run = tmp_path_factory.mktemp("trained") / "run"
    return search(tiny_model, run, small(text_file, eval_every=1), SAC_SMALL, presets=("Q4_K_M",))


@pytest.mark.usefixtures("plain_llama")
def test_end_to_end(trained: Any) -> None:
    res, run = trained, trained.run_dir
    assert res.state.episode == 5 and len(res.state.log) == 5
    assert [r["random"] for r in res.state.log] == [True, True, False, False, False]
    # the mean action is scored after every learning episode and competes for the best allocation
    assert [e["episode"] for e in res.state.evals] == [2, 3, 4]
    assert all(e["deterministic"] for e in res.state.evals)
    cands = [r["quality"] for r in res.state.log if r["in_budget"]]
    cands += [e["quality"] for e in res.state.evals if e["in_budget"]]
    assert res.state.best is not None and res.state.best["quality"] == min(cands)
    assert res.gguf is not None and res.gguf.is_file()
    alloc = json.loads(res.allocation.read_text())
    assert len(alloc["tensors"]) == 14 and alloc["bpw_nominal"] <= 4.5
    # the written file holds exactly the allocation's types, and ramp.* metadata
    r = GGUFReader(res.gguf)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    for row in alloc["tensors"]:
        assert types[row["name"]] == row["type"]
    meta = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.budget"] == pytest.approx(4.5) and meta["ramp.budget_mode"] == "nominal"
    assert meta["ramp.tensor_bits"] == [row["bits"] for row in alloc["tensors"]]
    assert meta["ramp.scale_folding"] is True and meta["ramp.episodes"] == 5
    for f in (
        "report.json",
        "training.png",
        "best_so_far.png",
        "bits_depth.png",
        "bits_role.png",
        "pareto.png",
    ):
        assert (run / f).is_file(), f
    # llama.cpp loads it and generates
    from llama_cpp import Llama

    llm = Llama(str(res.gguf), n_ctx=64, verbose=False)
    outp = llm("the city of", max_tokens=4)
    assert outp["usage"]["completion_tokens"] >= 1
    del llm


@pytest.mark.parametrize(
    "spec",
    [
        synthetic.Spec(n_layer=3, n_embd=512, n_ff=768, seed=5),  # deeper and wider
        synthetic.Spec(arch="qwen2", arch_tensors=True, seed=6),
        synthetic.Spec(arch="gemma3", arch_tensors=True, seed=7),
    ],
    ids=["llama-3x512", "qwen2", "gemma3"],
)
def test_zero_shot_transfer(trained: Any, text_file: Path, tmp_path: Path, spec: synthetic.Spec) -> None:
    other = synthetic.write(tmp_path / "other.gguf", spec)
    out = tmp_path / "other.ramp.gguf"
    cal = CalibConfig(text=str(text_file), samples=2, ctx=64)
    a = apply_policy(trained.policy, other, out, ApplyConfig(budget=4.5, budget_mode="nominal", calib=cal))
    assert a.path == out and out.is_file() and len(a.bits) == 7 * spec.n_layer
    assert a.measures.bpw_nominal <= 4.5
    m2 = {f.name: f.contents() for f in GGUFReader(out).fields.values() if f.name.startswith("ramp.")}
    assert m2["ramp.transfer_from"] == "tiny.f16.gguf" and m2["ramp.tensor_bits"] == a.bits
    assert m2["ramp.scale_folding"] is True
    from ramp_cpp.llama.backend import LlamaModel

    with LlamaModel(out) as m:
        assert m.n_vocab > 0


def test_deterministic_with_seed(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = small(text_file)
    s = replace(SAC_SMALL, episodes=4)
    search(tiny_model, tmp_path / "a", cfg, s, presets=())
    search(tiny_model, tmp_path / "b", cfg, s, presets=())
    assert log_key(tmp_path / "a") == log_key(tmp_path / "b")


def test_resume_equals_straight_run(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = small(text_file)
    search(tiny_model, tmp_path / "straight", cfg, replace(SAC_SMALL, episodes=6), presets=())
    search(tiny_model, tmp_path / "split", cfg, replace(SAC_SMALL, episodes=3), presets=())
    search(tiny_model, tmp_path / "split", cfg, replace(SAC_SMALL, episodes=6), resume=True, presets=())
    assert log_key(tmp_path / "straight") == log_key(tmp_path / "split")


def test_resume_with_other_settings_is_refused(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = small(text_file)
    search(tiny_model, tmp_path / "r", cfg, replace(SAC_SMALL, episodes=2), presets=())
    with pytest.raises(RampError, match=r"other settings.*budget"):
        search(
            tiny_model, tmp_path / "r", replace(cfg, budget=5.0), replace(SAC_SMALL, episodes=3), resume=True
        )
    with pytest.raises(RampError, match="already holds a run"):
        search(tiny_model, tmp_path / "r", cfg, SAC_SMALL)


def test_no_episode_in_budget_gives_repaired_policy_allocation(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    """Random warm-up allocations average ~4.4 nominal bits; a 3.1 ceiling is met only by the repair."""
    res = search(
        tiny_model, tmp_path / "r", small(text_file, budget=3.1), replace(SAC_SMALL, episodes=2), presets=()
    )
    assert all(not r["in_budget"] for r in res.state.log)
    assert res.state.best is not None and res.state.best["repaired"]
    alloc = json.loads(res.allocation.read_text())
    assert alloc["repaired"] and alloc["bpw_nominal"] <= 3.1
    meta = {f.name: f.contents() for f in GGUFReader(res.gguf).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.repaired"] is True


def test_budget_outside_ladder(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(RampError, match=r"feasible range 3\.000-6\.000"):
        search(tiny_model, tmp_path / "r", small(text_file, budget=2.5), SAC_SMALL)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ramp_cpp.cli.app import main; main()", *args]


def _search_args(model: Path, text_file: Path, run: Path, episodes: int) -> list[str]:
    return _cli(
        "paper-search",
        "--model",
        str(model),
        "--out",
        str(run),
        "--budget",
        "4.5",
        "--budget-mode",
        "nominal",
        "--episodes",
        str(episodes),
        "--warmup",
        "2",
        "--updates",
        "2",
        "--chunks",
        "2",
        "--ctx",
        "128",
        "--text",
        str(text_file),
        "--recipe",
        str(text_file.parent / "recipe.toml"),
        "--no-presets",
        "--seed",
        "3",
    )


@pytest.fixture()
def recipe(text_file: Path) -> Path:
    p = text_file.parent / "recipe.toml"
    p.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    return p


def _wait_for_episodes(run: Path, proc: subprocess.Popen[bytes], n: int, timeout: float = 120) -> None:
    """Returns with the search stopped (SIGSTOP) at episode >= n: it is frozen while its checkpoint is read,
    so a fast machine cannot run past the last episode between a look and the signal."""
    from ramp_cpp.allocate.paper.search import load_checkpoint

    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "checkpoint.safetensors").is_file() and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            try:
                if load_checkpoint(run)[1].episode >= n:
                    return
            except RampError:
                pass
            proc.send_signal(signal.SIGCONT)
        if proc.poll() is not None:
            pytest.fail(
                f"search ended before episode {n}: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.02)
    pytest.fail("search did not reach the episode in time")


N_KILL = 10


@pytest.fixture(scope="module")
def straight(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted CLI run, the reference for the interrupted ones."""
    (text_file.parent / "recipe.toml").write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    run = tmp_path_factory.mktemp("straight") / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_search_args(tiny_model, text_file, run, N_KILL), check=True, env=env, capture_output=True)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_resume(
    tiny_model: Path, text_file: Path, recipe: Path, straight: Path, tmp_path: Path, sig: int
) -> None:
    """kill -9 or Ctrl-C mid-run, then --resume: the log equals an uninterrupted run's."""
    n = N_KILL
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _search_args(tiny_model, text_file, run, n), env=env, stderr=subprocess.PIPE,
        # a test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and then Ctrl-C
        # is ignored by the search as by any background job: give the child a terminal's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_episodes(run, proc, 3)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGINT once it runs again
    rc = proc.wait(60)
    want = -9 if sig == signal.SIGKILL else 130
    why = proc.stderr.read().decode()[-3000:] if proc.stderr and rc != want else ""
    assert rc == want, why
    if sig == signal.SIGINT:
        assert b"--resume" in (proc.stderr.read() if proc.stderr else b"")
    from ramp_cpp.allocate.paper.search import load_checkpoint

    done = load_checkpoint(run)[1].episode
    assert 3 <= done < n
    subprocess.run(
        [*_search_args(tiny_model, text_file, run, n), "--resume"], check=True, env=env, capture_output=True
    )
    assert log_key(run) == log_key(straight)
    from ramp_cpp.store.cache import scratch_root

    assert not list(scratch_root().glob(f"ramp-*-{proc.pid}-*"))  # the killed run's episode files are gone


def test_damaged_checkpoint_is_one_error(tmp_path: Path) -> None:
    from ramp_cpp.allocate.paper.search import load_checkpoint

    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10" + b"\x00" * 50)
    with pytest.raises(RampError, match="not a ramp-cpp checkpoint"):
        load_checkpoint(tmp_path)


def test_embeddings_searched_end_to_end(tiny_model: Path, text_file: Path, tmp_path: Path) -> None:
    """--include-embeddings: episodes give token_embd / output any rung, and the output holds those types."""
    res = search(
        tiny_model, tmp_path / "run", small(text_file, include_embeddings=True), SAC_SMALL, presets=()
    )
    alloc = json.loads(res.allocation.read_text())
    names = [row["name"] for row in alloc["tensors"]]
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    types = {t.name: t.tensor_type.name for t in GGUFReader(res.gguf).tensors}
    for row in alloc["tensors"]:
        assert types[row["name"]] == row["type"]
    seen = {r["bits"][0] for r in res.state.log}  # token_embd's rung over the episodes
    assert len(seen) > 1
