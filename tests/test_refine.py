"""Refined measured sensitivity (refine.py, groups.calibrate_sensitivity with refine_evaluations): the tree a
group splits into, the order the budget is spent in, each part's ratio from its own probe, resuming, and
budget 0 as the calibration was before. The calibration tests score files with a stand-in executor whose
KLD is a known sum over tensors (each tensor its own true ratio), so the expected choices and ratios are
computed here from that sum and the sensitivity's bytes, not from the code under test; one test scores
real files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import synthetic

from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, KLDResult
from ramp_cpp.measure.evaljob import EvalJob, EvalOutcome
from ramp_cpp.measure.groups import GroupConfig, GroupReport, calibrate_sensitivity, groups_of
from ramp_cpp.measure.refine import Node, Tree, refine
from ramp_cpp.measure.sensitivity import Sensitivity

ECFG = EvalConfig(n_ctx=128, n_chunks=2)
OPTS = RuntimeOptions(n_ctx=128)
REF_KLD = 0.01


# -- the tree and the walk, on groups as data ------------------------------------------------------------


@dataclass(frozen=True)
class G:
    name: str
    role: str
    tensors: tuple[str, ...]


BLOCK = {"a0": 0, "a1": 1, "a2": 2, "b0": 0, "c3x": 3, "c3y": 3, "e": None}
TREE_GROUPS = [G("a@0-2", "a", ("a0", "a1", "a2")), G("b@0-0", "b", ("b0",)), G("c@3-3", "c", ("c3x", "c3y")),
               G("e", "e", ("e",))]
A = Node("a@0-2", "a", ("a0", "a1", "a2"))
CHILDREN = [  # (node, effective tensors, its children as (label, tensors))
    (A, set(BLOCK), [("a@0", ("a0",)), ("a@1", ("a1",)), ("a@2", ("a2",))]),
    (A, {"a0", "a2"}, [("a@0", ("a0",)), ("a@2", ("a2",))]),
    (A, {"a1"}, []),  # one effective tensor: its probe is the group's
    (Node("c@3-3", "c", ("c3x", "c3y")), set(BLOCK), [("c3x", ("c3x",)), ("c3y", ("c3y",))]),  # one block
    (Node("c@3", "c", ("c3x", "c3y")), set(BLOCK), [("c3x", ("c3x",)), ("c3y", ("c3y",))]),
    (Node("c@3", "c", ("c3x", "c3y")), {"c3y"}, []),
    (Node("b@0-0", "b", ("b0",)), set(BLOCK), []),
    (Node("e", "e", ("e",)), set(BLOCK), []),
]


@pytest.mark.parametrize("node, effective, want", CHILDREN)
def test_children(node: Node, effective: set[str], want: list[tuple[str, tuple[str, ...]]]) -> None:
    kids = Tree(TREE_GROUPS, BLOCK, effective).children(node)
    assert [(k.label, k.tensors) for k in kids] == want
    assert all(k.role == node.role for k in kids)


def test_capacity_and_members() -> None:
    tree = Tree(TREE_GROUPS, BLOCK, set(BLOCK))
    assert tree.capacity(["a@0-2"]) == 3 and tree.capacity(["c@3-3"]) == 2
    assert tree.capacity(["b@0-0", "e"]) == 0
    m = tree.members()
    assert m == {"a@0": ("a0",), "a@1": ("a1",), "a@2": ("a2",), "a0": ("a0",), "a1": ("a1",), "a2": ("a2",),
                 "c3x": ("c3x",), "c3y": ("c3y",)}
    assert not set(m) & {g.name for g in TREE_GROUPS}


# two roles over four blocks, two tensors per block in role "x" (so layers split into tensors too)
WALK_BLOCK = {f"{r}{b}{s}": b for r in "xy" for b in range(4) for s in ("", "'") if r == "x" or not s}
WALK_GROUPS = [G("x@0-3", "x", tuple(n for n in WALK_BLOCK if n[0] == "x")),
               G("y@0-3", "y", tuple(n for n in WALK_BLOCK if n[0] == "y"))]
# ΔKLD of a probe = Σ of its tensors' damage; each tensor saves 100 bytes and predicts 1 proxy unit
DAMAGE = {n: 0.001 * (1 + i % 5) for i, n in enumerate(WALK_BLOCK)}


def _walk(budget: int) -> tuple[Any, list[list[str]]]:
    batches: list[list[str]] = []
    tree = Tree(WALK_GROUPS, WALK_BLOCK, WALK_BLOCK)

    def measure(nodes: Sequence[Node]) -> Mapping[str, float]:
        batches.append([n.label for n in nodes])
        return {n.label: sum(DAMAGE[t] for t in n.tensors) for n in nodes}

    measured = {g.name: sum(DAMAGE[t] for t in g.tensors) for g in WALK_GROUPS}
    r = refine(tree, measured, budget, lambda ts: float(len(ts)), lambda ts: 100 * len(ts), measure)
    return r, batches


# by hand: per byte y 12/400 > x 21/800, so y splits first, into its layers (one tensor each, leaves); then
# x into its layers (ΔKLD 3, 7, 6, 5 over 200 bytes each), each of them into its two tensors, largest first.
# Parts of one parent predict the same proxy per byte: they keep their visiting order
WALK = ["y@0", "y@1", "y@2", "y@3", "x@0", "x@1", "x@2", "x@3",
        "x1", "x1'", "x2", "x2'", "x3", "x3'", "x0", "x0'"]
WALK_SPLITS = ["y@0-3", "x@0-3", "x@1", "x@2", "x@3", "x@0"]


@pytest.mark.parametrize("budget", [0, 1, 3, 4, 7, 9, 16, 17, 100])
def test_walk_spends_the_budget_on_the_largest_damage_per_byte_first(budget: int) -> None:
    assert Tree(WALK_GROUPS, WALK_BLOCK, WALK_BLOCK).capacity([g.name for g in WALK_GROUPS]) == len(WALK)
    r, batches = _walk(budget)
    n = min(budget, len(WALK))  # fewer than the budget only when nothing is left to split
    assert [p.node.label for p in r.probes] == [x for b in batches for x in b] == WALK[:n]
    splits = [p.parent for p in r.probes]
    assert list(r.splits) == list(dict.fromkeys(splits)) == WALK_SPLITS[: len(set(splits))]
    for p in r.probes:
        assert p.damage_per_byte == pytest.approx(sum(DAMAGE[t] for t in p.node.tensors) / p.saved)
        assert p.saved == 100 * len(p.node.tensors) and p.predicted == len(p.node.tensors)


def test_a_split_cut_by_the_budget_probes_the_parts_the_proxy_ranks_worst_per_byte() -> None:
    proxy = {"a0": 1.0, "a1": 3.0, "a2": 4.0}
    size = {"a0": 100, "a1": 200, "a2": 400}  # proxy per byte .01, .015, .01
    tree = Tree(TREE_GROUPS, BLOCK, set(BLOCK))
    r = refine(tree, {"a@0-2": 0.5}, 2, lambda ts: sum(proxy[t] for t in ts),
               lambda ts: sum(size[t] for t in ts), lambda nodes: {n.label: 0.1 for n in nodes})
    assert [p.node.label for p in r.probes] == ["a@1", "a@0"] and r.splits == ("a@0-2",)


# -- the calibration, with a stand-in for the evaluations ----------------------------------------------


@dataclass
class FakeEvaluator:
    """An executor whose jobs score KLD = REF_KLD + Σ_t weight_t · (error_t(type) − error_t(highest)) over the
    tensors a job's file changes: tensor t's true KLD per proxy unit is weight_t."""

    sens: Sensitivity
    weight: Mapping[str, float]
    labels: list[str] = field(default_factory=list)
    workers: int = 1
    threads: int | None = None

    def kld(self, types: Mapping[str, Any]) -> float:
        out = REF_KLD
        for t in self.sens.tensors:
            out += self.weight[t.name] * (t.option(types[t.name]).error - t.options[-1].error)
        return out

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[EvalJob],
            on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        out = []
        for i, j in enumerate(jobs):
            self.labels.append(j.label)
            k = self.kld(j.types)
            r = KLDResult(1.0, 1.0, 1.0, 0.0, k, 0.0, k, k, k, k, 100.0, 0.0, 0.0, 0.0, 1, 1, 1, 0.5)
            o = EvalOutcome(j.label, r, 0.5)
            if on_result:
                on_result(i, o)
            out.append(o)
        return out

    def describe(self) -> str:
        return "fake"

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def measured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return synthetic.measured(tiny_model, tmp_path_factory.mktemp("refine"))


@pytest.fixture()
def m(measured: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The module's measurement with no saved probe: each test starts its calibration afresh."""

    def clear() -> None:
        for p in measured["cache"].directory.glob("groups-*.json"):
            p.unlink()

    clear()
    yield measured
    clear()


