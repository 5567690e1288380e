"""Every command that takes a model takes what `search` takes, through the one resolver (cli/modelarg.py,
llama/inputs.py): a split GGUF's first shard gives what the unsplit file gives, command by command; a folder
that is no Hugging Face checkpoint, or a split set missing a shard, fails in one line, exit 2, nothing
written. (A real checkpoint's
conversion is slow: test_convert.py runs it for inspect, quantize, eval, search and apply.)"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import splitgguf
from gguf import GGUFReader
from safetensors.numpy import load_file
from test_features import fake_calibration
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import save_calibration
from ramp_cpp.cli.app import COMMANDS, app
from ramp_cpp.llama.quantize import quantize_preset

runner = CliRunner()
POLICY = Path(__file__).resolve().parents[1] / "policies" / "across-3-proxy.policy.safetensors"


@dataclass(frozen=True)
class Inputs:
    whole: Path  # the synthetic model, one file
    split: Path  # its first shard of three
    text: Path
    fake_cal: Path  # statistics of the right shapes, for the commands that check names and widths only
    q8: Path  # the whole model at Q8_0: a model to score against a --base


@pytest.fixture(scope="module")
def x(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    d = tmp_path_factory.mktemp("inputs")
    shards = splitgguf.split(tiny_model, d / "tiny.f16.gguf", 3)
    cal = save_calibration(fake_calibration(tiny_model, 3.0), d / "fake.safetensors")
    quantize_preset(tiny_model, d / "tiny.q8.gguf", "Q8_0")
    return Inputs(tiny_model, shards[0], text_file, cal, d / "tiny.q8.gguf")


def _run(args: list[str]) -> Any:
    r = runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, (args, r.output)
    return r


#: keys that name the input or time the run: all that may differ between the set and the one file
NAMING = {"model", "path", "seconds", "tokens_per_second", "output"}


def _json(r: Any, out: Path) -> Any:
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(w) for k, w in v.items() if k not in NAMING}
        return [strip(w) for w in v] if isinstance(v, list) else v

    return strip(json.loads(r.stdout))


def _tensors(name: str) -> Callable[[Any, Path], Any]:
    """The written GGUF's tensors (name, type, shape, sha256 of the bytes); its metadata may name the
    source."""

    def get(r: Any, out: Path) -> Any:
        g = GGUFReader(out / name)
        return [(t.name, int(t.tensor_type), list(t.shape), hashlib.sha256(bytes(t.data)).hexdigest())
                for t in g.tensors]  # fmt: skip

    return get


def _calibration(r: Any, out: Path) -> Any:
    """The statistics (the header names the model and its hash)."""
    return {k: v.tolist() for k, v in sorted(load_file(out / "cal.safetensors").items())}


def _stdout(r: Any, out: Path) -> Any:
    return r.stdout


@dataclass(frozen=True)
class Case:
    args: Callable[[str, Path, Inputs], list[str]]  # (model, output folder, inputs) -> the command line
    result: Callable[[Any, Path], Any]  # what must be the same from the set as from the one file


CASES: dict[str, Case] = {
    "inspect": Case(lambda m, o, x: ["inspect", m, "--json"], _json),
    "eval": Case(lambda m, o, x: ["eval", m, "--text", str(x.text), "--ctx", "64", "--chunks", "2",
                                  "--threads", "1", "--json"], _json),  # fmt: skip
    "eval --base": Case(lambda m, o, x: ["eval", str(x.q8), "--kld", "--base", m, "--text", str(x.text),
                                         "--ctx", "64", "--chunks", "2", "--threads", "1", "--json"],
                        _json),  # fmt: skip
    "calibrate": Case(lambda m, o, x: ["calibrate", m, "-o", str(o / "cal.safetensors"),
                                       "--text", str(x.text), "--samples", "2", "--ctx", "32",
                                       "--threads", "1"],
                      _calibration),  # fmt: skip
    # measure takes only a calibration of its own input (by hash): the one calibrate just wrote
    "measure": Case(lambda m, o, x: ["measure", m, "--calib", str(o / "cal.safetensors"),
                                     "--types", "Q4_K,Q8_0", "--cache-dir", str(o / "cache"),
                                     "--threads", "1", "--json"],
                    _json),  # fmt: skip
    "fold": Case(lambda m, o, x: ["fold", m, "--calib", str(x.fake_cal), "-o", str(o / "f.gguf")],
                 _tensors("f.gguf")),  # fmt: skip
    "offgrid": Case(lambda m, o, x: ["offgrid", m, "-o", str(o / "g.gguf")], _tensors("g.gguf")),
    "pad": Case(lambda m, o, x: ["pad", m, "-o", str(o / "p.gguf")], _tensors("p.gguf")),
    "upcycle": Case(lambda m, o, x: ["upcycle", m, "-o", str(o / "u.gguf"), "--experts", "2"],
                    _tensors("u.gguf")),  # fmt: skip
    "features": Case(lambda m, o, x: ["features", m, "--calib", str(x.fake_cal), "--csv"], _stdout),
    "quantize": Case(lambda m, o, x: ["quantize", m, "-o", str(o / "q.gguf"), "--preset", "Q4_K_M"],
                     _tensors("q.gguf")),  # fmt: skip
}


@pytest.fixture(scope="module")
def results(x: Inputs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case run on the one file and on the set, in CASES' order (measure reads calibrate's output)."""
    got: dict[str, dict[str, Any]] = {"whole": {}, "split": {}}
    for kind, model in (("whole", x.whole), ("split", x.split)):
        out = tmp_path_factory.mktemp(kind)
        for name, case in CASES.items():
            got[kind][name] = case.result(_run(case.args(str(model), out, x)), out)
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_a_split_input_gives_what_the_one_file_gives(results: dict[str, dict[str, Any]], name: str) -> None:
    assert results["split"][name] == results["whole"][name]
    assert results["whole"][name]  # something was compared


