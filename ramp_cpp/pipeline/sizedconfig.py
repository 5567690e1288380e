"""The sized run's configuration (`SizedConfig`) and its run directory's settings file (`SETTINGS`, run.json).

A sized run (`run.run_direct`) reads six settings here: the reward text and its chunks, the context, the
imatrix and the calibration recipe; Scale Folding is the request's `fold` (request.Fold), kept at run.json's
top level. Until issue 38 the sized run borrowed the paper's `SearchConfig`, so run directories made before
hold the paper's fields in run.json's "search" entry and a boolean "fold" there; they still resume
(`settings_differ` reads both layouts) and keep their run.json as written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.errors import OtherSettings, RampError
from ramp_cpp.fold.folding import FoldConfig
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.pipeline.folddecision import Fold
from ramp_cpp.store.atomic import atomic_path

#: The run directory's settings, a JSON object (the paper's --budget search names its own the same).
SETTINGS = "run.json"


@dataclass(frozen=True)
class SizedConfig:
    """How a sized run calibrates and scores: the reward `text` (never a held-out one) and its `chunks` of
    `n_ctx` tokens from `first_chunk`; the calibration's imatrix for quantizing (`imatrix`) and the
    calibration recipe (`calib`)."""

    text: str = "wikitext2-valid"
    n_ctx: int = 512
    first_chunk: int = 0
    chunks: int = 4
    imatrix: bool = True
    calib: CalibConfig = CalibConfig()
    fold_power: float | None = 0.5  # Scale Folding's exponent when the run folds; None: searched per group

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise RampError("--chunks must be at least 1")
        FoldConfig(power=self.fold_power)  # refuses a negative or infinite exponent before any work
        from ramp_cpp.store.texts import CORPORA

        c = CORPORA.get(self.text)
        if c is not None and c.held_out:  # the reward decides the allocation: it may not see the test text
            raise RampError(f"{self.text} is held out for evaluation; the search rewards on another text")

    @property
    def fold_config(self) -> FoldConfig:
        """The folding the run's folded model is made with (fold/folding.py)."""
        return FoldConfig(power=self.fold_power)

    @property
    def eval_config(self) -> EvalConfig:
        return EvalConfig(n_ctx=self.n_ctx, first_chunk=self.first_chunk, n_chunks=self.chunks)

    def to_json(self) -> dict[str, Any]:
        """run.json's and report.json's "search" entry."""
        return asdict(self)


@dataclass(frozen=True)
class SourceChoice:
    """What fold/source.calibrated_source reads of a run (its SourceSettings): the recipe and one folding."""

    calib: CalibConfig
    fold: bool


#: `ramp-cpp search --size`'s defaults (issue 21; run_direct's own stay those of the library and the
#: benchmarks). Measured on the demo model and Qwen2.5-Coder-0.5B (docs/costs.md, bench/costs.py):
#: - the bench calibration (16 x 512 tokens, 4 E; the paper's 128 x 2048 is 128 E);
#: - group probes of 4 depth buckets on 2 of the 4 reward chunks without the pair diagnostics (15 E instead of
#:   33 E per folding; 3 buckets, 11.5 E, cost SmolLM2 4% of held-out KLD at Q3_K_M's size);
#: - the fold check (one allocation quantized from both models, 1 pass and 4 E), not a second measurement;
#: - each linear's proxy on every 4th span of 16 rows (SmolLM2 held out, Q4_K_M / Q3_K_M: 0.0243 / 0.0496
#:   against 0.0243 / 0.0499 on every row, for a quarter of the proxy's quantization).
#: The candidate types stay the default twelve: six that reach short rows through llama.cpp's fallbacks cost
#: 10% of held-out KLD on the demo model (0.0268 against 0.0243).
SEARCH_RECIPE = "bench"
SEARCH_GROUPS = GroupConfig(n_buckets=4, pairs=0, chunks=2)
SEARCH_FOLD = Fold.CHECK
SEARCH_ROW_SAMPLE = 4

#: run_direct's default configuration
DEFAULTS = SizedConfig()
#: The "search" keys a sized run reads: the only ones compared between a run directory and a request.
SIZED_FIELDS = tuple(f.name for f in fields(SizedConfig))
#: What a run.json written before a key existed stands for: the value every run had then
UNWRITTEN: dict[str, Any] = {"fold_power": 0.5}


def _folds(d: dict[str, Any]) -> set[str]:
    """The fold settings a run.json stands for. Today's names one at its top level; one written before issue
    38 names auto or check there and otherwise only "search.fold", a boolean that `--fold off` left true
    (only --no-fold made it false): so a true one stands for on or off, as the code that wrote it read it."""
    if "fold" in d:
        return {str(d["fold"])}
    legacy = (d.get("search") or {}).get("fold")
    return {"on", "off"} if legacy is True else {"off"} if legacy is False else {"on"}


def settings_differ(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The top-level keys of two run.json objects that differ, ramp_version aside. "search" is compared on
    `SIZED_FIELDS` alone: a run directory written while the sized run borrowed the paper's SearchConfig holds
    the paper's fields too (any values: they never changed what the run computed), so it resumes; "fold" is
    compared by `_folds`, which reads both layouts."""
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))

    def norm(k: str, v: Any) -> Any:
        if k == "search" and isinstance(v, dict):
            return {f: v.get(f, UNWRITTEN.get(f)) for f in SIZED_FIELDS}
        return v

    keys = sorted((set(have) | set(want)) - {"ramp_version", "fold"})
    diffs = [k for k in keys if norm(k, have.get(k)) != norm(k, want.get(k))]
    if not _folds(have) & _folds(want) or len(_folds(want)) > 1:
        diffs.append("fold")
    return sorted(diffs)


def check_run(run_dir: Path, want: dict[str, Any]) -> bool:
    """A run directory is reused (its calibration, fold, cache and measurement) only for the same request:
    False when it holds none yet, True when it holds this one, OtherSettings otherwise."""
    p = run_dir / SETTINGS
    if not p.is_file():
        return False
    diffs = settings_differ(json.loads(p.read_text()), want)
    if diffs:
        raise OtherSettings(
            f"{run_dir} holds a run made with other settings ({', '.join(diffs)}); choose another --out"
        )
    return True


def write_settings(run_dir: Path, want: dict[str, Any]) -> None:
    """Claim `run_dir` for this request: run.json, written atomically (the directory made if need be). A
    run.json already there for the same request stays as it is (check_run), in the layout it was written
    in."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if check_run(run_dir, want):
        return
    with atomic_path(run_dir / SETTINGS, force=True) as tmp:
        tmp.write_text(json.dumps(want, indent=2))