def _weights(sens: Sensitivity) -> dict[str, float]:
    return {t.name: 1.0 + 7.0 * ((i * 5) % 11) / 10 for i, t in enumerate(sens.tensors)}


def _calibrate(m: dict[str, Any], cfg: GroupConfig, ex: Any, **kw: Any) -> tuple[Sensitivity, GroupReport]:
    return calibrate_sensitivity(m["sens"], m["cache"], m["cache"].info.path, m["text"], ECFG, OPTS, cfg,
                                 executor=ex, donors=(), **kw)


CFG = GroupConfig(n_buckets=1, pairs=0)  # every role one group over both blocks of the tiny model


def _expected(m: dict[str, Any], w: Mapping[str, float]) -> dict[str, Any]:
    """Per group (from the sensitivity's cheapest and highest options and the stand-in's weights): ΔKLD,
    Δproxy, bytes saved."""
    by = {t.name: t for t in m["sens"].tensors}
    out = {}
    for g in groups_of(m["cache"].info, list(by), CFG.n_buckets):
        d = {n: by[n].options[0].error - by[n].options[-1].error for n in g.tensors}
        out[g.name] = {
            "tensors": g.tensors,
            "measured": sum(w[n] * d[n] for n in g.tensors),
            "predicted": sum(d.values()),
            "saved": sum(by[n].options[-1].nbytes - by[n].options[0].nbytes for n in g.tensors),
        }
    return out


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_budget_spent_on_the_group_of_largest_damage_per_byte(m: dict[str, Any], budget: int) -> None:
    w = _weights(m["sens"])
    ex = FakeEvaluator(m["sens"], w)
    _, base = _calibrate(m, CFG, ex)
    n_groups = len(ex.labels)
    ex.labels.clear()
    exp = _expected(m, w)
    per_byte = {g: e["measured"] / e["saved"] for g, e in exp.items() if len(e["tensors"]) > 1}
    first = max(per_byte, key=lambda g: per_byte[g])
    _, rep = _calibrate(m, replace_refine(CFG, budget), ex)
    assert rep.evaluated_now == len(ex.labels) == len(rep.refined) == budget  # only the new probes ran
    assert rep.evaluations == n_groups + budget and base.evaluated_now == n_groups
    assert rep.splits[0] == first
    assert [r.parent for r in rep.refined[:2]] == [first] * min(2, budget)
    for r in rep.refined:
        assert r.damage_per_byte == pytest.approx(r.measured / r.saved_bytes)
    json.dumps(rep.to_json())
    assert tuple(rep.to_json()["splits"]) == rep.splits


