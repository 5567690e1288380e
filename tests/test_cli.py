from __future__ import annotations

import json
from pathlib import Path

import pytest
import synthetic
from typer.testing import CliRunner

from ramp_cpp.cli.app import app

runner = CliRunner()


def _ok(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + r.stderr
    return r.stdout


def _fails(args: list[str], match: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert match in lines[0], lines[0]


def test_inspect_json(tiny_model: Path) -> None:
    d = json.loads(_ok(["inspect", str(tiny_model), "--json"]))
    assert d["arch"] == "llama" and d["n_blocks"] == 2 and d["tied_output"] is False
    assert {t["role"] for t in d["tensors"]} >= {"attn_q", "ffn_down", "token_embd", "output"}


def test_quantize_map_and_eval(tiny_model: Path, tmp_path: Path) -> None:
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"blk.0.attn_q.weight": "Q6_K", "blk.1.ffn_down.weight": "Q3_K"}))
    out = tmp_path / "q.gguf"
    d = json.loads(
        _ok(["quantize", str(tiny_model), "-o", str(out), "--types", str(m), "--base", "Q4_0", "--json"])
    )
    types = {t["name"]: t["ggml_type"] for t in d["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert d["n_fallback"] >= 1
    text = tmp_path / "t.txt"
    text.write_text(synthetic.text())
    e = json.loads(
        _ok(
            [
                "eval",
                str(out),
                "--text",
                str(text),
                "--kld",
                "--base",
                str(tiny_model),
                "--ppl",
                "--ctx",
                "128",
                "--chunks",
                "2",
                "--json",
            ]
        )
    )
    assert e["kld"]["kld_mean"] > 0 and e["ppl"]["n_chunks"] == 2
    assert e["kld"]["ppl"] == pytest.approx(e["ppl"]["ppl"], rel=1e-5)


def test_bad_inputs(tiny_model: Path, tmp_path: Path) -> None:
    _fails(["inspect", str(tmp_path / "missing.gguf")], "no such file")
    notg = tmp_path / "n.gguf"
    notg.write_text("hello")
    _fails(["inspect", str(notg)], "not a GGUF")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:100_000])
    _fails(["inspect", str(cut)], "truncated")
    q8 = tmp_path / "q8.gguf"
    _ok(["quantize", str(tiny_model), "-o", str(q8), "--preset", "Q8_0"])
    _fails(["quantize", str(q8), "-o", str(tmp_path / "x.gguf"), "--preset", "Q4_0"], "already quantized")
    _fails(["quantize", str(tiny_model), "-o", str(q8), "--preset", "Q8_0"], "exists")
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"blk.0.attn_q.weight": "Q9_K"}))
    _fails(
        ["quantize", str(tiny_model), "-o", str(tmp_path / "x.gguf"), "--types", str(m)], "unknown ggml type"
    )
    m.write_text(json.dumps({"blk.7.attn_q.weight": "Q4_K"}))
    args = ["quantize", str(tiny_model), "-o", str(tmp_path / "x.gguf"), "--types", str(m)]
    _fails(args, "not a weight tensor")
    m.write_text("{not json")
    _fails(["quantize", str(tiny_model), "-o", str(tmp_path / "x.gguf"), "--types", str(m)], "not valid JSON")
    short = tmp_path / "short.txt"
    short.write_text("the city")
    _fails(["eval", str(tiny_model), "--text", str(short), "--ctx", "128"], "text too short")
    _fails(["eval", str(tiny_model), "--text", "wikitext9"], "unknown text")
    _fails(["eval", str(tiny_model), "--kld"], "--kld needs --base")
    assert not (tmp_path / "x.gguf").exists()
