"""`--types portable` (issue 36 item 4): the named set holds the K-quants and the legacy types and no IQ type;
a run on it writes no IQ type anywhere in its file, the never-worse rule included; a measurement of the
full set is cut to the subset (the same rows a fresh measurement gives) and its group probes lend the files
both sets share (the same ratios as probing afresh)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from test_cli_errors import one_error_line
from test_sized_run import cfg
from typer.testing import CliRunner

from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import DEFAULT_TYPES, TYPE_SETS, CandidateConfig, parse_types
from ramp_cpp.model.ladder import is_portable
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import run_direct

runner = CliRunner()
PORTABLE = TYPE_SETS["portable"].types
#: the set the issue names, written out by hand
NAMED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def test_the_portable_set_has_no_iq_type_and_every_k_and_legacy_type() -> None:
    iq = [t for t in T if t.name.startswith("IQ")]
    assert len(iq) >= 9 and not set(iq) & set(PORTABLE)
    assert {t.name for t in PORTABLE} == set(NAMED)
    assert TYPE_SETS["full"].types == DEFAULT_TYPES and set(PORTABLE) < set(DEFAULT_TYPES)


@pytest.mark.parametrize(
    ("t", "portable"),
    [(T.Q4_0, True), (T.Q8_0, True), (T.Q6_K, True), (T.F16, True), (T.F32, True), (T.BF16, True),
     (T.IQ4_NL, False), (T.IQ4_XS, False), (T.IQ2_XXS, False), (T.IQ1_S, False), (T.TQ1_0, False),
     (T.MXFP4, False), (T.Q8_K, False), (T.I8, False)],
)
def test_which_types_are_portable(t: T, portable: bool) -> None:
    assert is_portable(t) is portable


@pytest.mark.parametrize(
    ("spec", "want"),
    [("portable", PORTABLE), (" Portable ", PORTABLE), ("full", DEFAULT_TYPES), ("FULL", DEFAULT_TYPES),
     ("Q4_K,Q8_0", (T.Q4_K, T.Q8_0))],
)
def test_parse_types_takes_a_named_set_or_a_list(spec: str, want: tuple[T, ...]) -> None:
    assert parse_types(spec) == want


@pytest.mark.parametrize(
    ("types", "base", "portable"),
    [(PORTABLE, T.Q8_0, True), (DEFAULT_TYPES, T.Q8_0, False), ((T.Q4_K, T.Q8_0), T.Q8_0, True),
     (PORTABLE, T.IQ4_NL, False), ((T.IQ4_XS, T.Q8_0), T.Q8_0, False)],
)
def test_a_candidate_set_is_portable_when_its_types_and_base_are(types: tuple[T, ...], base: T,
                                                                  portable: bool) -> None:
    assert CandidateConfig(types=types, base=base).portable is portable


def test_a_bad_set_name_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(RampError, match="a named set: full, portable"):
        parse_types("portabel")
    base = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--method", "greedy"]
    one_error_line(runner.invoke(app, [*base, "--size", "1MiB", "--types", "portabel"]), "portabel")
    assert not (tmp_path / "r").exists()


def _types(gguf: Path) -> set[str]:
    return {t.tensor_type.name for t in GGUFReader(gguf).tensors}


@pytest.fixture(scope="module")
def pair(tiny_model: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A measured greedy run on the full set, then one on the portable set sharing its cache root, at a size
    both reach; and the portable run alone, in a cache of its own."""
    d = tmp_path_factory.mktemp("portable")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig(types=PORTABLE))
    size = f"{(3 * lo + hi) / 4 / 1024:.1f}KiB"

    def run(name: str, types: tuple[T, ...], cache: str) -> Any:
        return run_direct(SizedRequest(tiny_model, d / name, "greedy", size, cfg(text_file), presets=(),
                                       sensitivity="measured", cc=CandidateConfig(types=types),
                                       cache_root=d / cache))

    return {"full": run("full", DEFAULT_TYPES, "shared"), "portable": run("portable", PORTABLE, "shared"),
            "alone": run("alone", PORTABLE, "own"), "root": d}


def test_a_portable_run_writes_no_iq_type(pair: dict[str, Any]) -> None:
    full, port = pair["full"], pair["portable"]
    assert {"IQ4_XS", "IQ4_NL"} & _types(full.gguf)  # the full set uses them at this size
    written = _types(port.gguf)
    assert written and all(is_portable(T[n]) for n in written), written
    assert not any(n.startswith("IQ") for n in written)