def replace_refine(cfg: GroupConfig, n: int) -> GroupConfig:
    from dataclasses import replace

    return replace(cfg, refine_evaluations=n)


def test_budget_above_what_can_split(m: dict[str, Any]) -> None:
    ex = FakeEvaluator(m["sens"], _weights(m["sens"]))
    names = [t.name for t in m["sens"].tensors]
    parts = sum(len(g.tensors) for g in groups_of(m["cache"].info, names, 1) if len(g.tensors) > 1)
    _, rep = _calibrate(m, replace_refine(CFG, 1000), ex)
    assert len(rep.refined) == parts  # each group of both blocks splits into its two layers, then stops
    assert len(set(rep.splits)) == len(rep.splits) == parts // 2
    _, four = _calibrate(m, replace_refine(GroupConfig(n_buckets=4, pairs=0), 5), ex)
    assert four.refined == () and four.splits == ()  # each group one tensor on the tiny model: no split


def test_refined_tensor_ratio_is_its_own_others_keep_the_parent(m: dict[str, Any]) -> None:
    w = _weights(m["sens"])
    ex = FakeEvaluator(m["sens"], w)
    scaled, rep = _calibrate(m, replace_refine(CFG, 3), ex)
    exp = _expected(m, w)
    by, out = {t.name: t for t in m["sens"].tensors}, {t.name: t for t in scaled.tensors}
    refined = {n: r for r in rep.refined for n in r.tensors}
    assert len(refined) == 3
    ratio_of = {g.name: g.ratio for g in rep.groups}
    for g, e in exp.items():
        group_ratio = e["measured"] / e["predicted"]
        assert ratio_of[g] == pytest.approx(group_ratio, rel=1e-9)  # none floored: every weight is ≥ 1
        for n in e["tensors"]:
            want = w[n] if n in refined else group_ratio
            if n in refined:
                assert refined[n].ratio == pytest.approx(w[n], rel=1e-9) and refined[n].parent == g
            for o, s in zip(by[n].options, out[n].options, strict=True):
                assert s.error == pytest.approx(o.error * want, rel=1e-9), n


