"""Measured sensitivity: the proxy's scale per tensor group, calibrated with KLD that llama.cpp measures.

The proxy of `sensitivity.py` (E‖(W − Ŵ)x‖² per token) ranks the types of one tensor, and tensors of one role
at one depth, well; across roles and depths the KLD it costs per unit of proxy differs by orders of magnitude
(issue 14: 500× over SmolLM2-135M's 28 role × depth-quarter groups). As in HIGGS (Malinovskii et al., NAACL
2025, arXiv 2411.17525: loss increase ≈ Σ_l α_l · error_l, α_l measured per layer), each group g gets one
measured coefficient:

    reference  every searched tensor at its highest option (`options[-1]`, least error)
    probe_g    the reference with every tensor t of g at its probe option p_t
    predicted_g = Σ_{t∈g} (error_t(p_t) − error_t(highest))           (Δproxy)
    measured_g  = KLD(probe_g) − KLD(reference)                         (ΔKLD)
    ratio_g     = max(measured_g / predicted_g, floor · median_h(positive ratio_h))

and the calibrated sensitivity is the proxy with every option error of every tensor of g multiplied by
ratio_g, so that the knapsack's Σ error predicts KLD − KLD(reference) ≈ Σ_g ratio_g · Δproxy_g. That sum is
additive over groups only if the groups' damages add up: `pairs` groups are also probed two at a time and
(KLD_pair − KLD_ref) is reported next to the sum of the two singles' increments.

KLD is the mean over the reward chunks (validation text only; the caller passes it) against the unquantized,
unfolded base model's cached log-probs (`evaluate.base_logprobs`). Probe files are assembled from the tensor
cache (the bytes llama.cpp's quantizer writes) into a temporary folder (tmpfs when there is one) that is
removed however the call ends. The evaluations are kept in `groups-<key>.json` in the cache's key
directory, beside the measurement, written after each one: a killed calibration loses at most the
evaluation in flight, a rerun continues, a finished one is reused without evaluating anything. Another
candidate set's probes of the same cache (`donors`: the full set's, for a `--types portable` run) lend
every evaluation whose file is the same: the same type for every tensor, hence the same bytes and KLD (the
reference, at each tensor's Q8_0, and each group whose cheapest candidate both sets share).

With `refine_evaluations` > 0 the groups whose damage per byte is largest are split after these probes, per
layer and then per tensor, and their parts probed (refine.py); a probed part's ratio replaces its group's for
its tensors. Their evaluations are kept in the same file by label and lent the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor, Serial
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig
from ramp_cpp.llama.ggufio import ModelInfo
from ramp_cpp.measure.candidates import type_for_bpw
from ramp_cpp.measure.refine import Node, RefinedResult, Tree, refine
from ramp_cpp.measure.sensitivity import Sensitivity, TensorOptions, to_json
from ramp_cpp.store.atomic import atomic_path

Progress = Callable[[int, int], None]  # (evaluations done, evaluations planned)
FORMAT_VERSION = 1
REFERENCE = "reference"


@dataclass(frozen=True)
class GroupConfig:
    """How tensors are grouped and probed."""

    # issue 14: role × quarter of the blocks (28 groups on SmolLM2's 30 blocks, 7 roles)
    n_buckets: int = 4
    # None: each tensor's cheapest candidate (issue 14's probe: the largest damage, so the clearest signal
    # above the KLD estimate's noise); a number: the candidate nearest that many bits per weight
    # (candidates.type_for_bpw), to probe where a budget actually allocates
    probe_bpw: float | None = None
    # issue 14 item 4: pairs of groups probed together to check that damages add up, as the knapsack assumes
    pairs: int = 3
    # Not in the issue or HIGGS (whose α_l are positive by construction): a group whose probe moves KLD by no
    # more than the estimate's noise can measure ΔKLD ≤ 0. A ratio ≤ 0 would make its bits free (0) or a
    # liability (< 0, reversing the order of its types); the floor keeps the order and the group in the
    # trade-off at a low price. It is relative (a fraction of the median measured ratio), because ratios
    # are in KLD per proxy unit, whose size depends on the model and the calibration.
    floor: float = 0.01
    # issue 21: the reward chunks each probe scores (from the first); None: all of them. Probes compare files
    # on the same tokens, so the paired difference needs fewer than an absolute KLD (and half the chunks is
    # half the probes' cost)
    chunks: int | None = None
    # issue 37: evaluations spent after the group probes on the parts (layers, then tensors) of the groups of
    # largest damage per byte (refine.py); 0: none, today's calibration. Not in `key`: a larger budget walks
    # the same path further and reuses every probe a smaller one saved
    refine_evaluations: int = 0

    def __post_init__(self) -> None:
        if self.n_buckets < 1:
            raise RampError(f"n_buckets must be >= 1, got {self.n_buckets}")
        if self.pairs < 0:
            raise RampError(f"pairs must be >= 0, got {self.pairs}")
        if self.refine_evaluations < 0:
            raise RampError(
                f"--refine-probes (refine_evaluations) must be at least 0, got {self.refine_evaluations}"
            )
        if self.chunks is not None and self.chunks < 1:
            raise RampError(f"chunks must be >= 1, got {self.chunks}")
        if not 0 < self.floor <= 1:
            raise RampError(f"floor must be in (0, 1], got {self.floor}")
        if self.probe_bpw is not None and not (math.isfinite(self.probe_bpw) and self.probe_bpw > 0):
            raise RampError(f"probe_bpw must be a positive number of bits per weight, got {self.probe_bpw}")

    def key(self) -> dict[str, Any]:
        """What changes the files probed (pairs and floor do not: more pairs reuse every single)."""
        return {"n_buckets": self.n_buckets, "probe_bpw": self.probe_bpw}


# -- groups as data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Tensors that share one measured ratio: one role in one depth bucket, or one embedding alone."""

    name: str  # "ffn_down@0-7" (role @ first-last block of the bucket), "token_embd", "output"
    role: str
    bucket: int | None  # None for the embeddings
    blocks: tuple[int, int] | None  # first and last block of the bucket
    tensors: tuple[str, ...]  # in visiting order


