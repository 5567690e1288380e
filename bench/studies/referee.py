"""llama.cpp's own tools as the referee of ramp-cpp's in-process PPL and KLD, and a generation smoke test.

.venv/bin/python -m bench.studies.referee MODEL.gguf [MODEL2.gguf ...] --base BASE.f16.gguf [--chunks 16]

Per model, on the held-out `wikitext2-test` written byte for byte to a temporary file:
  (a) `llama-perplexity -m MODEL -f TEXT -c 512 --chunks N`, its "Final estimate: PPL";
  (b) `ramp-cpp eval MODEL --ppl --ctx 512 --chunks N --json`: both PPLs must agree to 4 significant
      digits;
  (c) `llama-perplexity -m BASE --kl-divergence-base LOGITS.bin ...` once per base, then
      `llama-perplexity -m MODEL --kl-divergence --kl-divergence-base LOGITS.bin ...`, its "Mean KLD: x ± e",
      against `ramp-cpp eval MODEL --kld --base BASE --chunks N --json`;
  (d) `llama-completion -no-cnv -n 32 -p PROMPT`: exits 0 and prints text (llama-cli of this llama.cpp is a
      chat client of the embedded server, see bench/llama_tools.py).
Every command runs under `nice -n 10` with `--threads 2`, one at a time. Results go to
bench/results/referee.json (a finished (model, chunks) pair is skipped on a rerun) and referee.md, with the
exact commands; the tools' raw outputs go to bench/out/referee/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import llama_tools
from bench.paths import ROOT

ROOT = ROOT
RESULTS = ROOT / "bench" / "results"
RAW = ROOT / "bench" / "out" / "referee"
RAMP = ROOT / ".venv" / "bin" / "ramp-cpp"
PROMPT = "The capital of France is"
FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"

# -- parsers of llama-perplexity's output (tests/test_referee.py runs them on a captured output) -------------


def parse_final_ppl(out: str) -> tuple[float, float]:
    """(PPL, its uncertainty) from perplexity mode's "Final estimate: PPL = 21.1234 +/- 0.56789"."""
    m = re.search(rf"Final estimate: PPL = ({FLOAT}) \+/- ({FLOAT})", out)
    if not m:
        raise ValueError("no 'Final estimate: PPL = ...' line in llama-perplexity's output")
    return float(m.group(1)), float(m.group(2))


def parse_chunk_ppls(out: str) -> list[float]:
    """The running PPL after each chunk, "[1]19.1234,[2]20.5678,..." (a cheap check that N chunks ran)."""
    return [float(x) for x in re.findall(rf"\[(?:\d+)\]({FLOAT}),", out)]


# "Mean    KLD:   0.025412 ±   0.000321" and friends in the "KL divergence statistics" block
_KLD_LINES = {
    "ppl_q": r"Mean PPL\(Q\)\s*:",
    "ppl_base": r"Mean PPL\(base\)\s*:",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:",
    "kld_mean": r"Mean\s+KLD:",
    "rms_dp_pct": r"RMS Δp\s*:",
    "same_top_pct": r"Same top p:",
}
_KLD_SINGLE = {
    "kld_max": r"Maximum KLD:",
    "kld_p99": r"99\.0%\s+KLD:",
    "kld_p999": r"99\.9%\s+KLD:",
    "kld_median": r"Median\s+KLD:",
}


def parse_kld(out: str) -> dict[str, float]:
    """The summary of `--kl-divergence`: each value, and its printed uncertainty as `<name>_err`."""
    if "====== KL divergence statistics ======" not in out:
        raise ValueError("no 'KL divergence statistics' block in llama-perplexity's output")
    r: dict[str, float] = {}
    for k, pat in _KLD_LINES.items():
        m = re.search(rf"^{pat}\s*({FLOAT})\s*±\s*({FLOAT})", out, re.M)
        if not m:
            raise ValueError(f"no '{pat}' line in llama-perplexity's KLD output")
        r[k], r[f"{k}_err"] = float(m.group(1)), float(m.group(2))
    for k, pat in _KLD_SINGLE.items():
        m = re.search(rf"^{pat}\s*({FLOAT})", out, re.M)
        if not m:
            raise ValueError(f"no '{pat}' line in llama-perplexity's KLD output")
        r[k] = float(m.group(1))
    return r


