"""Two pieces of the benchmark scripts that results depend on: `bench/compare.py`'s results file keeps every
cell when two processes write one model's file, and `bench/depth.py`'s depth statistics on an allocation
whose answer is known."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from bench import compare, costs, depth
from ramp_cpp.measure.sensitivity import Option, Sensitivity, TensorOptions


@pytest.fixture
def results_home(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(compare, "HERE", tmp_path)
    return tmp_path


def _on_disk(home: Path) -> dict:
    return json.loads((home / "results" / "m.json").read_text())


def test_two_writers_opened_together_keep_both_cells(results_home):
    a, b = compare.Results("m"), compare.Results("m")  # both read the (empty) file first
    a.command(["--sizes", "Q4_K_M"])
    b.command(["--sizes", "Q3_K_M"])
    a.put("cell-a", {"kld_mean": 1.0})
    b.put("cell-b", {"kld_mean": 2.0})
    a.put("cell-a2", {"kld_mean": 3.0})
    d = _on_disk(results_home)
    assert d["cells"] == {
        "cell-a": {"kld_mean": 1.0}, "cell-b": {"kld_mean": 2.0}, "cell-a2": {"kld_mean": 3.0}
    }
    assert len(d["commands"]) == 2
    assert b.get("cell-a") == {"kld_mean": 1.0}  # a writer sees the other's cells after its own save


def test_an_existing_file_keeps_its_cells(results_home):
    old = {"cells": {"old": {"x": 1}}, "commands": ["c"]}
    (results_home / "results" / "m.json").write_text(json.dumps(old))
    r = compare.Results("m")
    r.put("new", {"x": 2})
    d = _on_disk(results_home)
    assert d["cells"] == {"old": {"x": 1}, "new": {"x": 2}}
    assert d["commands"] == ["c"]


def _writer(home: str, i: int) -> None:
    compare.HERE = Path(home)
    r = compare.Results("m")
    for j in range(15):
        r.put(f"p{i}-{j}", {"j": j})


def test_concurrent_processes_lose_no_cell(results_home):
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_writer, args=(str(results_home), i)) for i in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    assert len(_on_disk(results_home)["cells"]) == 45


# -- depth statistics -----------------------------------------------------------------------------------

N = 256  # params per tensor: a type of b bpw takes b·N/8 bytes


def _sens(n_blocks: int) -> Sensitivity:
    opts = tuple(Option(t, int(b * N / 8), e) for t, b, e in ((T.Q4_0, 4.5, 2.0), (T.Q8_0, 8.5, 1.0)))
    names = ["token_embd.weight"]
    names += [f"blk.{i}.{r}.weight" for i in range(n_blocks) for r in ("attn_q", "ffn_down")]
    return Sensitivity("x", None, 0, N * len(names), tuple(TensorOptions(n, N, opts) for n in names))


@pytest.mark.parametrize(
    "n_blocks, wide_from, first10, last10, rho",
    [
        (12, 6, 4.5, 8.5, 0.8690),  # the deeper half wide: ρ of a step, first/last 10 tensors all on one side
        (12, 0, 8.5, 8.5, None),  # everything at one width: ρ undefined
        (12, 12, 4.5, 4.5, None),
        (15, 10, 4.5, 8.5, 0.8183),  # ρ from ranks with ties averaged, by hand
    ],
)
def test_profile_on_known_allocations(n_blocks, wide_from, first10, last10, rho):
    sens = _sens(n_blocks)
    choice = {t.name: T.Q8_0 if t.name == "token_embd.weight" else T.Q4_0 for t in sens.tensors}
    for i in range(wide_from, n_blocks):
        for r in ("attn_q", "ffn_down"):
            choice[f"blk.{i}.{r}.weight"] = T.Q8_0
    p = depth.profile(sens, choice)
    assert p["first10"] == pytest.approx(first10)
    assert p["last10"] == pytest.approx(last10)
    assert p["edges"] == {"token_embd.weight": pytest.approx(8.5)}
    assert len(p["tensors"]) == 2 * n_blocks
    if rho is None:
        assert p["rho_depth"] is None
    else:
        assert p["rho_depth"] == pytest.approx(rho, abs=1e-3)


def _prof(per_block: dict[int, float]) -> dict[str, object]:
    return {"per_block": per_block}


@pytest.mark.parametrize(
    "a, b, want",
    [
        ({0: 4.0, 1: 5.0, 2: 6.0}, {0: 4.5, 1: 5.0, 2: 5.5, 3: 6.0}, 1.0),  # both rise: ρ = 1
        ({0: 4.0, 1: 5.0, 2: 6.0}, {0: 6.0, 1: 5.0, 2: 4.0}, -1.0),
        ({0: 4.0, 1: 5.0, 2: 6.0}, {0: 5.0, 1: 5.0, 2: 5.0}, None),  # a flat profile has no ranks to compare
    ],
)
def test_depth_correlation_across_models(a, b, want):
    data = {"m1": {"greedy (measured)": _prof(a)}, "m2": {"greedy (measured)": _prof(b), "sac": _prof(b)}}
    (pair,) = depth.across_models(data)
    assert pair[:3] == ("m1", "m2", "greedy (measured)")
    assert pair[3] == (None if want is None else pytest.approx(want))


# -- cells as jobs (compare.fan_out) -------------------------------------------------------------------------


def _base(home: Path) -> object:
    return compare.Base("m", "offgrid", 0, home / "none.gguf", None, home / "out")


@pytest.mark.parametrize(
    "method,kind",
    [("preset", "preset"), ("preset-noimatrix", "preset-noimatrix"), ("uniform", "alloc"),
     ("greedy-measured-b3", "alloc"), ("sac-e20-s1", "sac"), ("transfer-qwen0.5b", "transfer"),
     ("greedy-measured-portable", "alloc")],
)
def test_a_cell_job_knows_which_cell_it_runs(method, kind, tmp_path):
    c = compare.Cell.of(_base(tmp_path), "r.toml", method, "Q4_K_M", 123, compare.Fold(0.5), 4)
    assert (c.kind, c.method, c.target, c.fold, c.chunks) == (kind, method, 123, 0.5, 4)
    assert hash(c) == hash(compare.Cell.of(_base(tmp_path), "r.toml", method, "Q4_K_M", 123,
                                            compare.Fold(0.5), 4))  # a batch can drop a repeated cell


def test_fan_out_gives_each_cells_row_in_order_and_its_threads(results_home, monkeypatch):
    """Stored cells come back as they are, in the batch's order, without touching a model; the job runs
    with the executor's threads."""
    from ramp_cpp.executor import Serial

    res = compare.Results("m")
    res.put("offgrid-s0|nofold|preset+imatrix|Q4_K_M|4", {"file_bytes": 10})
    res.put("offgrid-s0|fold|greedy|Q4_K_M|4", {"kld_mean": 0.5})
    monkeypatch.setattr(compare, "prepare", lambda *a: _base(results_home))
    seen = []

    def results(key, folder=None):
        seen.append(compare.RUN.n_threads)  # what the cell's llama.cpp calls will get
        return res

    monkeypatch.setattr(compare, "Results", results)
    b = _base(results_home)
    cells = [compare.Cell.of(b, "r", "greedy", "Q4_K_M", 10, compare.Fold(0.5), 4),
             compare.Cell.of(b, "r", "preset", "Q4_K_M", 0, compare.Fold(None), 4)]
    rows = compare.fan_out(Serial(threads=1), cells)
    assert rows == [{"kld_mean": 0.5}, {"file_bytes": 10}]
    assert seen == [1, 1]


