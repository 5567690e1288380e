"""Issue 37's calibration size and text study without a model: the study's recipes load as written, the
built text `mixed-code-prose` is the same bytes every time and holds code and prose (never the held-out
text), the benchmark keeps a non-default recipe's calibration apart from the default's (whose paths stay
as they were), and the study's summary of fabricated cells."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import compare
from ramp_cpp.calibration.artifact import CalibConfig, Calibration, save_calibration
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import InputStats
from ramp_cpp.store import texts


@pytest.mark.parametrize(
    "name,text,samples",
    [("bench", "wikitext2-valid", 16), ("bench-32", "wikitext2-valid", 32),
     ("bench-64", "wikitext2-valid", 64), ("bench-mixed", "mixed-code-prose", 16)],
)
def test_the_studys_recipes_load_as_written(name, text, samples):
    from ramp_cpp.calibration.collect import check_config, load_recipe

    cfg = load_recipe(name)
    assert cfg == CalibConfig(text=text, samples=samples, ctx=512, seed=0)
    check_config(cfg)  # none is the held-out text


# -- the built text ---------------------------------------------------------------------------------------

PROSE = "".join(
    f" = Article {i} = \n \n The {i} th article , about <unk> and prose , runs on for a while . \n \n"
    f" = = Section {i} = = \n \n More words of article {i} . \n"
    for i in range(6)
)


@pytest.fixture
def fake_valid(tmp_path, monkeypatch):
    """A data folder holding only a fabricated wikitext2-valid, first in the search order; every file the
    texts module reads is recorded."""
    f = tmp_path / "data" / texts.CORPORA["wikitext2-valid"].relpath
    f.parent.mkdir(parents=True)
    f.write_text(PROSE)
    monkeypatch.setenv("RAMP_DATA_DIR", str(tmp_path / "data"))
    read: list[Path] = []
    real = texts._read

    def recording(path: Path) -> str:
        read.append(Path(path))
        return real(path)

    monkeypatch.setattr(texts, "_read", recording)
    return read


def test_the_mixed_text_is_the_same_bytes_every_time_and_kept_under_its_sha(fake_valid):
    a, kept = texts.load_text("mixed-code-prose")
    b, kept2 = texts.load_text("mixed-code-prose")
    assert a == b and kept == kept2
    sha = hashlib.sha256(a.encode("utf-8")).hexdigest()
    assert Path(kept).name == f"mixed-code-prose-{sha[:12]}.txt"
    assert Path(kept).read_bytes() == a.encode("utf-8")
    assert not list(Path(kept).parent.glob("*.tmp*"))  # written whole


def test_the_mixed_text_holds_code_and_prose_and_never_reads_the_held_out_text(fake_valid):
    text, _ = texts.load_text("mixed-code-prose")
    held_out = texts.CORPORA["wikitext2-test"].relpath
    assert not [p for p in fake_valid if p.as_posix().endswith(held_out)]
    assert any(p.as_posix().endswith(texts.CORPORA["wikitext2-valid"].relpath) for p in fake_valid)
    # every fabricated article, whole, and standard-library code
    for i in range(6):
        assert f" = Article {i} = \n \n The {i} th article" in text
    assert "def " in text and "import " in text
    # the first code file follows the first article: the halves alternate
    assert text.index(" = Article 1 = ") > text.index("def ")


@pytest.mark.parametrize(
    "prose,code,want",
    [
        # blocks of equal size alternate, prose first, until a half runs out: the other's rest is dropped
        (" = A = \na\n = B = \nb\n", ["c1 = 1234\n"] * 3, " = A = \na\nc1 = 1234\n = B = \nb\n"),
        # a long code file is followed by prose until prose has given as much
        (" = A = \na\n = B = \nb\n = C = \nc\n", ["x" * 20 + "\n", "y\n"], " = A = \na\n" + "x" * 20 + "\n"
         " = B = \nb\n = C = \nc\n"),
        # sub-headings do not split an article; a block without a final newline gets one
        (" = A = \n = = s = = \na\n = B = \nb", ["c"], " = A = \n = = s = = \na\nc\n"),
    ],
)
def test_mix_takes_whole_blocks_from_the_half_that_has_given_less(prose, code, want):
    assert texts.mix(prose, code) == want


def test_a_missing_standard_library_module_is_one_clear_error():
    with pytest.raises(RampError, match="no source of the standard library's no_such_module"):
        texts.stdlib_sources(["no_such_module"])


# -- the benchmark keeps recipes apart ---------------------------------------------------------------------


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    """compare.prepare on a fake base: calibrations are made by a stand-in that records its calls."""
    monkeypatch.setattr(compare, "HERE", tmp_path)
    monkeypatch.setattr(compare, "base_path", lambda key, base, seed: tmp_path / f"{key}-{base}.gguf")
    monkeypatch.setattr(compare, "load_text", lambda spec: (f"the text {spec}", spec))
    made: list[CalibConfig] = []

    def fake_calibrate(path, text, cfg):
        made.append(cfg)
        return _cal(cfg)

    monkeypatch.setattr(compare, "calibrate", fake_calibrate)
    return tmp_path, made


def _cal(cfg: CalibConfig) -> Calibration:
    s = InputStats(max_abs=np.ones(4, np.float32), sum_sq=np.ones(4), count=cfg.samples * cfg.ctx)
    return Calibration("m.gguf", "0" * 64, "llama", cfg, cfg.samples * cfg.ctx, {"blk.0.attn_q.weight": s})


def test_the_default_recipe_keeps_its_paths_and_finds_an_existing_calibration(bench_home):
    home, made = bench_home
    base = home / "out" / "m" / "offgrid-s0"
    cfg = CalibConfig(samples=16, ctx=512)
    base.mkdir(parents=True)
    save_calibration(_cal(cfg), base / "calib-16x512-s0.safetensors")  # made before this change
    for recipe in ("bench", str(Path(compare.__file__).parent.parent / "calib" / "bench.toml")):
        b = compare.prepare("m", "offgrid", 0, recipe)
        assert b.out == base and b.cal.config == cfg
        assert b.recipe == {"recipe": "bench", "calib": {"text": "wikitext2-valid", "samples": 16, "ctx": 512,
                                                         "seed": 0}}  # no seconds: not made here
    assert made == []
    assert compare.prepare("m", "dequant", 0, "bench").out == home / "out" / "m" / "dequant"


@pytest.mark.parametrize("recipe,file", [("bench-32", "calib-32x512-s0"), ("bench-64", "calib-64x512-s0"),
                                         ("bench-mixed", "calib-16x512-s0")])
def test_another_recipe_gets_its_own_folder_calibration_and_folded_copies(bench_home, recipe, file):
    home, made = bench_home
    default = compare.prepare("m", "offgrid", 0, "bench")
    b = compare.prepare("m", "offgrid", 0, recipe)
    assert b.out == default.out / f"recipe-{recipe}"
    assert (b.out / f"{file}.safetensors").is_file()
    assert [c.samples for c in made] == [16, b.cal.config.samples]  # the default's, then the recipe's own
    assert b.recipe["recipe"] == recipe and b.recipe["calib"]["text"] == b.cal.config.text
    want = hashlib.sha256(f"the text {b.cal.config.text}".encode()).hexdigest()
    assert b.recipe["calib_text_sha256"] == want and b.recipe["calib_seconds"] >= 0
    again = compare.prepare("m", "offgrid", 0, recipe)  # found, not made again
    assert len(made) == 2 and again.recipe == b.recipe


def test_a_calibration_of_another_recipe_under_the_same_name_is_refused(bench_home, tmp_path):
    home, _ = bench_home
    r = tmp_path / "x" / "bench-32.toml"
    r.parent.mkdir()
    r.write_text('text = "notes.txt"\nsamples = 32\nctx = 512\n')
    compare.prepare("m", "offgrid", 0, "bench-32")
    with pytest.raises(SystemExit, match="two recipes of one name"):
        compare.prepare("m", "offgrid", 0, str(r))


@pytest.mark.parametrize("script,argv,why", [
    ("run", ["m", "--recipe", "bench-64"], "bench.compare --results"),
    ("compare", ["smollm2", "--recipe", "bench-mixed"], "a --results FOLDER of their own"),
])
def test_another_recipe_never_writes_into_the_benchmarks_results_file(monkeypatch, script, argv, why):
    import importlib

    mod = importlib.import_module(f"bench.{script}")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(mod, "executor_of", lambda a: pytest.fail("no executor before the recipe check"))
    with pytest.raises(SystemExit, match=why):
        mod.main()


# -- the study's summary ---------------------------------------------------------------------------------


def _row(**kw):
    return {"mib": 80.0, "file_bytes": 84_000_000, "kld_stderr": 0.001, "kld_p99": 0.5, **kw}


def test_the_calibsize_summary_compares_each_recipe_with_the_default_and_dashes_what_has_not_run():
    from bench.studies import calibsize

    fold = compare.Fold(0.5)
    k = calibsize.key
    cells = {
        "bench": {k(compare.Fold(None), "preset+imatrix", "Q4_K_M", 16): _row(kld_mean=0.10),
                  k(fold, "greedy-measured", "Q4_K_M", 16): _row(kld_mean=0.04, proxy_error=12.5,
                                                                 predicted_kld=0.03)},
        "bench-64": {
            k(compare.Fold(None), "preset+imatrix", "Q4_K_M", 16): _row(kld_mean=0.09, calib_seconds=121.4),
            k(fold, "greedy-measured", "Q4_K_M", 16): _row(kld_mean=0.03, proxy_error=14.0,
                                                           predicted_kld=0.025, calib_seconds=121.4),
        },
        "bench-mixed": {},
    }
    s = calibsize.summary(cells, ["Q4_K_M", "Q3_K_M"], fold, 16)
    assert [s[r]["tokens"] for r in cells] == [8192, 32768, 8192]
    assert s["bench-mixed"]["text"] == "mixed-code-prose"
    q4 = s["bench-64"]["sizes"]["Q4_K_M"]
    assert q4["greedy-measured_over_bench"] == pytest.approx(0.75)
    assert q4["preset+imatrix_over_bench"] == pytest.approx(0.9)
    assert s["bench"]["sizes"]["Q4_K_M"]["greedy-measured_over_bench"] == pytest.approx(1.0)
    assert s["bench-64"]["sizes"]["Q3_K_M"]["greedy-measured"] is None
    rows = [x for x in calibsize.markdown({"m": s}, fold, 16).splitlines() if x.startswith("| m |")]
    assert len(rows) == 6
    assert rows[0] == ("| m | bench | 8,192 | Q4_K_M | 80.00 | 0.1000 | 1.000 | 0.0400 ± 0.0010 | 0.500 | "
                       "1.000 | 12.5 | 0.0300 | - |")
    assert rows[2] == ("| m | bench-64 | 32,768 | Q4_K_M | 80.00 | 0.0900 | 0.900 | 0.0300 ± 0.0010 | "
                       "0.500 | 0.750 | 14 | 0.0250 | 121 |")
    assert rows[5] == "| m | bench-mixed | 8,192 | Q3_K_M | - | - | - | - | - | - | - | - | - |"


def test_the_study_runs_each_recipes_missing_cells_at_the_default_recipes_sizes(tmp_path, monkeypatch):
    """With the default recipe's cells stored, only the other recipe's four cells run, each greedy at the
    default's preset bytes, into its own results folder; nothing of the default's is run again."""
    from types import SimpleNamespace

    from bench.studies import calibsize

    monkeypatch.setattr(compare, "HERE", tmp_path)
    monkeypatch.setattr(calibsize, "BENCH", tmp_path)
    k, fold = calibsize.key, compare.Fold(0.5)
    default = compare.Results("m")
    for s, size in (("Q4_K_M", 1000), ("Q3_K_M", 800)):
        default.put(k(compare.Fold(None), "preset+imatrix", s, 16), _row(kld_mean=0.1, file_bytes=size))
        default.put(k(fold, "greedy-measured", s, 16), _row(kld_mean=0.05, proxy_error=1.0))
    monkeypatch.setattr(calibsize, "prepare",
                        lambda key, base, seed, r: compare.Base(key, base, seed, tmp_path, None, tmp_path))
    monkeypatch.setattr(calibsize, "warm", lambda *a: None)
    monkeypatch.setattr(calibsize, "executor_of", lambda a: SimpleNamespace(close=lambda: None))
    ran: list[compare.Cell] = []
    monkeypatch.setattr(calibsize, "fan_out", lambda ex, cells: ran.extend(cells) or [{} for _ in cells])
    calibsize.run("m", ["bench", "bench-32"], ["Q4_K_M", "Q3_K_M"], fold, 16, SimpleNamespace())
    where = str(tmp_path / "results" / "calib-bench-32")
    assert {(c.recipe, c.results) for c in ran} == {("bench-32", where)}
    assert {(c.kind, c.preset, c.fold, c.target) for c in ran} == {
        ("preset", "Q4_K_M", None, 0), ("preset", "Q3_K_M", None, 0),
        ("alloc", "Q4_K_M", 0.5, 1000), ("alloc", "Q3_K_M", 0.5, 800),
    }


@pytest.mark.parametrize("types,filled", [({"Q4_K": 2}, True), ({"Q4_K": 1, "Q5_K": 1}, False)])
def test_stored_errors_are_filled_in_only_from_the_same_allocation(tmp_path, monkeypatch, types, filled):
    from gguf import GGMLQuantizationType as T

    from bench.studies import calibsize

    monkeypatch.setattr(compare, "HERE", tmp_path)
    fold = compare.Fold(0.5)
    res = compare.Results("m")
    cell = calibsize.key(fold, "greedy-measured", "Q4_K_M", 16)
    res.put(cell, _row(kld_mean=0.05, types=types))
    choice = {"a.weight": T.Q4_K, "b.weight": T.Q4_K}
    monkeypatch.setattr(calibsize, "allocation",
                        lambda b, m, target, f: (choice, None, {"proxy_error": 3.0, "predicted_kld": 0.02}))
    calibsize.fill_errors(res, None, ["Q4_K_M"], {"Q4_K_M": 1000}, fold, 16)
    row = compare.Results("m").get(cell)
    assert (row.get("proxy_error"), row.get("predicted_kld")) == ((3.0, 0.02) if filled else (None, None))
    assert row["kld_mean"] == 0.05