def bucket_of(block: int, n_blocks: int, n_buckets: int) -> int:
    """Depth bucket of `block`: floor(block · n_buckets / n_blocks), i.e. the n_buckets near-equal slices
    of the blocks in order (quarters by default)."""
    return block * n_buckets // n_blocks


def groups_of(info: ModelInfo, names: Sequence[str], n_buckets: int = 4) -> tuple[Group, ...]:
    """The groups of the searched tensors `names` of `info`: token_embd alone (the head too when tied), the
    untied output alone, every other tensor by (role, depth bucket). Every name is in exactly one group.
    Order: token_embd, then role by role (visiting order) and bucket by bucket, then output."""
    by_name = {t.name: t for t in info.tensors}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RampError(f"{missing[0]} is not a tensor of {Path(info.path).name}")
    blocks = [b for b in (by_name[n].block for n in names) if b is not None]
    n_blocks = max(info.n_blocks, *(b + 1 for b in blocks)) if blocks else max(info.n_blocks, 1)
    keyed: dict[tuple[int, str, int], list[str]] = {}
    for n in names:
        t = by_name[n]
        if t.block is None:  # token_embd first, output last, each alone
            k = (-1 if t.role == "token_embd" else 1 << 30, t.role, -1)
        else:
            k = (t.order, t.role, bucket_of(t.block, n_blocks, n_buckets))
        keyed.setdefault(k, []).append(n)
    out = []
    for (_, role, bucket), members in sorted(keyed.items()):
        if bucket < 0:
            out.append(Group(role, role, None, None, tuple(members)))
            continue
        span = [b for b in range(n_blocks) if bucket_of(b, n_blocks, n_buckets) == bucket]
        first, last = span[0], span[-1]
        out.append(Group(f"{role}@{first}-{last}", role, bucket, (first, last), tuple(members)))
    return tuple(out)


def probe_type(t: TensorOptions, cfg: GroupConfig) -> GGMLQuantizationType:
    """The option tensor `t` takes in its group's probe."""
    if cfg.probe_bpw is None:
        return t.options[0].ggml_type
    return type_for_bpw(t.options, cfg.probe_bpw)


# -- the report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupResult:
    name: str
    role: str
    blocks: tuple[int, int] | None
    tensors: tuple[str, ...]
    predicted: float  # Δproxy of the probe
    kld: float | None  # the probe's mean KLD (None: not probed, predicted is 0)
    measured: float | None  # ΔKLD = kld − reference KLD
    raw_ratio: float | None  # measured / predicted
    ratio: float  # the scale applied: raw_ratio, floored, or the median where none was measured
    floored: bool


@dataclass(frozen=True)
class PairResult:
    groups: tuple[str, str]
    kld: float
    increment: float  # KLD_pair − KLD_ref
    sum_of_singles: float  # measured_a + measured_b
    relative_error: float | None  # (increment − sum_of_singles) / sum_of_singles