def parse_chunks_line(out: str) -> tuple[int, int]:
    """(chunks, n_ctx) that llama-perplexity says it computes over (both modes print such a line)."""
    m = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)", out)
    if not m:
        raise ValueError("no 'over N chunks, n_ctx=C' line in llama-perplexity's output")
    return int(m.group(1)), int(m.group(2))


def agree_digits(a: float, b: float, digits: int = 4) -> bool:
    """|a - b| within half a unit of the `digits`-th significant digit of a: "the same to 4 digits" that
    does not flip on a rounding boundary (12.34499 vs 12.34501)."""
    if a == b:
        return True
    unit = 10.0 ** (math.floor(math.log10(abs(a))) - (digits - 1))
    return abs(a - b) <= 0.5 * unit


# -- running ----------------------------------------------------------------------------------------------


def _cmd_str(cmd: list[str]) -> str:
    return shlex.join(cmd)


def run(cmd: list[str], log: Path | None = None, timeout: float = 3600) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds); both streams also go to `log`."""
    print(f"$ {_cmd_str(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    dt = time.perf_counter() - t0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {_cmd_str(cmd)}\n# exit {r.returncode}, {dt:.1f} s\n{r.stdout}{r.stderr}")
    print(f"  exit {r.returncode} in {dt:.1f} s", file=sys.stderr, flush=True)
    return r.returncode, r.stdout, r.stderr, dt


def _check(rc: int, out: str, err: str, what: str) -> str:
    if rc != 0:
        raise SystemExit(f"error: {what} exited {rc}:\n" + "\n".join((out + err).splitlines()[-20:]))
    return out + err


def write_text(dst: Path) -> str:
    """The held-out text, byte for byte as the released file (what `llama-perplexity -f` must read)."""
    from ramp_cpp.store.texts import CORPORA, load_text

    body, source = load_text("wikitext2-test")
    data = body.encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    if sha != CORPORA["wikitext2-test"].sha256:
        raise SystemExit(f"error: {source} is not the released wiki.test.raw (sha256 {sha[:12]}...)")
    dst.write_bytes(data)
    return sha


class Referee:
    def __init__(self, a: argparse.Namespace, tmp: Path) -> None:
        self.a = a
        self.tmp = tmp
        self.text = tmp / "wiki.test.raw"
        self.text_sha = write_text(self.text)
        self.nice = ["nice", "-n", str(a.nice)] if a.nice else []
        self.lp = str(llama_tools.tool("llama-perplexity"))
        self.gen = str(llama_tools.tool("llama-completion"))
        self.common = ["-c", str(a.ctx), "--chunks", str(a.chunks), "--threads", str(a.threads)]
        self.logits: Path | None = None
        self.base_rec: dict[str, Any] = {}

    def _raw(self, model: Path, step: str) -> Path:
        return RAW / f"{model.stem}.c{self.a.chunks}.{step}.log"

    def ppl_llama(self, model: Path) -> dict[str, Any]:
        cmd = self.nice + [self.lp, "-m", str(model), "-f", str(self.text), *self.common]
        out = _check(*run(cmd, self._raw(model, "ppl"))[:3], "llama-perplexity")
        ppl, err = parse_final_ppl(out)
        n, ctx = parse_chunks_line(out)
        return {"cmd": _cmd_str(cmd), "ppl": ppl, "ppl_err": err, "chunks": n, "n_ctx": ctx}

    def _ramp(self, args: list[str], model: Path, step: str) -> tuple[dict[str, Any], str, float]:
        cmd = self.nice + [str(RAMP), "eval", str(model), *args, "--ctx", str(self.a.ctx)]
        cmd += ["--chunks", str(self.a.chunks), "--threads", str(self.a.threads), "--json"]
        rc, out, err, dt = run(cmd, self._raw(model, step))
        _check(rc, "", err, "ramp-cpp eval")
        return json.loads(out), _cmd_str(cmd), dt

    def base_logits(self) -> dict[str, Any]:
        """The base's log-probs for llama-perplexity's KLD, once per run (~25 MB per chunk of 512)."""
        if self.logits is None:
            self.logits = self.tmp / "base-logits.bin"
            base = Path(self.a.base)
            cmd = self.nice + [self.lp, "-m", str(base), "--kl-divergence-base", str(self.logits)]
            cmd += ["-f", str(self.text), *self.common]
            rc, out, err, dt = run(cmd, self._raw(base, "kld-base"))
            text = _check(rc, out, err, "llama-perplexity --kl-divergence-base")
            ppl, ppl_err = parse_final_ppl(text)
            self.base_rec = {"cmd": _cmd_str(cmd), "ppl": ppl, "ppl_err": ppl_err, "seconds": round(dt, 1)}
        return self.base_rec

    def kld_llama(self, model: Path) -> dict[str, Any]:
        self.base_logits()
        assert self.logits is not None
        cmd = self.nice + [self.lp, "-m", str(model), "--kl-divergence", "--kl-divergence-base"]
        cmd += [str(self.logits), "-f", str(self.text), *self.common]
        rc, out, err, dt = run(cmd, self._raw(model, "kld"))
        text = _check(rc, out, err, "llama-perplexity --kl-divergence")
        n, ctx = parse_chunks_line(text)
        return {"cmd": _cmd_str(cmd), **parse_kld(text), "chunks": n, "n_ctx": ctx, "seconds": round(dt, 1)}

    def generate(self, model: Path) -> dict[str, Any]:
        # greedy and seeded, so a rerun prints the same text; -no-cnv: plain completion, no chat template
        cmd = self.nice + [self.gen, "-m", str(model), "-no-cnv", "-n", str(self.a.n_predict), "-p", PROMPT]
        cmd += ["--temp", "0", "--seed", "0", "--no-display-prompt", "--threads", str(self.a.threads)]
        rc, out, err, dt = run(cmd, self._raw(model, "gen"), timeout=600)
        text = out.strip()
        return {
            "cmd": _cmd_str(cmd),
            "exit": rc,
            "text": text,
            "ok": rc == 0 and bool(text),
            "seconds": round(dt, 1),
        }

    def model(self, model: Path) -> dict[str, Any]:
        rec: dict[str, Any] = {"model": str(model), "chunks": self.a.chunks, "n_ctx": self.a.ctx}
        rec["threads"] = self.a.threads
        rec["base"] = str(self.a.base)
        rec["text_sha256"] = self.text_sha
        t0 = time.time()

        lp = self.ppl_llama(model)
        ours, cmd, dt = self._ramp(["--ppl"], model, "ramp-ppl")
        p = ours["ppl"]
        rec["ppl"] = {
            "llama_perplexity": lp,
            "ramp_cpp": {"cmd": cmd, "ppl": p["ppl"], "ppl_err": p["ppl_stderr"], "chunks": p["n_chunks"],
                         "n_tokens": p["n_tokens"], "seconds": round(dt, 1)},
            "rel_diff": (p["ppl"] - lp["ppl"]) / lp["ppl"],
            "agree_4_digits": agree_digits(lp["ppl"], p["ppl"]),
        }  # fmt: skip

        lk = self.kld_llama(model)
        ours, cmd, dt = self._ramp(["--kld", "--base", str(self.a.base)], model, "ramp-kld")
        k = ours["kld"]
        diff = k["kld_mean"] - lk["kld_mean"]
        rec["kld"] = {
            "base_logits": self.base_rec,
            "llama_perplexity": lk,
            "ramp_cpp": {"cmd": cmd, "kld_mean": k["kld_mean"], "kld_err": k["kld_stderr"],
                         "same_top_pct": k["same_top_pct"], "kld_p99": k["kld_p99"],
                         "kld_p999": k["kld_p999"], "ppl": k["ppl"], "base_ppl": k["base_ppl"],
                         "top_k": k["top_k"], "n_tokens": k["n_tokens"], "seconds": round(dt, 1)},
            "diff": diff,
            "rel_diff": diff / lk["kld_mean"],
            # in units of llama-perplexity's printed uncertainty of its own mean
            "diff_in_llama_err": diff / lk["kld_mean_err"] if lk["kld_mean_err"] > 0 else None,
        }  # fmt: skip

        rec["generation"] = self.generate(model)
        rec["seconds"] = round(time.time() - t0, 1)
        rec["tools"] = {"llama_perplexity": self.lp, "llama_completion": self.gen, "build": _build_info()}
        return rec


def _build_info() -> dict[str, Any]:
    p = llama_tools.tools_dir() / "build.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# -- results ----------------------------------------------------------------------------------------------


def load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def save(path: Path, recs: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(recs, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt_kld(x: float, e: float) -> str:
    return f"{x:.5f} ± {e:.5f}"


def markdown(recs: list[dict[str, Any]]) -> str:
    lines = [
        "# llama.cpp's own tools as the referee",
        "",
        "Written by `bench/studies/referee.py` (tools built by `bench/llama_tools.py` from the llama.cpp",
        "that the llama-cpp-python 0.3.36 sdist vendors). Held-out `wikitext2-test`, chunks of 512 tokens,",
        "`--threads 2`.",
        "PPLs agree when they differ by at most half a unit in the 4th significant digit. KLD Δ/err is",
        "(ramp-cpp − llama-perplexity) in units of llama-perplexity's printed uncertainty of its mean; both",
        "means are over the same tokens, so that uncertainty is mostly shared and Δ is expected to be far",
        "below it.",
        "",
        "| model | chunks | PPL llama-perplexity | PPL ramp-cpp | agree? | KLD llama-perplexity ± err "
        "| KLD ramp-cpp ± err | KLD Δ/err | generation ok | first 80 chars generated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in recs:
        p, k, g = r["ppl"], r["kld"], r["generation"]
        lpp, rpp = p["llama_perplexity"], p["ramp_cpp"]
        lk, rk = k["llama_perplexity"], k["ramp_cpp"]
        z = k["diff_in_llama_err"]
        text = g["text"][:80].replace("\n", "⏎").replace("|", "\\|")
        lines.append(
            f"| {Path(r['model']).name} | {r['chunks']} | {lpp['ppl']:.4f} ± {lpp['ppl_err']:.4f} "
            f"| {rpp['ppl']:.4f} ± {rpp['ppl_err']:.4f} | {'yes' if p['agree_4_digits'] else 'NO'} "
            f"({p['rel_diff']:+.1e}) | {_fmt_kld(lk['kld_mean'], lk['kld_mean_err'])} "
            f"| {_fmt_kld(rk['kld_mean'], rk['kld_err'])} | {'—' if z is None else f'{z:+.2f}'} "
            f"| {'yes' if g['ok'] else 'NO'} (exit {g['exit']}) | `{text}` |"
        )
    lines += ["", "## Commands", ""]
    for r in recs:
        lines += [f"### {Path(r['model']).name}, {r['chunks']} chunks", "", "```"]
        lines.append(r["ppl"]["llama_perplexity"]["cmd"])
        lines.append(r["ppl"]["ramp_cpp"]["cmd"])
        lines.append(r["kld"]["base_logits"]["cmd"])
        lines.append(r["kld"]["llama_perplexity"]["cmd"])
        lines.append(r["kld"]["ramp_cpp"]["cmd"])
        lines.append(r["generation"]["cmd"])
        lines += ["```", ""]
    lines.append("Temporary paths (`/tmp/referee-*/`) were the text and the base logits, deleted afterwards.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--base", type=Path, required=True, help="F16 GGUF the KLD is measured against")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "referee.json")
    a = ap.parse_args()
    for p in [a.base, *a.models]:
        if not p.is_file():
            raise SystemExit(f"error: {p}: no such file")
    a.base, a.models = a.base.resolve(), [m.resolve() for m in a.models]
    recs = load(a.out)
    done = {(r["model"], r["chunks"]) for r in recs}
    todo = [m for m in a.models if (str(m), a.chunks) not in done]
    for m in a.models:
        if m not in todo:
            print(f"skip {m.name}: {a.chunks} chunks already in {a.out}", file=sys.stderr)
    if todo:
        with tempfile.TemporaryDirectory(prefix="referee-") as tmp:
            ref = Referee(a, Path(tmp))
            for m in todo:
                recs.append(ref.model(m))
                save(a.out, recs)  # after every model: an interrupted run keeps what it finished
    a.out.with_suffix(".md").write_text(markdown(recs))
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