def test_a_long_runs_small_results_are_carried_to_a_fresh_machine(tmp_path, monkeypatch):
    """bench/costs.py --state: the run folder's small results, the proxy's and probes' saved states and the
    base log-probs go to the state folder (STATE) and come back into an empty run folder and user cache; the
    large files (GGUFs, the tensor cache's bytes and per-tensor indexes, which would point at missing bytes)
    do not."""
    monkeypatch.setattr(costs, "HERE", tmp_path)
    monkeypatch.setattr(costs, "STATE", tmp_path / "state")
    rd = tmp_path / "out" / "costs" / "m" / "new-Q4_K_M"
    base = tmp_path / "user" / "base-logprobs" / "abc.npz"
    monkeypatch.setitem(costs._BASE_FILES, ("m", "new", "Q4_K_M"), [base])
    small = {"run.json": b"{}", "calib.safetensors": b"calib", "stages.jsonl": b"{}\n", "pauses.jsonl": b"p",
             "cache/k1/measure-0123.json": b"m", "cache/k1/groups-4567.json": b"g"}
    large = ["folded.f16.gguf", "cache/k1/Q8_0.bin", "cache/k1/blk.0.attn_q.weight.json",
             "cache/k1/layout.json"]
    for name, data in {**small, **dict.fromkeys(large, b"x")}.items():
        (rd / name).parent.mkdir(parents=True, exist_ok=True)
        (rd / name).write_bytes(data)
    base.parent.mkdir(parents=True)
    base.write_bytes(b"npz")
    costs.save_state("m", "new", "Q4_K_M")
    st = tmp_path / "state" / "m" / "new-Q4_K_M"
    kept = sorted(str(p.relative_to(st)) for p in st.rglob("*") if p.is_file())
    assert kept == sorted([*small, "base-logprobs/abc.npz"])
    shutil.rmtree(tmp_path / "out")
    base.unlink()
    assert costs.restore_state("m", "new", "Q4_K_M") == len(small) + 1
    assert {n: (rd / n).read_bytes() for n in small} == small and base.read_bytes() == b"npz"
    assert costs.restore_state("m", "new", "Q4_K_M") == 0  # what the run has is never overwritten