@dataclass(frozen=True)
class GroupReport:
    config: GroupConfig
    reference_kld: float
    groups: tuple[GroupResult, ...]
    pairs: tuple[PairResult, ...]
    evaluations: int  # evaluations the calibration holds (reference, probes, pairs)
    seconds: float  # their summed wall time (assemble, load, score): the cost of the calibration
    evaluated_now: int  # evaluations this call ran (0 when the saved calibration was complete)
    seconds_now: float  # this call's wall time
    lent: int = 0  # evaluations taken from a donor's probes of the same file (its seconds are in `seconds`)
    refined: tuple[RefinedResult, ...] = ()  # the parts probed after the groups (in `evaluations` too)
    splits: tuple[str, ...] = ()  # the groups and parts split, in the order chosen

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.config.refine_evaluations:  # without refinement, the report as before it existed
            del d["config"]["refine_evaluations"], d["refined"], d["splits"]
        abs_err = [abs(p.relative_error) for p in self.pairs if p.relative_error is not None]
        d["pair_mean_abs_relative_error"] = float(np.mean(abs_err)) if abs_err else None
        return d


# -- saved state ---------------------------------------------------------------------------------------


def _sensitivity_digest(sens: Sensitivity) -> str:
    return hashlib.sha256(json.dumps(to_json(sens), sort_keys=True).encode()).hexdigest()


def probe_key(
    sens: Sensitivity, base_sha256: str, text: str, ecfg: EvalConfig, cfg: GroupConfig
) -> dict[str, Any]:
    """What the saved probe evaluations are keyed by (`calibrate_sensitivity`'s state file)."""
    return {
        "format": FORMAT_VERSION,
        "sensitivity": _sensitivity_digest(sens),
        "base_sha256": base_sha256,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "eval": ecfg.key(),
        **cfg.key(),
    }


def saved_probes(directory: Path, key: Mapping[str, Any]) -> int:
    """How many probe evaluations the state file of `key` in the cache directory holds (0 without one)."""
    return len(_read_state(state_path(directory, key), key)["evals"])


def state_path(directory: Path, key: Mapping[str, Any]) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return directory / f"groups-{h[:16]}.json"


def _read_state(path: Path, key: Mapping[str, Any]) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        d = None
    want = json.loads(json.dumps(key))  # tuples read back as lists
    if isinstance(d, dict) and d.get("key") == want and isinstance(d.get("evals"), dict):
        return d
    return {"key": dict(key), "evals": {}}


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(state))


# -- the stage -----------------------------------------------------------------------------------------


def _label_map(
    label: str, sens: Sensitivity, cfg: GroupConfig, members: Mapping[str, Sequence[str]]
) -> dict[str, str] | None:
    """The type map a probe `label` (REFERENCE, a group, or "a+b") evaluates under `sens`: every tensor at
    its highest option, the label's groups' tensors at their probe type; None for a label of no group."""
    at = {t.name: t.options[-1].ggml_type.name for t in sens.tensors}
    parts = [] if label == REFERENCE else label.split("+")
    if any(g not in members for g in parts):
        return None
    tensors = {t.name: t for t in sens.tensors}
    for n in (n for g in parts for n in members[g]):
        at[n] = probe_type(tensors[n], cfg).name
    return at


def _map_digest(types: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(types.items())).encode()).hexdigest()


def lent_evaluations(
    donors: Sequence[Sensitivity], sens: Sensitivity, directory: Path, key: Mapping[str, Any],
    cfg: GroupConfig, members: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, float]]:
    """The donors' saved probe evaluations by the digest of the type map each scored: those of a donor with
    `sens`' model, imatrix, base and searched tensors, keyed as `key` but for its own sensitivity."""
    names = [t.name for t in sens.tensors]
    out: dict[str, dict[str, float]] = {}
    for d in donors:
        origin = (d.model_sha256, d.imatrix_digest, d.base)
        if origin != (sens.model_sha256, sens.imatrix_digest, sens.base) or d == sens:
            continue
        if [t.name for t in d.tensors] != names:
            continue
        dkey = {**key, "sensitivity": _sensitivity_digest(d)}
        for label, ev in _read_state(state_path(directory, dkey), dkey)["evals"].items():
            m = _label_map(label, d, cfg, members)
            if m is not None:
                out.setdefault(_map_digest(m), ev)
    return out


