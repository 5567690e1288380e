"""The demo's pipeline on the synthetic model and the names of what it writes: a search under a real-world
file name (presets quantized with the unfolded calibration's imatrix, the report's unquantized line, output
names that keep the model's dots), `demo --evaluations N` then `demo` resuming its own run, the demo table,
the presets with and without the run's imatrix, and `apply`'s default output name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_paper_search import small
from typer.testing import CliRunner

from ramp_cpp.allocate.sac.agent import SACConfig
from ramp_cpp.cli.app import app
from ramp_cpp.llama import quantize
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions
from ramp_cpp.pipeline.paper.run import search

runner = CliRunner()

# -- a search on the synthetic model under a real-world file name --------------------------------------


@pytest.fixture(scope="module")
def named_run(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """search() on a copy of the tiny model named like a real download, with quantize_preset spied on."""
    d = tmp_path_factory.mktemp("named")
    model = d / "Syn2.5-0.1B-Instruct.F16.gguf"
    shutil.copy(tiny_model, model)
    seen: list[tuple[Path, str, Any]] = []
    real = quantize.quantize_preset

    def spy(src: Any, dst: Any, preset: str, opts: Any = QuantizeOptions(), progress: Any = None) -> Any:
        seen.append((Path(src), preset, opts.imatrix))
        return real(src, dst, preset, opts, progress)

    sac = SACConfig(episodes=3, warmup_episodes=2, updates_per_episode=2, batch_size=32, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "quantize_preset", spy)
        res = search(model, d / "run", small(text_file), sac, presets=("Q4_K_M",))
    return res, seen, model


def test_presets_get_the_unfolded_calibrations_imatrix(named_run: Any) -> None:
    """llama.cpp's presets quantize the unfolded model, so their imatrix is E[x^2] of x, not x/s."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.fold.folding import folded_calibration_from_file

    res, seen, model = named_run
    [(src, preset, im)] = seen
    assert (src, preset) == (model, "Q4_K_M") and im is not None
    cal = load_calibration(res.run_dir / "calib.safetensors")  # measured on the unfolded model
    folded = folded_calibration_from_file(cal, res.run_dir / "folded.f16.gguf")
    searched = [t.name for t in read_inventory(model).searched]
    for name in searched:
        st = cal.stats[name]
        np.testing.assert_allclose(im[name], st.sum_sq / st.count, rtol=1e-6)
    assert any(  # the check can fail: folding moved E[x^2]
        not np.allclose(folded.stats[n].sum_sq / folded.stats[n].count, im[n], rtol=1e-3) for n in searched
    )


def test_report_draws_the_unquantized_line(named_run: Any) -> None:
    """The meta the search writes makes every quality plot draw the base model's line."""
    from ramp_cpp.pipeline.report import plot_best_so_far, plot_pareto, plot_training

    res = named_run[0]
    report = json.loads((res.run_dir / "report.json").read_text())
    meta, log = report["meta"], res.state.log
    points = [{"label": "x", "file_bytes": 1e6, "quality": 30.0, "kind": "preset"}]
    figs = [plot_training(log, meta), plot_best_so_far(log, meta), plot_pareto(points, "ppl", meta)]
    for fig in figs:
        lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "unquantized"]
        assert len(lines) == 1, fig
        y = np.asarray(lines[0].get_ydata(), dtype=float)
        assert np.all(y == y[0]) and np.isfinite(y[0]) and y[0] > 1.0  # a perplexity