@pytest.mark.parametrize(("pauses", "want"), [
    ([], [50.0, 20.0]),
    ([(60, 70)], [40.0, 20.0]),  # inside the first stage
    ([(90, 110)], [40.0, 10.0]),  # across the boundary: 10 s off each
    ([(0, 40), (130, 150)], [50.0, 20.0]),  # before the run, after it
    ([(55, 60), (65, 70), (100, 120)], [40.0, 0.0]),  # two in one stage; one over a whole stage
])
def test_a_paused_runs_stages_are_counted_without_the_pauses(pauses, want):
    """bench/costs.py's table takes each stage's overlap with pauses.jsonl off its wall time (a stage line
    ends at `time` and began `wall_s` before it)."""
    attempts = [[{"stage": "a", "time": 100.0, "wall_s": 50.0},
                 {"stage": "b", "time": 120.0, "wall_s": 20.0}]]
    got = costs._unpaused(attempts, [{"stop": a, "cont": b, "why": "t"} for a, b in pauses])
    assert [st["wall_s"] for st in got[0]] == want
    assert attempts[0][0]["wall_s"] == 50.0  # the stored lines are left as they are


def test_a_tail_cell_starts_from_the_finished_runs_state_less_its_plan_and_fold_check(tmp_path, monkeypatch):
    """bench/costs.py --tail: the cell's own state is the finished run's without the files that would make its
    plan, stage lines or fold decision the old run's; the finished run's state is left as it was."""
    monkeypatch.setattr(costs, "HERE", tmp_path)
    monkeypatch.setattr(costs, "STATE", tmp_path / "state")
    monkeypatch.setitem(costs._BASE_FILES, ("m", "new", "Q4_K_M"), [])
    full = tmp_path / "state" / "m" / "new-Q4_K_M"
    files = ["run.json", "calib.safetensors", "presets.json", "cache/k1/groups-1.json", *costs.TAIL_DROPPED]
    for name in files:
        (full / name).parent.mkdir(parents=True, exist_ok=True)
        (full / name).write_text(name)
    assert costs.restore_state("m", "new", "Q4_K_M", variant="tail") == 4
    rd = tmp_path / "out" / "costs" / "m" / "new-Q4_K_M-tail"
    assert sorted(str(p.relative_to(rd)) for p in rd.rglob("*") if p.is_file()) == sorted(files[:4])
    assert sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file()) == sorted(files)
    with pytest.raises(SystemExit):  # nothing finished to take the tail of
        costs.restore_state("other", "new", "Q4_K_M", variant="tail")
    # --again runs the whole cell cold: nothing of the finished run comes into its folder
    assert costs.restore_state("m", "new", "Q4_K_M", variant="again") == 0
    assert not any((tmp_path / "out" / "costs" / "m" / "new-Q4_K_M-again").rglob("*"))


@pytest.mark.parametrize(("pauses", "ended", "since", "want"), [
    ([], (100.0, 200.0), 0.0, {"group probes (folded)": 60.0, "group probes (unfolded)": 40.0}),
    ([(90, 95)], (100.0, 200.0), 0.0, {"group probes (folded)": 55.0, "group probes (unfolded)": 40.0}),
    # evaluations saved without their end cannot be placed: left to the stage lines
    ([(90, 95)], (None, 200.0), 0.0, {"group probes (unfolded)": 40.0}),
    ([], (None, 200.0), 0.0, {"group probes (unfolded)": 40.0}),
    # the folded ones ended at 70 and 100, before this cell began (a state restored from another run)
    ([], (100.0, 200.0), 150.0, {"group probes (unfolded)": 40.0}),
    ([], (100.0, 200.0), 80.0, {"group probes (folded)": 30.0, "group probes (unfolded)": 40.0}),
])
def test_the_probe_stages_are_recounted_by_their_evaluations_clocks(
    tmp_path, monkeypatch, pauses, ended, since, want
):
    """A probe stage's line lost with its machine: the table counts the seconds of its evaluations that ended
    after the cell began, less their overlap with the pauses; the unfolded model's cache is the one whose
    proxy was measured on the base."""
    monkeypatch.setattr(costs, "HERE", tmp_path)
    monkeypatch.setattr(costs, "STATE", tmp_path / "state")
    root = tmp_path / "state" / "m" / "new-Q4_K_M"
    for d, src, secs, end in (("f", "folded-sha", (30.0, 30.0), ended[0]), ("u", "base", (40.0,), ended[1])):
        (root / "cache" / d).mkdir(parents=True)
        (root / "cache" / d / "measure-1.json").write_text(json.dumps({"key": {"model_sha256": src}}))
        evals = {f"g{i}": {"seconds": s, **({"ended": end - 30 * i} if end else {})}
                 for i, s in enumerate(secs)}
        (root / "cache" / d / "groups-1.json").write_text(json.dumps({"key": {"base_sha256": "base"},
                                                                      "evals": evals}))
    lines = [{"stop": a, "cont": b, "why": "t"} for a, b in pauses]
    assert costs.probe_clocks("m|new|Q4_K_M", lines, since) == want


