"""A run directory made before the stage layout resumes under the staged `run_direct`.

The previous code (`OLD_COMMIT`, the flat package: ramp_cpp.direct.run_direct configured by the paper's
SearchConfig) runs a sized greedy search on the synthetic model in a subprocess; the new code then runs the
same request on the same directory. It must accept the directory (run.json: same settings), recompute
nothing (no calibration, fold, measurement, tensor cache or KLD-group stage reports progress; every file the
old run left keeps its bytes and mtime) and write the same allocation and the same GGUF, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.llama.backend import repack_weights
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.pipeline.card import CARD, IMATRIX, TYPES_FILE
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import Hooks, SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig
from ramp_cpp.pipeline.stages import SCORES

#: The last commit before ramp_cpp was laid out by stage (and before run_direct became stages).
OLD_COMMIT = "901eb2071299dd9ae2f85c9b37e8e9cd61a1f7bc"
REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "ramp_cpp" / "lib" / "libramp_native.so"
#: the stages that compute (progress names); a resumed run reports none of them
COMPUTING = {"calibrate", "fold", "measure", "tensor cache", "kld groups"}
#: what every run writes again (outputs and settings); everything else in the run directory must stay
REWRITTEN = {"run.json", "allocation.json", "report.json", "pareto.png"}
HASHES = "sha256.json"  # store.cache's index of file hashes, in the user cache
#: metadata a folded copy carries since the searched folding exponent (issue 37): the previous code's folded
#: copy, reused, lacks them, and so does the file written from it
NEWER_FOLD_KEYS = {"ramp.fold.power", "ramp.fold.powers"}

OLD_RUN = """
import json, sys
from pathlib import Path
import ramp_cpp
assert Path(ramp_cpp.__file__).resolve().is_relative_to(Path.cwd().resolve()), ramp_cpp.__file__
from ramp_cpp.calibration import CalibConfig
from ramp_cpp.direct import run_direct
from ramp_cpp.search import SearchConfig
a = json.loads(sys.argv[1])
# the previous code predates backend.repack_weights (llama.cpp's AMX matmul segfaults on these models):
# today's choice, applied to the model parameters it asks llama_cpp for
import llama_cpp
_default = llama_cpp.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = a["repack"]
    return p
llama_cpp.llama_model_default_params = _params
cfg = SearchConfig(budget_mode="size", metric="kld", text=a["text"], n_ctx=128, chunks=2,
                   calib=CalibConfig(text=a["text"], samples=2, ctx=64))
r = run_direct(a["model"], a["run_dir"], "greedy", a["size"], cfg, presets=(), sensitivity="measured",
               fold="auto")
print(json.dumps({"gguf": str(r.gguf)}))
"""


def old_tree(dst: Path) -> Path:
    """ramp_cpp/ of OLD_COMMIT under `dst`, or a skip saying why it cannot be had."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous commit's code cannot be had")
    have = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], capture_output=True
    )
    if have.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT[:7]} is not in this checkout (a shallow clone?)")
    tar = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", OLD_COMMIT, "ramp_cpp"],
        capture_output=True, check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(dst, filter="data")
    return dst


def content(path: Path) -> tuple[dict[str, object], dict[str, tuple[str, str]]]:
    """A GGUF's metadata (less NEWER_FOLD_KEYS) and its tensors' types and bytes' sha256."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {f.name: f.contents() for f in r.fields.values()
            if f.name not in NEWER_FOLD_KEYS and not f.name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, hashlib.sha256(t.data.tobytes()).hexdigest()) for t in r.tensors}
    return meta, tensors


def files(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under `root`."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.slow
def test_a_run_directory_of_the_previous_code_resumes(
    tiny_model: Path, text_file: Path, tmp_path: Path
) -> None:
    if not NATIVE.is_file():
        pytest.skip(f"{NATIVE} is not built")
    old = old_tree(tmp_path / "old")
    rd = tmp_path / "run"
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    args = {"model": str(tiny_model), "run_dir": str(rd), "size": size, "text": str(text_file),
            "repack": repack_weights()}
    # the session's RAMP_CACHE_DIR / RAMP_SCRATCH_DIR (conftest) are inherited: one base log-probs cache
    env = {**os.environ, "PYTHONPATH": str(old), "RAMP_NATIVE_LIB": str(NATIVE)}
    r = subprocess.run(
        [sys.executable, "-c", OLD_RUN, json.dumps(args)], cwd=old, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-4000:]
    gguf = Path(json.loads(r.stdout.strip().splitlines()[-1])["gguf"])
    before = files(rd)
    cache = Path(os.environ["RAMP_CACHE_DIR"])
    cache_before = files(cache)
    hashes_before = json.loads((cache / HASHES).read_text())
    old_settings = (rd / "run.json").read_text()
    old_alloc = json.loads((rd / "allocation.json").read_text())

    stages: set[str] = set()
    calib = CalibConfig(text=str(text_file), samples=2, ctx=64)
    cfg = SizedConfig(text=str(text_file), n_ctx=128, chunks=2, calib=calib)
    res = run_direct(SizedRequest(tiny_model, rd, "greedy", size, cfg, presets=(), sensitivity="measured",
        fold="auto"), hooks=Hooks(progress=lambda stage, done, total: stages.add(stage)))

    assert stages.isdisjoint(COMPUTING), stages
    after = files(rd)
    kept = {k: v for k, v in before.items() if k not in REWRITTEN and k != gguf.name}
    assert {k: after.get(k) for k in kept} == kept  # calibration, folded model, caches: not touched
    # and nothing new but the fold decision's scores, which today's code keeps with the run (stages.SCORES),
    # and what publishing the file needs (pipeline/card.py: the card, the recipe and its imatrix)
    assert set(after) - set(before) == {SCORES, CARD, TYPES_FILE, IMATRIX}
    # base log-probs and file hashes reused; the hash index may gain the folded copy's, which the previous
    # code hashed again whenever asked and today's remembers (folding.fold)
    hashes = json.loads((cache / HASHES).read_text())
    assert {k: hashes.get(k) for k in hashes_before} == hashes_before
    folded = (rd / "folded.f16.gguf").resolve()
    key = f"{folded}|{folded.stat().st_size}|{folded.stat().st_mtime_ns}"
    assert {k: hashes[k] for k in set(hashes) - set(hashes_before)} in (
        {}, {key: hashlib.sha256(folded.read_bytes()).hexdigest()}
    )
    assert {k: v for k, v in files(cache).items() if k != HASHES} == {
        k: v for k, v in cache_before.items() if k != HASHES
    }
    assert (rd / "run.json").read_text() == old_settings  # same settings, same layout
    # the file is the one today's code writes from the same settings in a fresh folder: since 2026-12-02 the
    # allocation is made under a bound on the ramp.* metadata (stages.fit_and_write), so it may differ from
    # the previous code's by the few tensors that bound moves; every measured artifact above was reused; the
    # metadata compared leaves out NEWER_FOLD_KEYS, which the reused folded copy lacks
    fresh = run_direct(SizedRequest(tiny_model, tmp_path / "fresh", "greedy", size, cfg, presets=(),
        sensitivity="measured", fold="auto"))
    assert res.gguf == gguf and content(res.gguf) == content(fresh.gguf)
    new_alloc = json.loads(res.allocation.read_text())
    assert new_alloc["fold"] == old_alloc["fold"]
    assert len(new_alloc["tensors"]) == len(old_alloc["tensors"]) and res.file_bytes <= res.target_bytes
