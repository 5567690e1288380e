from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import synthetic
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from ramp_cpp.calibration.artifact import CalibConfig, Calibration, save_calibration
from ramp_cpp.calibration.collect import calibrate, windows
from ramp_cpp.cli.app import app
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map
from ramp_cpp.measure import sensitivity, tensorcache
from ramp_cpp.measure.candidates import DEFAULT_TYPES, CandidateConfig, searched_tensors
from ramp_cpp.measure.proxy import MeasureConfig, measure
from ramp_cpp.measure.sensitivity import Option, Sensitivity, undominated
from ramp_cpp.measure.tensorcache import build_cache
from ramp_cpp.write.assemble import assemble

#: (model, imatrix): an untied head quantized with the calibration's imatrix, a tied one without
CASES = {"untied": (synthetic.Spec(), True), "tied": (synthetic.Spec(tied=True, seed=1), False)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("measure")
    text = d / "calib.txt"
    text.write_text(synthetic.text())
    out: dict[str, Any] = {"root": d / "cache", "text": text}
    for k, (spec, with_im) in CASES.items():
        model = synthetic.write(d / f"{k}.f16.gguf", spec)
        cal = calibrate(model, text.read_text(), CalibConfig(text=str(text), samples=4, ctx=64))
        im = cal.imatrix() if with_im else None
        sens = measure(model, cal, im, cache_root=out["root"])
        out[k] = {"model": model, "cal": cal, "im": im, "sens": sens}
    yield out


def _frequencies(model: Path, cal: Calibration, text: str, n_rows: int) -> np.ndarray:
    """The calibration's windows (calibrate's own protocol) counted per token."""
    with LlamaModel(model, RuntimeOptions(n_ctx=64)) as m:
        ws = windows(m.tokenize(text), cal.config, m.bos if m.add_bos else None)
    ids = np.concatenate(ws)
    assert ids.size == cal.n_tokens
    return np.bincount(ids, minlength=n_rows) / ids.size


@pytest.mark.parametrize("case", list(CASES))
def test_proxy_error_is_a_direct_dequantize_of_quantize_map_output(
    case: str, setup: dict[str, Any], tmp_path: Path
) -> None:
    """Every option's bytes and error, recomputed in float64 from llama.cpp's own file for that type (read
    by gguf-py) and the calibration: E[x²]-weighted columns for the linears and the untied head, token
    frequencies for token_embd (plus the head's E[x²] when tied)."""
    c = setup[case]
    sens: Sensitivity = c["sens"]
    cal: Calibration = c["cal"]
    info = read_inventory(c["model"])
    assert [t.name for t in sens.tensors] == [t.name for t in searched_tensors(info)]
    assert sens.tensors[0].name == "token_embd.weight"
    assert (sens.tensors[-1].name == "output.weight") == (case == "untied")
    src = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(c["model"]).tensors}
    emb = info.tensor("token_embd.weight")
    freqs = _frequencies(c["model"], cal, setup["text"].read_text(), emb.n_rows)
    head = "token_embd.weight" if case == "tied" else "output.weight"
    assert head in cal.stats

    def mean_sq(name: str) -> np.ndarray:
        return cal.stats[name].sum_sq / cal.stats[name].count

    checked = 0
    for t in DEFAULT_TYPES:
        names = [x.name for x in sens.tensors if t in {o.ggml_type for o in x.options}]
        if not names:
            continue
        ref = tmp_path / f"{t.name}.gguf"
        quantize_map(c["model"], ref, {n: t for n in names}, opts=QuantizeOptions(imatrix=c["im"]))
        reader = GGUFReader(ref)
        by_name = {x.name: x for x in reader.tensors}
        for x in sens.tensors:
            if x.name not in names:
                continue
            rt = by_name[x.name]
            assert T(int(rt.tensor_type)) == t
            w_hat = dequantize(np.asarray(rt.data), t).astype(np.float64)
            d2 = (src[x.name] - w_hat.reshape(src[x.name].shape)) ** 2
            if x.name == "token_embd.weight":
                want = float(d2.sum(axis=1) @ freqs)
                if case == "tied":
                    want += float(d2.sum(axis=0) @ mean_sq(head))
            else:
                want = float(d2.sum(axis=0) @ mean_sq(x.name))
            o = x.option(t)
            assert o.error == pytest.approx(want, rel=1e-5), (x.name, t.name)
            assert o.nbytes == -(-int(rt.n_bytes) // reader.alignment) * reader.alignment
            checked += 1
        ref.unlink()
    assert checked >= 3 * len(sens.tensors)  # the frontiers are not trivially short


def test_errors_fall_with_bits_and_dominated_types_are_dropped(setup: dict[str, Any]) -> None:
    for case in CASES:
        sens: Sensitivity = setup[case]["sens"]
        for x in sens.tensors:
            assert undominated(x.options) == x.options
            nb = [o.nbytes for o in x.options]
            assert nb == sorted(set(nb))  # equal-bytes types (IQ4_NL, Q4_0, Q4_K on 256 rows): one kept
            assert x.options[-1].ggml_type == T.Q8_0
        q = next(x for x in sens.tensors if x.name == "blk.0.attn_q.weight")  # rows of 256: the K-quants
        have = {o.ggml_type for o in q.options}
        kq = [q.option(t).error for t in (T.Q3_K, T.Q5_K, T.Q6_K, T.Q8_0) if t in have]
        assert len(kq) >= 3 and kq == sorted(kq, reverse=True)


#: option tables (bytes, error) -> what survives
DOMINANCE = [
    ([(10, 5.0), (20, 3.0), (30, 1.0)], [(10, 5.0), (20, 3.0), (30, 1.0)]),
    ([(10, 5.0), (20, 6.0), (30, 1.0)], [(10, 5.0), (30, 1.0)]),  # more bytes, more error
    ([(10, 5.0), (20, 5.0), (30, 1.0)], [(10, 5.0), (30, 1.0)]),  # more bytes, no lower error
    ([(20, 2.0), (20, 3.0), (10, 4.0)], [(10, 4.0), (20, 2.0)]),  # equal bytes: the lower error
    ([(20, 2.0), (20, 2.0)], [(20, 2.0)]),
    ([(10, 0.0), (30, 0.0)], [(10, 0.0)]),
]


@pytest.mark.parametrize(("table", "want"), DOMINANCE)
def test_undominated(table: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    labels = [T.Q2_K, T.Q3_K, T.Q4_K]
    opts = [Option(labels[i], nb, e) for i, (nb, e) in enumerate(table)]
    assert [(o.nbytes, o.error) for o in undominated(opts)] == want


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("embeddings", [True, False], ids=["embeddings", "linears"])
def test_file_bytes_equal_the_assembled_and_written_file(
    case: str, embeddings: bool, setup: dict[str, Any], tmp_path: Path
) -> None:
    """Sensitivity.file_bytes(choice) is the size of the file of that choice, header and padding included."""
    c = setup[case]
    sens: Sensitivity = c["sens"]
    if not embeddings:
        cfg = MeasureConfig(candidates=CandidateConfig(embeddings=False))
        sens = measure(c["model"], c["cal"], c["im"], cfg, cache_root=setup["root"])
        assert not {x.name for x in sens.tensors} & {"token_embd.weight", "output.weight"}
    cache = build_cache(
        c["model"], DEFAULT_TYPES, setup["root"], imatrix=c["im"], searched=[x.name for x in sens.tensors]
    )
    rng = np.random.default_rng(1)
    choices = [{x.name: x.options[0].ggml_type for x in sens.tensors}]
    choices.append({x.name: x.options[-1].ggml_type for x in sens.tensors})
    for _ in range(3):
        choices.append({x.name: x.options[rng.integers(len(x.options))].ggml_type for x in sens.tensors})
    for i, choice in enumerate(choices):
        r = assemble(cache, choice, tmp_path / f"a{i}.gguf")
        assert r.file_size == (tmp_path / f"a{i}.gguf").stat().st_size == sens.file_bytes(choice)
    assert sens.file_bytes(choices[0]) == sens.min_bytes() and sens.file_bytes(choices[1]) == sens.max_bytes()
    q = quantize_map(c["model"], tmp_path / "q.gguf", choices[-1], opts=QuantizeOptions(imatrix=c["im"]))
    assert q.file_size == sens.file_bytes(choices[-1])
    assert (tmp_path / "q.gguf").read_bytes() == (tmp_path / f"a{len(choices) - 1}.gguf").read_bytes()


def test_resumes_after_a_kill_and_reuses_a_finished_measurement(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = setup["untied"]
    root = tmp_path / "cache"
    cfg = MeasureConfig(save_every=2)
    seen: list[tuple[int, int]] = []

    class Killed(Exception):
        pass

    def dies_at_5(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 5:
            raise Killed

    with pytest.raises(Killed):
        measure(c["model"], c["cal"], c["im"], cfg, root, progress=dies_at_5)
    total = len(c["sens"].tensors)
    assert seen == [(i, total) for i in range(1, 6)]
    (state,) = root.glob("*/measure-*.json")
    assert len(json.loads(state.read_text())["rows"]) == 4  # saved every 2 tensors; the 5th was lost
    seen.clear()
    again = measure(c["model"], c["cal"], c["im"], cfg, root, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(i, total) for i in range(5, total + 1)]  # only what was not saved is measured again
    assert again == c["sens"]  # and the result is the uninterrupted run's

    def no_cache(*a: Any, **k: Any) -> Any:
        raise AssertionError("a finished measurement needs no tensor cache")

    monkeypatch.setattr(tensorcache, "build_cache", no_cache)
    seen.clear()
    reused = measure(c["model"], c["cal"], c["im"], cfg, root, progress=lambda d, n: seen.append((d, n)))
    assert reused == again and seen == []
    # another key (no imatrix) is another measurement
    with pytest.raises(AssertionError, match="no tensor cache"):
        measure(c["model"], c["cal"], None, cfg, root)


def test_save_load_round_trip_and_refusals(setup: dict[str, Any], tmp_path: Path) -> None:
    sens: Sensitivity = setup["tied"]["sens"]
    p = sensitivity.save(sens, tmp_path / "s.json")
    back = sensitivity.load(p)
    assert back == sens and back.calibration_digest and back.candidate_types == DEFAULT_TYPES
    assert back.imatrix_digest is None and back.base == T.Q8_0 and back.ladder == "types"
    with pytest.raises(RampError, match="exists"):
        sensitivity.save(sens, p)
    d = json.loads(p.read_text())
    unsorted = json.loads(p.read_text())
    unsorted["tensors"][0]["options"].reverse()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(unsorted))
    for path, text, match in (
        (bad, None, "not sorted"),
        (tmp_path / "x.json", "{", "not JSON"),
        (tmp_path / "y.json", '{"kind": "other"}', "not a ramp-cpp sensitivity"),
        (tmp_path / "z.json", json.dumps({**d, "format": 99}), "format 99"),
        (tmp_path / "w.json", json.dumps({k: v for k, v in d.items() if k != "base"}), "damaged"),
        (tmp_path / "none.json", "", "no such file"),
    ):
        if text is not None and path.name != "none.json":
            path.write_text(text)
        with pytest.raises(RampError, match=match):
            sensitivity.load(path)
    assert len(list(tmp_path.iterdir())) == 6  # nothing but the files written here


def test_refusals_before_any_quantization(setup: dict[str, Any], tmp_path: Path) -> None:
    u, t = setup["untied"], setup["tied"]
    root = tmp_path / "cache"
    with pytest.raises(RampError, match="measured on tied.f16.gguf"):
        measure(u["model"], t["cal"], None, cache_root=root)
    no_head = replace(t["cal"], stats={k: v for k, v in t["cal"].stats.items() if k != "token_embd.weight"})
    with pytest.raises(RampError, match="no statistics"):
        measure(t["model"], no_head, None, cache_root=root)
    only_k = MeasureConfig(candidates=CandidateConfig(types=(T.Q4_K, T.Q6_K)))
    with pytest.raises(RampError, match="no candidate type fits its rows of 384"):
        measure(u["model"], u["cal"], None, only_k, root)
    with pytest.raises(RampError, match="no such file"):
        measure(tmp_path / "missing.gguf", u["cal"], None, cache_root=root)
    assert not root.exists()
    # without embeddings a K-quant-only set is fine where the embeddings' rows would not be
    lin = MeasureConfig(candidates=CandidateConfig(types=(T.Q4_K, T.Q8_0), embeddings=False))
    s = measure(u["model"], u["cal"], None, lin, root)
    assert {o.ggml_type for x in s.tensors for o in x.options} <= {T.Q4_K, T.Q8_0}


# -- CLI ------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_measure(setup: dict[str, Any], tmp_path: Path) -> None:
    u, t = setup["untied"], setup["tied"]
    calib = save_calibration(u["cal"], tmp_path / "u.safetensors")
    other = save_calibration(t["cal"], tmp_path / "t.safetensors")
    base = ["measure", str(u["model"]), "--cache-dir", str(setup["root"])]
    r = runner.invoke(app, [*base, "--calib", str(calib), "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    d = json.loads(r.stdout)
    s = u["sens"]  # the module's measurement, reused from the cache
    assert (d["tensors"], d["min_bytes"], d["max_bytes"]) == (len(s.tensors), s.min_bytes(), s.max_bytes())
    assert d["options"] == sum(len(t.options) for t in s.tensors) and d["model"] == str(u["model"])
    bad = [
        (["--calib", str(tmp_path / "nope.safetensors")], "no such file"),
        (["--calib", str(other)], "measured on tied.f16.gguf"),
        (["--calib", str(calib), "--types", "Q4_K,Q9_X"], "unknown ggml type"),
        (["--calib", str(calib), "--ladder", "rungs"], "unknown ladder"),
        (["--calib", str(u["model"])], "not a ramp-cpp calibration"),
    ]
    for args, match in bad:
        r = runner.invoke(app, [*base, *args])
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], (args, r.stderr)