@pytest.mark.parametrize(
    "name, stem",
    [
        ("Qwen2.5-0.5B-Instruct.f16.gguf", "Qwen2.5-0.5B-Instruct"),
        ("SmolLM2-135M-Instruct.F16.gguf", "SmolLM2-135M-Instruct"),
        ("Llama-3.1-8B.bf16.gguf", "Llama-3.1-8B"),
        ("gemma-3-270m.F32.GGUF", "gemma-3-270m"),
        ("qwen-1.5b.gguf", "qwen-1.5b"),
        ("model.Q8_0.gguf", "model.Q8_0"),
        ("v1.5-f16.gguf", "v1.5-f16"),
        ("phi-2.f16", "phi-2"),
        ("/some/dir.f16/m.gguf", "m"),
        ("tiny", "tiny"),
    ],
)
def test_model_stem(name: str, stem: str) -> None:
    """Strip a trailing .gguf and one trailing precision tag, nothing else."""
    from ramp_cpp.fold.source import model_stem, ramp_output_name

    assert model_stem(name) == stem
    assert ramp_output_name(name, "5.5") == f"{stem}.ramp-5.5.gguf"


def test_search_output_keeps_the_dots(named_run: Any) -> None:
    assert named_run[0].gguf.name == "Syn2.5-0.1B-Instruct.ramp-4.5.gguf"


# -- `demo --evaluations N` then `demo` resumes its own run -------------------------------------


def _synthetic_eval_text(monkeypatch: pytest.MonkeyPatch, text_file: Path) -> None:
    """The demo's held-out text, here the synthetic one (no wikitext in the test environment)."""
    import ramp_cpp.store.texts

    real = ramp_cpp.store.texts.load_text
    monkeypatch.setattr(
        ramp_cpp.store.texts,
        "load_text",
        lambda spec: (text_file.read_text(), "synthetic") if spec == "wikitext2-test" else real(spec),
    )


