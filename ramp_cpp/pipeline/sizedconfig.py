"""The sized run's configuration (`SizedConfig`) and its run directory's settings file (`SETTINGS`, run.json).

A sized run (`run.run_direct`) reads seven settings: the reward text and its chunks, the context, Scale
Folding, the imatrix and the calibration recipe. Until the stage layout it borrowed the paper's `SearchConfig`
(pipeline/paper.py), whose `to_json()` is what run.json's "search" entry and report.json's meta hold. Those
files keep their layout byte for byte (`SizedConfig.to_json`), and a run directory made before resumes
(`settings_differ`: the paper's fields, never read by a sized run, are left out of the comparison).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ramp_cpp.calibration.artifact import CalibConfig
from ramp_cpp.errors import OtherSettings, RampError
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.measure.groups import GroupConfig
from ramp_cpp.store.atomic import atomic_path

#: The run directory's settings, a JSON object (the paper's --budget search names its own the same).
SETTINGS = "run.json"

#: The paper's --budget fields that run.json's "search" entry (and report.json's "meta.search") held when a
#: sized run was configured by the paper's SearchConfig, with the values every sized caller gave them (the
#: command line's search and apply, the demo). Written so that both files keep their layout; never read back,
#: and left out when two runs' settings are compared (`settings_differ`).
PAPER_FIELDS: dict[str, Any] = {
    "budget": 4.25,
    "margin": 0.25,
    "budget_mode": "size",
    "metric": "kld",
    "bits": [3, 4, 5, 6],
    "include_embeddings": False,
    "base_type": "Q8_0",
    "features": "ramp",
    "eval_every": 10,
}
#: The order of SearchConfig's fields, which is the order of the "search" entry's keys.
_LAYOUT = (
    "budget", "margin", "budget_mode", "metric", "bits", "include_embeddings", "base_type", "text", "n_ctx",
    "first_chunk", "chunks", "features", "eval_every", "fold", "imatrix", "calib",
)


@dataclass(frozen=True)
class SizedConfig:
    """How a sized run calibrates, folds and scores: the reward `text` (never a held-out one) and its
    `chunks` of `n_ctx` tokens from `first_chunk`; Scale Folding (`fold`, unless run_direct's `fold` says
    otherwise), the calibration's imatrix for quantizing (`imatrix`) and the calibration recipe (`calib`)."""

    text: str = "wikitext2-valid"
    n_ctx: int = 512
    first_chunk: int = 0
    chunks: int = 4
    fold: bool = True
    imatrix: bool = True
    calib: CalibConfig = CalibConfig()

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise RampError("--chunks must be at least 1")
        from ramp_cpp.store.texts import CORPORA

        c = CORPORA.get(self.text)
        if c is not None and c.held_out:  # the reward decides the allocation: it may not see the test text
            raise RampError(f"{self.text} is held out for evaluation; the search rewards on another text")


    @property
    def eval_config(self) -> EvalConfig:
        return EvalConfig(n_ctx=self.n_ctx, first_chunk=self.first_chunk, n_chunks=self.chunks)

    def to_json(self) -> dict[str, Any]:
        """The settings in run.json's layout: these fields among `PAPER_FIELDS`, in SearchConfig's order."""
        own = asdict(self)
        return {k: own[k] if k in own else PAPER_FIELDS[k] for k in _LAYOUT}


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
SEARCH_FOLD = "check"
SEARCH_ROW_SAMPLE = 4

#: run_direct's default configuration
DEFAULTS = SizedConfig()
#: The "search" keys a sized run reads: the only ones compared between a run directory and a request.
SIZED_FIELDS = tuple(f.name for f in fields(SizedConfig))


def settings_differ(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The top-level keys of two run.json objects that differ, ramp_version aside. "search" is compared on
    `SIZED_FIELDS` alone: a run directory written while the sized run borrowed the paper's SearchConfig may
    hold other values of the paper's fields (a library caller's SearchConfig() has budget_mode "weighted"),
    which never changed what the run computed, so it resumes; every cache key comes from the sized fields."""
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))

    def norm(k: str, v: Any) -> Any:
        if k == "search" and isinstance(v, dict):
            return {f: v.get(f) for f in SIZED_FIELDS}
        return v

    keys = sorted(set(have) | set(want))
    return [k for k in keys if k != "ramp_version" and norm(k, have.get(k)) != norm(k, want.get(k))]


def check_run(run_dir: Path, want: dict[str, Any]) -> None:
    """A run directory is reused (its calibration, fold, cache and measurement) only for the same request."""
    p = run_dir / SETTINGS
    if not p.is_file():
        return
    diffs = settings_differ(json.loads(p.read_text()), want)
    if diffs:
        raise OtherSettings(
            f"{run_dir} holds a run made with other settings ({', '.join(diffs)}); choose another --out"
        )


def write_settings(run_dir: Path, want: dict[str, Any]) -> None:
    """Claim `run_dir` for this request: run.json, written atomically (the directory made if need be)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / SETTINGS, force=True) as tmp:
        tmp.write_text(json.dumps(want, indent=2))