class Killed(Exception):
    pass


def test_resume_does_not_evaluate_finished_probes(m: dict[str, Any]) -> None:
    w = _weights(m["sens"])
    cfg = replace_refine(CFG, 4)
    want_scaled, want = _calibrate(m, cfg, FakeEvaluator(m["sens"], w))
    for p in m["cache"].directory.glob("groups-*.json"):
        p.unlink()
    n_groups = want.evaluations - 4
    ex = FakeEvaluator(m["sens"], w)

    def kill(done: int, total: int) -> None:
        assert total == want.evaluations
        if done >= n_groups + 2:  # two of the four refined probes saved
            raise Killed

    with pytest.raises(Killed):
        _calibrate(m, cfg, ex, progress=kill)
    finished = set(ex.labels)
    ex.labels.clear()
    scaled, rep = _calibrate(m, cfg, ex)
    assert rep.evaluated_now == len(ex.labels) == 2 and not finished & set(ex.labels)
    assert scaled == want_scaled and rep.refined == want.refined and rep.splits == want.splits
    ex.labels.clear()
    _, again = _calibrate(m, cfg, ex)
    assert again.evaluated_now == 0 and ex.labels == []
    _, smaller = _calibrate(m, replace_refine(CFG, 2), ex)  # a smaller budget: the first two, none run
    assert smaller.evaluated_now == 0 and smaller.refined == want.refined[:2]


def test_budget_zero_is_the_calibration_without_refinement(m: dict[str, Any]) -> None:
    w = _weights(m["sens"])
    ex = FakeEvaluator(m["sens"], w)
    scaled, rep = _calibrate(m, CFG, ex)
    d = rep.to_json()
    keys = {"config", "reference_kld", "groups", "pairs", "evaluations", "seconds", "evaluated_now",
            "seconds_now", "lent", "pair_mean_abs_relative_error"}
    assert set(d) == keys and set(d["config"]) == {"n_buckets", "probe_bpw", "pairs", "floor", "chunks"}
    factors = {n: g.ratio for g in rep.groups for n in g.tensors}
    assert scaled == m["sens"].scaled(factors)  # each tensor its group's ratio, as before refinement
    _calibrate(m, replace_refine(CFG, 6), ex)  # the state file now holds refined probes too
    again_scaled, again = _calibrate(m, CFG, ex)
    assert again_scaled == scaled and again.evaluations == rep.evaluations and again.refined == ()
    strip = lambda r: {k: v for k, v in r.to_json().items() if k not in ("seconds_now", "evaluated_now")}  # noqa: E731
    assert json.dumps(strip(again)) == json.dumps(strip(rep))


def test_refined_probes_score_real_files(m: dict[str, Any]) -> None:
    """Through llama.cpp: two refined probes after the groups, each a layer of the group split first."""
    _, base = calibrate_sensitivity(m["sens"], m["cache"], m["cache"].info.path, m["text"], ECFG, OPTS, CFG)
    _, rep = calibrate_sensitivity(m["sens"], m["cache"], m["cache"].info.path, m["text"], ECFG, OPTS,
                                   replace_refine(CFG, 2))
    assert rep.evaluated_now == 2 and rep.evaluations == base.evaluations + 2
    saved = {g.name: sum(t.options[-1].nbytes - t.options[0].nbytes for t in m["sens"].tensors
                         if t.name in g.tensors) for g in base.groups}
    per_byte = {g.name: (g.measured or 0.0) / saved[g.name] for g in base.groups if len(g.tensors) > 1}
    assert rep.splits == (max(per_byte, key=lambda k: per_byte[k]),)
    assert {r.parent for r in rep.refined} == set(rep.splits)
    for r in rep.refined:
        assert r.kld == pytest.approx(rep.reference_kld + r.measured) and r.kld > 0