def test_demo_end_to_end_and_resume(
    tiny_model: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's real stages on the tiny model (its texts swapped for the synthetic one): the table has
    SAC, greedy and the presets; a second call with more evaluations resumes the search, it does not
    refuse it or start over."""
    import ramp_cpp.pipeline.demo
    from ramp_cpp.allocate.sac.search import CHECKPOINT, load_checkpoint

    model = tmp_path / "models" / "tiny.f16.gguf"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    from ramp_cpp.pipeline.sizedconfig import SIZED_FIELDS, SizedConfig

    paper = small(text_file)  # the same reward text, chunks and recipe, as the sized run reads them
    cfg = SizedConfig(**{f: getattr(paper, f) for f in SIZED_FIELDS if hasattr(paper, f)})  # fold_power: 0.5
    monkeypatch.setattr(ramp_cpp.pipeline.demo, "fetch_demo_base", lambda *a, **k: model)
    monkeypatch.setattr(ramp_cpp.pipeline.demo, "demo_config", lambda: cfg)
    _synthetic_eval_text(monkeypatch, text_file)
    logs = []
    for n in ("2", "3"):
        r = runner.invoke(app, ["demo", "--evaluations", n, "--chunks", "2"])
        assert r.exit_code == 0, r.output
        for label in ("RAMP (SAC)", "greedy", "Q4_K_M+imatrix", "Q3_K_M"):
            assert label in r.output
        _, st = load_checkpoint(model.parent / "demo-sac" / CHECKPOINT)
        assert st.evaluations <= int(n)
        logs.append([(x["kind"], x["kld"]) for x in st.log])
    assert logs[1][: len(logs[0]) - 1] == logs[0][:-1]  # the same search, gone on (its last row: the final)
    # a demo run left by another version (other settings) is started over, not refused
    settings = model.parent / "demo-sac" / "run.json"
    d = json.loads(settings.read_text())
    d["sac"]["span"] = 99.0
    settings.write_text(json.dumps(d))
    r = runner.invoke(app, ["demo", "--evaluations", "2", "--chunks", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(settings.read_text())["sac"]["span"] != 99.0


# -- the demo table ---------------------------------------------------------------------------------


def test_demo_table_fits_80_columns() -> None:
    import io

    from rich.console import Console

    from ramp_cpp.cli.demo import demo_table
    from ramp_cpp.pipeline.demo import DemoRow

    labels = ["RAMP", "Q4_K_M", "Q4_K_M+imatrix", "Q3_K_M", "Q3_K_M+imatrix"]
    long = Path("/home/someone/.cache/ramp-cpp/models/SmolLM2-135M-Instruct.Q4_K_M.imatrix.gguf")
    rows = [DemoRow(x, long, 123_456_789, 5.5012, 1234.5678, 23.617, 1.23456, 99.87) for x in labels]
    buf = io.StringIO()
    con = Console(file=buf, width=80, color_system=None)
    con.print(demo_table(rows, "wikitext2-test (held out), 4 chunks of 512; base PPL 23.617"))
    lines = buf.getvalue().splitlines()
    assert max(len(x) for x in lines) <= 80
    assert "…" not in buf.getvalue()
    header = next(x for x in lines if "MiB" in x)
    for col in ("file", "MiB", "bpw (file)", "PPL", "mean KLD", "same top %"):
        assert col in header
    body = [x for x in lines if any(f" {lab} " in x for lab in labels)]
    assert [next(lab for lab in sorted(labels, key=len, reverse=True) if lab in x) for x in body] == labels
    assert all("117.7" in x and "1234.568" in x and "1.2346" in x and "99.9" in x for x in body)


def test_demo_presets_with_and_without_the_runs_imatrix(
    named_run: Any, text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q4_K_M and Q3_K_M, each without and with the unfolded calibration's imatrix, named after the model,
    then compared on held-out text (here: the synthetic text)."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.llama.evaluate import EvalConfig
    from ramp_cpp.pipeline.demo import DemoFile, compare, preset_files

    res, _, model = named_run
    seen: list[Any] = []
    real = quantize.quantize_preset

    def spy(src: Any, dst: Any, preset: str, opts: Any = QuantizeOptions(), progress: Any = None) -> Any:
        seen.append(opts.imatrix)
        return real(src, dst, preset, opts, progress)

    monkeypatch.setattr(quantize, "quantize_preset", spy)
    files = preset_files(model, res.run_dir)
    assert [(f.label, f.path.name) for f in files] == [
        ("Q4_K_M", "Syn2.5-0.1B-Instruct.Q4_K_M.gguf"),
        ("Q4_K_M+imatrix", "Syn2.5-0.1B-Instruct.Q4_K_M.imatrix.gguf"),
        ("Q3_K_M", "Syn2.5-0.1B-Instruct.Q3_K_M.gguf"),
        ("Q3_K_M+imatrix", "Syn2.5-0.1B-Instruct.Q3_K_M.imatrix.gguf"),
    ]
    cal = load_calibration(res.run_dir / "calib.safetensors")
    assert seen[0] is None and seen[2] is None
    for im in (seen[1], seen[3]):
        st = cal.stats["blk.1.ffn_up.weight"]
        np.testing.assert_allclose(im["blk.1.ffn_up.weight"], st.sum_sq / st.count, rtol=1e-6)
    assert files[0].path.read_bytes() != files[1].path.read_bytes()
    rows = compare(
        [DemoFile("RAMP", res.gguf), *files], model, text_file.read_text(), EvalConfig(n_ctx=128, n_chunks=2)
    )
    assert [r.label for r in rows] == ["RAMP", "Q4_K_M", "Q4_K_M+imatrix", "Q3_K_M", "Q3_K_M+imatrix"]
    n_params = read_inventory(model).n_params_total
    for r in rows:
        assert r.bpw_file == pytest.approx(8 * r.path.stat().st_size / n_params)
        assert r.kld_mean > 0 and 0 < r.same_top_pct <= 100 and r.ppl > 1
    assert rows[3].file_bytes < rows[1].file_bytes  # Q3_K_M is smaller than Q4_K_M


def test_apply_default_output_name(tiny_model: Path, policy: Path, text_file: Path, tmp_path: Path) -> None:
    """Without -o the output is MODEL.ramp-BUDGET.gguf beside the model, dots kept."""
    model = tmp_path / "Syn2.5-0.1B.f16.gguf"
    shutil.copy(tiny_model, model)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    args = [
        "apply",
        str(policy),
        str(model),
        "--budget",
        "4.5",
        "--budget-mode",
        "nominal",
        "--recipe",
        str(recipe),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "Syn2.5-0.1B.ramp-4.5.gguf").is_file()