def test_the_portable_run_cuts_the_full_measurement_and_borrows_its_shared_probes(
    pair: dict[str, Any],
) -> None:
    """Reference: the same run alone (its own cache: measured and probed afresh) allocates and writes the
    same file; the shared cache measured nothing for it and lent it the probes both sets have in common."""
    port, alone, root = pair["portable"], pair["alone"], pair["root"]
    assert port.gguf.read_bytes() == alone.gguf.read_bytes()
    cut = [json.loads(p.read_text()) for p in root.glob("shared/**/measure-*.json")]
    assert sorted(bool(d.get("cut_from")) for d in cut) == [False, True]
    (own,) = [json.loads(p.read_text()) for p in root.glob("own/**/measure-*.json")]
    (sub,) = [d for d in cut if d.get("cut_from")]
    assert sub["rows"] == own["rows"] and sub["key"] == own["key"]  # the rows a fresh measurement makes
    g_port = json.loads(port.report.read_text())["summary"]["kld_groups"]
    g_alone = json.loads(alone.report.read_text())["summary"]["kld_groups"]
    assert g_alone["lent"] == 0 and g_port["lent"] >= 2  # the reference and ffn_down (Q2_K in both sets)
    assert g_port["evaluated_now"] == g_alone["evaluated_now"] - g_port["lent"]
    assert [g["ratio"] for g in g_port["groups"]] == [g["ratio"] for g in g_alone["groups"]]


@pytest.mark.parametrize(
    ("types", "written", "barred"),
    [(PORTABLE, "allocation", ("IQ4_NL", "IQ4_XS")), (DEFAULT_TYPES, "preset", ())],
)
def test_never_worse_ships_no_iq_preset_for_a_portable_run(
    types: tuple[T, ...], written: str, barred: tuple[str, ...], tiny_model: Path, tmp_path: Path
) -> None:
    """An allocation that scores worse than `--size IQ4_XS`'s preset: the full set's run ships the preset's
    file; the portable run keeps its own (the preset's holds IQ types), unchanged, and says why."""
    from types import SimpleNamespace

    from ramp_cpp.llama.quantize import quantize_map
    from ramp_cpp.pipeline.neverworse import never_worse
    from ramp_cpp.pipeline.stages import Written

    out = tmp_path / "out.gguf"
    quantize_map(tiny_model, out, {}, base="Q8_0")
    before = out.read_bytes()
    plan = SimpleNamespace(cc=CandidateConfig(types=types), preset="IQ4_XS", force_allocation=False, gpu=None,
                           cfg=SimpleNamespace(imatrix=False), model_path=tiny_model, info=None)
    presets = SimpleNamespace(scored={"IQ4_XS": {"quality": 0.01, "ppl": 10.0}})
    rt = SimpleNamespace(opts=SimpleNamespace(n_threads=1))
    v = never_worse(plan, Written(out, {}, {}), SimpleNamespace(kld_mean=0.5, ppl=12.0), presets, None, rt)
    assert (v.written, v.barred, v.worse) == (written, barred, True)
    if barred:
        assert out.read_bytes() == before and "--types portable rules out" in (v.note or "")
        assert v.to_json()["preset_types_barred"] == list(barred)
        assert not list(tmp_path.glob(".*tmp*"))  # the preset's temp file is gone
    else:
        assert {"IQ4_XS", "IQ4_NL"} <= _types(out)


def test_search_types_portable_from_the_command_line(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig(types=PORTABLE))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    out = tmp_path / "run"
    r = runner.invoke(app, ["search", "--model", str(tiny_model), "--out", str(out), "--method", "greedy",
                            "--size", str((3 * lo + hi) // 4), "--types", "portable",
                            "--sensitivity", "proxy", "--text", str(text_file), "--chunks", "2",
                            "--ctx", "64", "--recipe", str(recipe), "--threads", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (gguf,) = out.glob("*.ramp-*.gguf")
    written = _types(gguf)
    assert written & {"Q4_0", "Q2_K", "Q3_K"} and all(is_portable(T[n]) for n in written), written
    assert json.loads((out / "run.json").read_text())["candidates"]["types"] == list(NAMED)


def test_apply_types_portable(tiny_model: Path, text_file: Path, policy: Path, tmp_path: Path) -> None:
    """A sized policy (the shipped across-3-proxy) rolls out on the portable set: no IQ type in its file; a
    --budget policy (the paper's ladder: no IQ type anyway) refuses --types in one line."""
    sized = Path(__file__).resolve().parents[1] / "policies" / "across-3-proxy.policy.safetensors"
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig(types=PORTABLE))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    out = tmp_path / "o.gguf"
    r = runner.invoke(app, ["apply", str(sized), str(tiny_model), "-o", str(out),
                            "--size", str((lo + hi) // 2), "--types", "portable", "--text", str(text_file),
                            "--recipe", str(recipe), "--threads", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    written = _types(out)
    assert written & {"Q4_0", "Q4_K", "Q5_0"} and all(is_portable(T[n]) for n in written), written
    one_error_line(
        runner.invoke(app, ["apply", str(policy), str(tiny_model), "-o", str(tmp_path / "b.gguf"), "--budget",
                            "4.5", "--types", "portable"]),  # fmt: skip
        "--types apply to a sized one",
    )
    assert not (tmp_path / "b.gguf").exists()