# -- the request --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, match", [
    (["--refine-probes", "-1"], "must be at least 0"),
    (["--refine-probes", "4", "--sensitivity", "proxy"], "this run's sensitivity is proxy"),
    (["--refine-probes", "4", "--method", "uniform"], "this run's sensitivity is none"),
])
def test_cli_refuses_refinement_it_cannot_make(
    extra: list[str], match: str, tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    from test_cli_errors import one_error_line
    from typer.testing import CliRunner

    from ramp_cpp.cli.app import app

    out = tmp_path / "run"
    args = ["search", "--model", str(tiny_model), "--out", str(out), "--method", "greedy", "--size", "1MiB",
            "--text", str(text_file), *extra]
    one_error_line(CliRunner().invoke(app, args), match)
    assert not out.exists()


def test_run_settings_name_the_budget_only_when_set(tiny_model: Path, tmp_path: Path) -> None:
    from ramp_cpp.pipeline.folddecision import Fold
    from ramp_cpp.pipeline.plan import run_settings
    from ramp_cpp.pipeline.request import SizedRequest

    def groups(gcfg: GroupConfig) -> dict[str, Any]:
        req = SizedRequest(tiny_model, tmp_path, "greedy", "1MiB", gcfg=gcfg)
        return dict(run_settings(req, "measured", Fold.ON)["kld_groups"])

    before = {"n_buckets": 4, "probe_bpw": None, "pairs": 3, "floor": 0.01}  # a run.json made before it
    assert groups(GroupConfig()) == before
    assert groups(GroupConfig(refine_evaluations=16)) == {**before, "refine_evaluations": 16}


def test_search_refine_probes_end_to_end(text_file: Path, tmp_path: Path) -> None:
    """`search --refine-probes 2` on a model of 5 blocks (search's 4 depth buckets: one group of two blocks
    per role): two refined probes in the report and in run.json."""
    from typer.testing import CliRunner

    from ramp_cpp.cli.app import app
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.measure.candidates import CandidateConfig, parse_types
    from ramp_cpp.pipeline.plan import size_range

    types, tiny_model = "Q4_0,Q5_0,Q8_0", synthetic.write(tmp_path / "m.gguf", synthetic.Spec(n_layer=5))
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig(types=parse_types(types)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    out = tmp_path / "run"
    args = ["search", "--model", str(tiny_model), "--out", str(out), "--method", "greedy", "--size",
            str((lo + hi) // 2), "--types", types, "--text", str(text_file), "--chunks", "2", "--ctx", "64",
            "--recipe", str(recipe), "--fold", "off", "--threads", "1", "--refine-probes", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    groups = json.loads((out / "report.json").read_text())["summary"]["kld_groups"]
    assert groups["config"]["refine_evaluations"] == 2 and len(groups["refined"]) == 2
    assert groups["evaluations"] == 1 + sum(g["measured"] is not None for g in groups["groups"]) + 2
    assert {x["parent"] for x in groups["refined"]} <= set(groups["splits"])
    assert json.loads((out / "run.json").read_text())["kld_groups"]["refine_evaluations"] == 2


@pytest.mark.parametrize(("method", "budget", "buckets"), [
    ("greedy-measured", 0, 4), ("greedy-measured-refine16", 16, 4), ("greedy-measured-refine32", 32, 4),
    ("greedy-measured-b3-refine8-portable", 8, 3),
])
def test_bench_variant_names_the_refine_budget(method: str, budget: int, buckets: int) -> None:
    from bench import compare

    g = compare.group_config(method)
    assert (g.refine_evaluations, g.n_buckets) == (budget, buckets)
    with pytest.raises(SystemExit, match="unknown option 'refinex'"):
        compare.group_config("greedy-measured-refinex")