#: every command with a model argument, and a command line that gives it a bad input as that argument
EVERY: dict[str, Callable[[str, Path, Inputs], list[str]]] = {
    **{name: case.args for name, case in CASES.items()},
    "search": lambda m, o, x: ["search", "--model", m, "--size", "Q4_K_M", "--out", str(o / "run")],
    "paper-search": lambda m, o, x: ["paper-search", "--model", m, "--out", str(o / "run")],
    "apply": lambda m, o, x: ["apply", str(POLICY), m, "--size", "Q4_K_M", "-o", str(o / "a.gguf")],
}


def _no_config_json(x: Inputs, d: Path) -> Path:
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "model.safetensors").write_bytes(b"")
    return d / "checkpoint"


def _shard_missing(x: Inputs, d: Path) -> Path:
    shards = splitgguf.split(x.whole, d / "m.gguf", 3)
    shards[1].unlink()
    return shards[0]


#: a bad input, made in a folder, and what its one line says
BAD: dict[str, tuple[Callable[[Inputs, Path], Path], str]] = {
    "folder without config.json": (_no_config_json, "no config.json: not a Hugging Face checkpoint folder"),
    "split set missing a shard": (_shard_missing, "split set of 3 is missing m-00002-of-00003.gguf"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(EVERY))
def test_a_bad_input_fails_in_one_line(x: Inputs, tmp_path: Path, name: str, bad: str) -> None:
    make, expect = BAD[bad]
    given = make(x, tmp_path)
    (out := tmp_path / "out").mkdir()
    r = runner.invoke(app, EVERY[name](str(given), out, x), env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 2, r.output
    lines = [s for s in r.output.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.output
    assert not list(out.iterdir())  # refused before any work


def test_every_command_that_takes_a_model_is_in_the_tables() -> None:
    """A command added with a model argument is tested here too (eval's --base: the case "eval --base")."""
    takes = {n for n, fn in COMMANDS if {"model", "base"} & set(inspect.signature(fn).parameters)}
    assert takes == {n.split()[0] for n in EVERY}
    assert takes >= {"eval", "calibrate", "measure", "fold", "inspect", "pad", "upcycle", "features",
                     "paper-search", "offgrid", "search", "apply", "quantize"}  # fmt: skip


def test_apply_writes_beside_the_checkpoint_folder_not_into_the_cache(
    x: Inputs, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply POLICY FOLDER` without -o: FOLDER.ramp-BUDGET.gguf beside FOLDER, the name `search` gives it
    in its run folder; the conversion's cache folder gets nothing. The conversion is stood in for by a copy
    of the synthetic model where convert.py keeps one (test_convert.py converts a real checkpoint)."""
    import shutil

    from ramp_cpp.llama import inputs

    folder = tmp_path / "users" / "tiny-ck"
    folder.mkdir(parents=True)
    cached = tmp_path / "cache" / "converted" / "0123456789abcdef" / "tiny-ck.f16.gguf"
    cached.parent.mkdir(parents=True)
    shutil.copy(x.whole, cached)
    monkeypatch.setattr(inputs, "convert_checkpoint", lambda d, progress=None: cached)
    cal = save_calibration(fake_calibration(cached, 3.0), tmp_path / "c.safetensors")
    r = _run(["apply", str(policy), str(folder), "--calib", str(cal), "--threads", "1"])
    assert (tmp_path / "users" / "tiny-ck.ramp-4.25.gguf").is_file(), r.output
    assert sorted(p.name for p in cached.parent.iterdir()) == ["tiny-ck.f16.gguf"]
    # a GGUF's default stays beside the GGUF
    r = _run(["apply", str(policy), str(cached), "--calib", str(cal), "--threads", "1"])
    assert (cached.parent / "tiny-ck.ramp-4.25.gguf").is_file(), r.output
