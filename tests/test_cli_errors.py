"""CLI of features / search / paper-search / apply: output on good input, one `error:` line and exit 2 on bad
input; an option of the other search is no option of this one."""

from __future__ import annotations

from pathlib import Path

from test_features import fake_calibration
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import save_calibration
from ramp_cpp.cli.app import app

runner = CliRunner()


def one_error_line(r: object, match: str) -> None:
    res = r  # click.testing.Result
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    lines = [x for x in res.output.splitlines() if x.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], res.output  # type: ignore[attr-defined]


def test_features_table_and_csv(tiny_model: Path, tmp_path: Path) -> None:
    cal = save_calibration(fake_calibration(tiny_model, 3.0), tmp_path / "c.safetensors")
    r = runner.invoke(app, ["features", str(tiny_model), "--calib", str(cal), "--features", "paper"])
    assert r.exit_code == 0, r.output
    assert "2 of 9 static dims are constant or saturated" in r.output
    r = runner.invoke(app, ["features", str(tiny_model), "--calib", str(cal), "--csv"])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("tensor,depth,log_in") and len(lines) == 15


def test_features_bad_calibration(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "c.safetensors"
    bad.write_bytes(b"nonsense")
    one_error_line(runner.invoke(app, ["features", str(tiny_model), "--calib", str(bad)]), "calibration")


def test_paper_search_budget_out_of_range(tiny_model: Path, tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["paper-search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--budget", "2"]
    )
    one_error_line(r, "feasible range")


def no_such_option(r: object, option: str) -> None:
    """click's refusal of an option the command does not have: exit 2, naming it."""
    assert r.exit_code == 2 and "No such option" in r.output and option in r.output, r.output  # type: ignore[attr-defined]


def test_search_bad_options(tiny_model: Path, tmp_path: Path) -> None:
    paper = ["paper-search", "--model", str(tiny_model), "--out", str(tmp_path / "r")]
    one_error_line(runner.invoke(app, [*paper, "--metric", "bleu"]), "unknown metric")
    one_error_line(runner.invoke(app, [*paper, "--bits", "3,x"]), "--bits")
    one_error_line(runner.invoke(app, [*paper, "--bits", "3,7"]), "bit-widths")
    none = ["paper-search", "--out", str(tmp_path / "none")]
    one_error_line(runner.invoke(app, none), "--model is required")
    one_error_line(runner.invoke(app, [*paper, "--resume"]), "no run to resume")
    one_error_line(runner.invoke(app, [*paper, "--text", "wikitext2-test"]), "held out")
    one_error_line(runner.invoke(app, [*paper, "--fold", "check"]), "paper-search takes on or off")
    no_such_option(runner.invoke(app, [*paper, "--size", "1MiB"]), "--size")
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r")]
    one_error_line(runner.invoke(app, [*base, "--size", "huge"]), "--size")
    one_error_line(runner.invoke(app, [*base, "--size", "1MiB", "--text", "wikitext2-test"]), "held out")
    no_such_option(runner.invoke(app, [*base, "--size", "1MiB", "--budget", "5"]), "--budget")
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "--size" in r.output  # the whole-file search needs its size
    assert not (tmp_path / "r").exists()


def test_apply_bad_policy(tiny_model: Path, tmp_path: Path) -> None:
    pol = tmp_path / "p.safetensors"
    pol.write_bytes(b"\x00" * 100)
    out = tmp_path / "o.gguf"
    one_error_line(
        runner.invoke(app, ["apply", str(pol), str(tiny_model), "-o", str(out)]), "not a ramp-cpp policy"
    )
    assert not out.exists()


def test_rollouts_only_for_the_sized_sac_search(tiny_model: Path, tmp_path: Path) -> None:
    """--rollouts shapes SAC's rounds: refused, before any work, where no sized SAC search runs."""
    out = ["--model", str(tiny_model), "--out", str(tmp_path / "r")]
    greedy = ["search", *out, "--method", "greedy", "--size", "1MiB"]
    one_error_line(runner.invoke(app, [*greedy, "--rollouts", "2"]), "--rollouts applies to --method sac")
    paper = ["paper-search", *out, "--budget", "4.5", "--rollouts", "2"]
    no_such_option(runner.invoke(app, paper), "--rollouts")
    r = runner.invoke(app, ["search", *out, "--size", "1MiB", "--rollouts", "0"])
    assert r.exit_code == 2 and "--rollouts" in r.output
    assert not (tmp_path / "r").exists()