def _row(**more) -> dict:
    return {"mib": 100.0, "bpw_file": 6.0, "ppl": 29.0, "kld_mean": 0.05, "kld_stderr": 0.001,
            "kld_p99": 0.25, "same_top_pct": 85.0, "file_bytes": 100 << 20, "base_ppl": 28.0, **more}


@pytest.mark.parametrize(
    ("more", "shown"), [({}, "| 0.250 | - | 85.0 |"), ({"kld_p999": 0.8}, "| 0.250 | 0.800 | 85.0 |")]
)
def test_the_tables_show_the_tail_kld_beside_the_mean_and_a_cell_without_it_as_a_dash(
    more, shown, tmp_path, monkeypatch
):
    """A cell stored before p99.9 was recorded shows "-" in its column; one with it shows it, after p99."""
    from bench import run, table

    cells = {"offgrid-s0|fold|greedy-measured|Q4_K_M|16": _row(**more),
             "offgrid-s0|nofold|preset+imatrix|Q4_K_M|16": _row(**more)}
    assert shown in run.size_table(cells, "Q4_K_M", compare.Fold(0.5), "sac", 16).splitlines()[7]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "m.json").write_text(json.dumps({"cells": cells, "commands": []}))
    monkeypatch.setattr(table, "HERE", tmp_path)
    lines = [x for x in table.table("m", "offgrid-s0", 16).splitlines() if x.startswith("| greedy-measured")]
    assert len(lines) == 1 and shown in lines[0]


@pytest.mark.parametrize(
    ("method", "types", "buckets"),
    [("greedy-measured", "full", 4), ("greedy-measured-portable", "portable", 4),
     ("greedy-measured-b3-portable", "portable", 3), ("greedy-portable", "portable", 4),
     ("uniform", "full", 4)],
)
def test_a_cells_method_names_its_candidate_set(method, types, buckets):
    from ramp_cpp.measure.candidates import TYPE_SETS

    assert compare.candidate_config(method).types == TYPE_SETS[types].types
    assert compare.group_config(method).n_buckets == buckets


def test_the_portable_study_summarises_both_cells_and_dashes_what_has_not_run():
    from bench.studies import portable

    fold = compare.Fold(0.5)
    full = _row(kld_mean=0.04, kld_p999=0.9, types={"IQ4_XS": 3, "Q4_K": 5})
    port = _row(kld_mean=0.05, kld_p999=1.1, types={"Q4_K": 8}, kld_groups={"evaluations": 30, "lent": 9})
    cells = {"offgrid-s0|nofold|preset+imatrix|Q4_K_M|16": _row(kld_mean=0.1),
             "offgrid-s0|fold|greedy-measured|Q4_K_M|16": full,
             "offgrid-s0|fold|greedy-measured-portable|Q4_K_M|16": port,
             "offgrid-s0|fold|greedy-measured|Q3_K_M|16": full}
    s = portable.summary(cells, ["Q4_K_M", "Q3_K_M"], fold, 16)
    assert s["Q4_K_M"]["portable_over_full"] == pytest.approx(1.25)
    assert s["Q4_K_M"]["portable_probes"] == {"evaluations": 30, "lent": 9}
    assert s["Q3_K_M"]["greedy-measured-portable"] is None and s["Q3_K_M"]["portable_over_full"] is None
    rows = [x for x in portable.markdown({"m": s}, fold, 16).splitlines() if x.startswith("| m |")]
    assert rows[0].endswith("| 1.250 | 0.500 | 30 (9) |")
    assert "| 0.900 |" in rows[0] and "| 1.100 |" in rows[0]
    assert rows[1].endswith("| - | - | - | - | - | - |")


def test_an_allocations_types_are_counted_per_role_the_experts_apart():
    choice = {
        "blk.0.ffn_up_exps.weight": T.Q3_K, "blk.1.ffn_up_exps.weight": T.Q3_K,
        "blk.0.ffn_down_exps.weight": T.IQ4_XS, "blk.0.attn_v.weight": T.Q6_K,
        "blk.1.attn_v.weight": T.Q8_0, "token_embd.weight": T.Q5_K,
    }
    assert compare.by_role(choice) == {
        "ffn_up_exps": {"Q3_K": 2}, "ffn_down_exps": {"IQ4_XS": 1},
        "attn_v": {"Q6_K": 1, "Q8_0": 1}, "token_embd": {"Q5_K": 1},
    }