def _pairs(groups: Sequence[Group], measured: Mapping[str, float], n: int) -> list[tuple[str, str]]:
    """Up to n disjoint pairs of groups of different roles, the largest measured singles first: walking the
    groups by decreasing ΔKLD, each one not yet paired is paired with the next unpaired one of another
    role. Large singles stand clearest above the noise; only groups that measured an increase take part."""
    role = {g.name: g.role for g in groups}
    ranked = sorted((g for g in measured if measured[g] > 0), key=lambda g: (-measured[g], g))
    used: set[str] = set()
    out: list[tuple[str, str]] = []
    for i, a in enumerate(ranked):
        if len(out) >= n:
            break
        if a in used:
            continue
        b = next((x for x in ranked[i + 1 :] if x not in used and role[x] != role[a]), None)
        if b is not None:
            used.update((a, b))
            out.append((a, b))
    return out


def calibrate_sensitivity(
    sens: Sensitivity,
    cache: Any,
    base_path: str | os.PathLike[str],
    text: str,
    ecfg: EvalConfig,
    opts: RuntimeOptions = RuntimeOptions(),
    cfg: GroupConfig = GroupConfig(),
    progress: Progress | None = None,
    scratch: str | os.PathLike[str] | None = None,
    executor: Executor | None = None,
    donors: Sequence[Sensitivity] | None = None,
) -> tuple[Sensitivity, GroupReport]:
    """`sens` with each group's errors scaled by its measured ratio (module docstring), and the report.

    `cache`: the tensor cache `sens` was measured on (tensorcache.TensorCache; it holds the probes' bytes);
    `base_path`: the unquantized, unfolded model whose log-probs are the KLD's reference; `text`, `ecfg`:
    the reward text and chunks (validation text: the calibration is part of the search); `scratch`: the
    parent of the temporary probe folder (default: tmpfs). `progress(done, total)` after every evaluation.
    `donors`: other sensitivities measured on the same cache whose saved probes lend the evaluation of any
    probe file that is the same as one of these (None: every finished measurement beside the cache,
    proxy.saved_measurements).
    """
    from ramp_cpp.llama.evaluate import ensure_base_logprobs, reward_chunks
    from ramp_cpp.measure.evaljob import EvalJob, EvalOutcome, run_eval_job
    from ramp_cpp.measure.proxy import saved_measurements
    from ramp_cpp.store.cache import file_sha256_cached

    t_start = time.perf_counter()
    if (cache.model_sha256, cache.imatrix_digest, cache.base) != (
        sens.model_sha256, sens.imatrix_digest, sens.base
    ):
        raise RampError("the tensor cache is not the one the sensitivity was measured on")
    names = [t.name for t in sens.tensors]
    absent = [n for n in names if n not in set(cache.names)]
    if absent:
        raise RampError(f"{absent[0]} is not searched through the tensor cache given")
    if not Path(base_path).is_file():
        raise RampError(f"{base_path}: no such file")
    groups = groups_of(cache.info, names, cfg.n_buckets)
    tensors = {t.name: t for t in sens.tensors}
    highest = {n: t.options[-1].ggml_type for n, t in tensors.items()}
    probe = {n: probe_type(t, cfg) for n, t in tensors.items()}

    def delta(n: str) -> float:
        return tensors[n].option(probe[n]).error - tensors[n].option(highest[n]).error

    predicted = {g.name: sum(delta(n) for n in g.tensors) for g in groups}

    def saved(ts: Sequence[str]) -> int:
        return sum(tensors[n].option(highest[n]).nbytes - tensors[n].option(probe[n]).nbytes for n in ts)

    block_of = {t.name: t.block for t in cache.info.tensors}
    tree = Tree(groups, block_of, [n for n in names if probe[n] != highest[n]])
    probed = [g for g in groups if predicted[g.name] > 0]  # predicted 0: every tensor's probe is its highest

    key = probe_key(sens, file_sha256_cached(base_path), text, ecfg, cfg)
    path = state_path(Path(cache.directory), key)
    state = _read_state(path, key)
    evals: dict[str, dict[str, float]] = state["evals"]
    ran = 0
    members = {**tree.members(), **{g.name: g.tensors for g in groups}}
    directory = Path(cache.directory)
    donors = saved_measurements(directory) if donors is None else donors
    lendable = lent_evaluations(donors, sens, directory, key, cfg, members)
    executor = executor or Serial()
    ropts = replace(opts, n_ctx=ecfg.n_ctx, n_threads=executor.threads or opts.n_threads)

    def run(batch: Sequence[tuple[str, Sequence[str]]], total: int) -> None:
        """Evaluate the (label, tensors at their probe type) not yet saved, through the executor."""
        nonlocal ran
        for label, _ in batch:
            m = _label_map(label, sens, cfg, members) if label not in evals and lendable else None
            lent = lendable.get(_map_digest(m)) if m is not None else None
            if lent is not None:  # the same file was scored for another candidate set
                evals[label] = {**lent, "lent": True}
                _write_state(path, state)
        todo = [(label, at) for label, at in batch if label not in evals]
        if not todo:
            return
        base_file = str(ensure_base_logprobs(base_path, text, ecfg, ropts))  # once, read by every job
        chunks = reward_chunks(base_path, text, ecfg, ropts)
        jobs = [
            EvalJob(
                label, cache, {**highest, **{n: probe[n] for n in at}}, base_file, chunks, ropts,
                None if scratch is None else str(scratch),
            )
            for label, at in todo
        ]

        def save(_: int, out: EvalOutcome) -> None:
            nonlocal ran
            r = out.result
            # `ended` (epoch seconds): a run stopped during this evaluation can take the pause off its clock
            evals[out.label] = {
                "kld": r.kld_mean, "kld_stderr": r.kld_stderr, "ppl": r.ppl, "seconds": out.seconds,
                "ended": time.time(),
            }
            ran += 1
            _write_state(path, state)  # before progress: a callback that raises loses nothing
            if progress:
                progress(len(evals), total)

        executor.map(run_eval_job, jobs, save)

    # the reference and the singles do not depend on each other: one batch; the pairs need the singles
    n_refine = min(cfg.refine_evaluations, tree.capacity([g.name for g in probed]))  # what refine spends
    planned = 1 + len(probed) + cfg.pairs + n_refine
    run([(REFERENCE, ()), *((g.name, g.tensors) for g in probed)], planned)
    ref = evals[REFERENCE]["kld"]
    measured = {g.name: evals[g.name]["kld"] - ref for g in probed}
    pairs = _pairs(groups, measured, cfg.pairs)
    planned = 1 + len(probed) + len(pairs) + n_refine
    run([(f"{a}+{b}", (*members[a], *members[b])) for a, b in pairs], planned)

    def measure_parts(nodes: Sequence[Node]) -> dict[str, float]:
        run([(n.label, n.tensors) for n in nodes], planned)
        return {n.label: evals[n.label]["kld"] - ref for n in nodes}

    parts = refine(
        tree, measured, cfg.refine_evaluations, lambda ts: sum(delta(n) for n in ts), saved, measure_parts
    )

    raw = {g: measured[g] / predicted[g] for g in measured}
    positive = [r for r in raw.values() if r > 0]
    # no group measured an increase: the calibration says nothing, every ratio 1 keeps the proxy as it is
    typical = float(np.median(positive)) if positive else 1.0
    lowest = cfg.floor * typical
    results = []
    for g in groups:
        r = raw.get(g.name)
        ratio = typical if r is None or not positive else max(r, lowest)
        results.append(
            GroupResult(
                name=g.name,
                role=g.role,
                blocks=g.blocks,
                tensors=g.tensors,
                predicted=predicted[g.name],
                kld=evals[g.name]["kld"] if g.name in measured else None,
                measured=measured.get(g.name),
                raw_ratio=r,
                ratio=ratio,
                floored=r is not None and bool(positive) and r < lowest,
            )
        )
    pair_results = []
    for a, b in pairs:
        k = evals[f"{a}+{b}"]["kld"]
        s = measured[a] + measured[b]
        pair_results.append(PairResult((a, b), k, k - ref, s, (k - ref - s) / s if s > 0 else None))
    factors = {n: res.ratio for res, g in zip(results, groups, strict=True) for n in g.tensors}
    refined = []
    for p in parts.probes:  # a parent's before its parts': the finest probe of a tensor sets its ratio
        r = p.measured / p.predicted
        ratio = typical if not positive else max(r, lowest)
        refined.append(RefinedResult(
            p.node.label, p.parent, p.node.tensors, p.predicted, p.saved, evals[p.node.label]["kld"],
            p.measured, p.damage_per_byte, r, ratio, bool(positive) and r < lowest,
        ))
        factors.update(dict.fromkeys(p.node.tensors, ratio))
    used = [REFERENCE, *measured, *(f"{a}+{b}" for a, b in pairs), *(p.node.label for p in parts.probes)]
    report = GroupReport(
        config=cfg,
        reference_kld=ref,
        groups=tuple(results),
        pairs=tuple(pair_results),
        evaluations=len(used),
        seconds=float(sum(evals[u]["seconds"] for u in used)),
        evaluated_now=ran,
        seconds_now=time.perf_counter() - t_start,
        lent=sum(1 for u in used if evals[u].get("lent")),
        refined=tuple(refined),
        splits=parts.splits,
    )
    return sens.scaled(factors), report
