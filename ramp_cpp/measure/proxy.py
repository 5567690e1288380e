"""Measure stage: the sensitivity artifact (sensitivity.py) of one model, calibration and imatrix.

For every searched tensor W (numpy order: n_rows × n_per_row, one row per output, one column per input)
and every candidate type t (candidates.py), Ŵ_t is the tensor cache's copy of what llama.cpp writes for t,
dequantized by gguf-py, and with D_t = (W − Ŵ_t)² elementwise:

    linear (blk.N.*, untied output.weight):  error_t = Σ_j m_j · Σ_i D_t,ij
        m_j = sum_sq_j / count: the calibration's E[x_j²] of input column j (the importance matrix)
    experts (3-D, n_expert slices W_e):      error_t = Σ_e u_e · Σ_j m_ej · Σ_i D_t,eij
        u_e = counts_e / count: the share of tokens routed to expert e (its usage), m_ej = sum_sq_ej /
        counts_e the E[x_j²] of the rows it was given, so u_e · m_ej = sum_sq_ej / count. Where the
        calibration has no per-expert statistics for the tensor (no `counts`), every expert is weighed
        alike, u_e = k / n_expert (k = expert_used_count) with the pooled m_j, and the measurement lists the
        tensor under "experts_weighed_equally"
    token_embd (a lookup table):             error_t = Σ_i f_i · Σ_j D_t,ij   (+ Σ_j h_j · Σ_i D_t,ij if tied)
        f_i = how often token i occurs in the calibration windows / their token count
        h_j = E[x_j²] of the output head's input, recorded as token_embd.weight when the head is tied

Each term is a per-token squared error of the tensor's output (the embedding row looked up, or W x), so
the terms add up across tensors. The windows are the calibration's own: its text (`cal.config.text`) is
tokenized by the model (`LlamaModel.tokenize`) and cut and drawn again by `calibrate.windows` with the
artifact's samples, ctx and seed, which reproduces exactly the tokens that were run (their count is
checked against `cal.n_tokens`).

nbytes is the tensor's data padded to the GGUF alignment, so that for any choice of types

    file size = fixed_bytes + Σ nbytes,   fixed_bytes = header + every non-searched tensor (padded)

where the header is the one llama.cpp's quantizer writes (the tensor cache's template). Metadata added to
a written file afterwards (ramp.* keys) grows the header and is not in fixed_bytes.

Measurements are kept beside the tensor cache (`measure-<key>.json` in the cache's key directory, keyed by
model sha256, calibration digest, imatrix digest and candidate set), written every `save_every` tensors: a
rerun continues where a killed one stopped, and a finished one is reused for every budget. A finished
measurement of a larger candidate set (the full set, for `--types portable`) holds every error a subset
needs, each computed from the same bytes: the subset's is cut from it (`_from_superset`), nothing measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.calibration.artifact import Calibration, check_matches
from ramp_cpp.errors import RampError
from ramp_cpp.executor import Executor
from ramp_cpp.llama.ggufio import ModelInfo, TensorInfo, read_inventory
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors, tensor_candidates
from ramp_cpp.measure.sensitivity import Option, Sensitivity, TensorOptions, undominated
from ramp_cpp.model.ladder import written_type

T = GGMLQuantizationType
Progress = Callable[[int, int], None]  # (done, total)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MeasureConfig:
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    save_every: int = 8  # tensors measured between two saves of the partial measurement
    chunk_elements: int = 1 << 24  # weights dequantized at once per type: bounds memory on large tensors
    n_threads: int | None = None  # llama.cpp's quantizer threads (None: all cores)
    in_memory: bool = False  # the tensor cache keeps only the base type on disk (tensorcache module doc)
    # issue 21: a linear's error from every `row_sample`-th span of SAMPLE_SPAN rows, scaled up (1: all rows).
    # With the cache in memory the candidates' bytes are made for the sampled rows only, which is most of
    # the measurement's quantization work; embeddings are always measured whole (their rows are weighted by
    # token frequency)
    row_sample: int = 1


def default_cache_root() -> Path:
    from ramp_cpp.store.cache import cache_dir

    return cache_dir() / "tensorcache"


def calibration_digest(cal: Calibration) -> str:
    """sha256 over what the measurement uses of a calibration: its config (the windows), token count and
    every tensor's sum_sq and count, in name order."""
    h = hashlib.sha256()
    h.update(json.dumps([cal.config.text, cal.config.samples, cal.config.ctx, cal.config.seed]).encode())
    h.update(cal.n_tokens.to_bytes(8, "little"))
    for name in sorted(cal.stats):
        s = cal.stats[name]
        sq = np.ascontiguousarray(s.sum_sq, dtype=np.float64)
        h.update(name.encode() + b"\0" + s.count.to_bytes(8, "little") + sq.tobytes())
    return h.hexdigest()


def head_stats_name(info: ModelInfo) -> str:
    """The name the calibration records the output head's input under: the head's own weight, which is
    token_embd.weight when the head is tied."""
    return "token_embd.weight" if info.tied_output else "output.weight"


def needed_stats(info: ModelInfo, tensors: Sequence[TensorInfo]) -> list[str]:
    """Calibration entries the weighting of `tensors` reads."""
    out = [t.name for t in tensors if t.role != "token_embd"]
    if info.tied_output and any(t.role == "token_embd" for t in tensors):
        out.append(head_stats_name(info))
    return out


def token_frequencies(
    model_path: str | os.PathLike[str], cal: Calibration, n_rows: int, text: str | None = None
) -> np.ndarray:
    """f_i of the module docstring, float64 (n_rows,): token counts in the calibration's windows over
    their total. `text`: the calibration text's body (default: loaded by its name, `cal.config.text`)."""
    from ramp_cpp.calibration.collect import windows
    from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
    from ramp_cpp.store.texts import load_text

    body = text if text is not None else load_text(cal.config.text)[0]
    with LlamaModel(model_path, RuntimeOptions(n_ctx=64, n_threads=1)) as m:
        tokens = m.tokenize(body)
        bos = m.bos if m.add_bos else None
    ids = np.concatenate(windows(tokens, cal.config, bos))
    if ids.size != cal.n_tokens:
        raise RampError(
            f"the calibration's windows hold {ids.size} tokens, it counted {cal.n_tokens}: "
            "its text changed since it was measured"
        )
    if ids.size == 0 or int(ids.min()) < 0 or int(ids.max()) >= n_rows:
        raise RampError(f"token ids outside the embedding table of {n_rows} rows")
    counts = np.bincount(ids, minlength=n_rows).astype(np.float64)
    return counts / counts.sum()


@dataclass(frozen=True)
class Weighting:
    """error_t = columns · Σ_i D_t,ij + rows · Σ_j D_t,ij (either may be absent); for an expert tensor
    `columns` holds one row per expert, applied to that expert's rows."""

    columns: np.ndarray | None  # float64 (n_per_row,), or (n_expert, n_per_row)
    rows: np.ndarray | None  # float64 (n_rows,)
    equal_experts: bool = False  # an expert tensor weighed without usage counts (module docstring)


def weighting(
    tensor: TensorInfo, info: ModelInfo, cal: Calibration, freqs: np.ndarray | None
) -> Weighting:
    def mean_sq(name: str) -> np.ndarray:
        s = cal.stats[name]
        return np.asarray(s.sum_sq, dtype=np.float64) / max(s.count, 1)

    if tensor.role == "token_embd":
        assert freqs is not None
        head = mean_sq(head_stats_name(info)) if info.tied_output else None
        return Weighting(head, freqs)
    if tensor.n_expert == 1:
        return Weighting(mean_sq(tensor.name), None)
    s = cal.stats[tensor.name]
    sum_sq = np.asarray(s.sum_sq, dtype=np.float64)
    if s.counts is not None and sum_sq.shape == (tensor.n_expert, tensor.n_per_row):
        return Weighting(sum_sq / max(s.count, 1), None)  # u_e · m_ej = sum_sq_ej / tokens seen
    pooled = sum_sq.reshape(-1, tensor.n_per_row).sum(axis=0) / max(s.count, 1)
    k = info.n_expert_used or 1
    return Weighting(np.tile(pooled * k / tensor.n_expert, (tensor.n_expert, 1)), None, equal_experts=True)


SAMPLE_SPAN = 16  # rows per sampled span: whole spans keep the row quantizer's calls few


def row_spans(n_rows: int, sample: int, step: int) -> tuple[list[tuple[int, int]], float]:
    """The (start, stop) row ranges measured, in pieces of at most `step` rows, and the scale n_rows / rows
    measured: all rows for `sample` 1, else the spans of SAMPLE_SPAN rows numbered 0, k, 2k, ... (k =
    `sample`), offset to the middle of their k-span stride so that first and last rows are not favoured."""
    if sample <= 1:
        return [(a, min(n_rows, a + step)) for a in range(0, n_rows, step)], 1.0
    stride = SAMPLE_SPAN * sample
    starts = range(min((stride - SAMPLE_SPAN) // 2, max(0, n_rows - SAMPLE_SPAN)), n_rows, stride)
    spans = [(a, min(n_rows, a + SAMPLE_SPAN)) for a in starts]
    return spans, n_rows / sum(b - a for a, b in spans)


def span_batches(spans: Sequence[tuple[int, int]], step: int) -> list[list[tuple[int, int]]]:
    """`spans` in order, cut into runs of at most `step` rows (a span longer than that alone): each run is
    read, quantized and compared in one call per type."""
    out: list[list[tuple[int, int]]] = []
    rows = step
    for a, b in spans:
        if rows + b - a > step or not out:
            out.append([])
            rows = 0
        out[-1].append((a, b))
        rows += b - a
    return out


def tensor_errors(
    source: Any,
    tensor: TensorInfo,
    written: Sequence[GGMLQuantizationType],
    weights: Weighting,
    rows_of: Callable[[GGMLQuantizationType, Sequence[tuple[int, int]], np.ndarray], np.ndarray],
    chunk_elements: int = 1 << 24,
    row_sample: int = 1,
) -> list[float]:
    """error_t for each type of `written`: `source` is the tensor's data as gguf-py reads it (one row per
    output), `rows_of(t, spans, w)` the dequantized rows of its type-t copy in the (start, stop) `spans`,
    one after another, `w` the source's same rows as float32. Rows are processed in batches of about
    `chunk_elements` weights. `row_sample` k > 1 (linears only): the rows of `row_spans`, the sum scaled by
    n_rows / rows measured, an unbiased estimate of the whole tensor's error."""
    from gguf.quants import dequantize

    from ramp_cpp.write.cachefiles import expert_runs, source_matrix

    src_type = T(int(source.tensor_type))
    data = source_matrix(source)
    n_rows, n_in = tensor.n_rows, tensor.n_per_row
    step = max(1, chunk_elements // n_in)
    spans, scale = row_spans(n_rows, row_sample if weights.rows is None else 1, step)
    acc = np.zeros(len(written), dtype=np.float64)
    for batch in span_batches(spans, max(step, SAMPLE_SPAN)):
        (a0, b0), *more = batch
        raw = np.concatenate([data[a:b] for a, b in batch]) if more else data[a0:b0]
        w = np.asarray(dequantize(raw, src_type), dtype=np.float32).reshape(len(raw), n_in)
        row_w = None if weights.rows is None else np.concatenate([weights.rows[a:b] for a, b in batch])
        for k, t in enumerate(written):
            d = rows_of(t, batch, w)
            d -= w
            np.square(d, out=d)
            if weights.columns is not None and weights.columns.ndim == 1:
                acc[k] += float(d.sum(axis=0, dtype=np.float64) @ weights.columns)
            elif weights.columns is not None:  # an expert tensor: each expert's rows by its own weights
                for e, a, b in expert_runs(tensor, batch):
                    acc[k] += float(d[a:b].sum(axis=0, dtype=np.float64) @ weights.columns[e])
            if row_w is not None:
                acc[k] += float(d.sum(axis=1, dtype=np.float64) @ row_w)
    return [float(x) * scale for x in acc]


# -- the stage -----------------------------------------------------------------------------------------


def measure_key(
    model_sha256: str, calibration: Calibration, imatrix: Mapping[str, np.ndarray] | None, cfg: MeasureConfig
) -> dict[str, Any]:
    """What a saved measurement is keyed by (`measure`'s state file)."""
    from ramp_cpp.measure.tensorcache import imatrix_digest

    return {
        "format": FORMAT_VERSION,
        "model_sha256": model_sha256,
        "calibration_digest": calibration_digest(calibration),
        "imatrix_digest": imatrix_digest(imatrix),
        **cfg.candidates.key(),
        # only when sampling: measurements of every row made before the option stay reusable
        **({"row_sample": cfg.row_sample} if cfg.row_sample > 1 else {}),
    }


def saved_sensitivity(
    model_sha256: str,
    calibration: Calibration,
    imatrix: Mapping[str, np.ndarray] | None,
    cfg: MeasureConfig,
    cache_root: str | os.PathLike[str],
) -> tuple[Sensitivity, Path] | None:
    """A finished measurement `measure` saved for these inputs (its tensor cache built with it), and the
    cache's key directory; None if there is none. Reads the state file only: no model, no hashing."""
    from ramp_cpp.measure.tensorcache import directory_for, imatrix_digest

    key = measure_key(model_sha256, calibration, imatrix, cfg)
    directory = directory_for(cache_root, model_sha256, imatrix_digest(imatrix), cfg.candidates.base)
    state = _read_state(_state_path(directory, key), key)
    if state is None or not state.get("complete"):
        state = _from_superset(directory, key)
    return (_sensitivity(state, key), directory) if state is not None else None


def _finished(directory: Path) -> list[dict[str, Any]]:
    """Every finished measurement saved in a cache's key directory, in name order."""
    out = []
    for p in sorted(directory.glob("measure-*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("key"), dict) and d.get("complete"):
            out.append(d)
    return out


def _from_superset(directory: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """`key`'s finished measurement cut from one saved for a larger candidate set of the `types` ladder with
    everything else equal, or None. A tensor's candidates are the types of the set its rows fit
    (candidates.candidates filters type by type), so the larger set's rows for this set's types are exactly
    the rows this set would measure, from the same cached bytes with the same weighting."""
    if key.get("ladder") != "types":
        return None
    rest, mine = {k: v for k, v in key.items() if k != "types"}, set(key["types"])
    for d in _finished(directory):
        k = d["key"]
        if {x: y for x, y in k.items() if x != "types"} != rest or not mine < set(k.get("types", ())):
            continue
        rows = {n: [n_params, [r for r in opts if r[0] in mine]] for n, (n_params, opts) in d["rows"].items()}
        if any(not opts for _, opts in rows.values()):
            return None  # a tensor no type of this set fits: `measure` says so, with its own message
        return {**d, "key": dict(key), "rows": rows, "cut_from": list(k["types"])}
    return None


def saved_measurements(directory: Path) -> list[Sensitivity]:
    """The sensitivity of every finished measurement in a cache's key directory: the group probes of one
    reuse the evaluations of another's whose files are the same (groups.calibrate_sensitivity's donors)."""
    out = []
    for d in _finished(directory):
        try:
            out.append(_sensitivity(d, d["key"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _state_path(directory: Path, key: Mapping[str, Any]) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return directory / f"measure-{h[:16]}.json"


def _read_state(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("key") == dict(key) else None


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    from ramp_cpp.store.atomic import atomic_path

    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(state))


def _sensitivity(state: Mapping[str, Any], key: Mapping[str, Any]) -> Sensitivity:
    tensors = []
    for name in state["order"]:
        n_params, rows = state["rows"][name]
        opts = undominated(Option(T.__members__[ty], int(nb), float(err)) for ty, nb, err in rows)
        tensors.append(TensorOptions(name, int(n_params), opts))
    return Sensitivity(
        model_sha256=key["model_sha256"],
        imatrix_digest=key["imatrix_digest"],
        fixed_bytes=int(state["fixed_bytes"]),
        n_params_total=int(state["n_params_total"]),
        tensors=tuple(tensors),
        calibration_digest=key["calibration_digest"],
        ladder=key["ladder"],
        candidate_types=tuple(T.__members__[x] for x in key["types"]),
        base=T.__members__[key["base"]],
    )


def measure(
    src: str | os.PathLike[str],
    calibration: Calibration,
    imatrix: Mapping[str, np.ndarray] | None,
    cfg: MeasureConfig = MeasureConfig(),
    cache_root: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    cache_progress: Progress | None = None,
    text: str | None = None,
    info: ModelInfo | None = None,
    executor: Executor | None = None,
) -> Sensitivity:
    """The sensitivity of `src` under `calibration` (measured on `src`, folded or not) with the tensor cache
    quantized with `imatrix` (None: without one) under `cache_root` (default: the user cache's
    tensorcache/, the layout `build_cache` uses, so a search's cache is reused). `progress(done, total)`
    counts tensors measured, `cache_progress` the types llama.cpp quantizes for the cache; `text` is the
    calibration text's body when it is not to be loaded by name."""
    from ramp_cpp.measure.tensorcache import (
        blob_nbytes,
        build_cache,
        dequantized_spans,
        directory_for,
        imatrix_digest,
        source_tensors,
    )
    from ramp_cpp.store.cache import file_sha256_cached

    if cfg.save_every < 1:
        raise RampError(f"save_every must be >= 1, got {cfg.save_every}")
    cc = cfg.candidates
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if not Path(src).is_file():
        raise RampError(f"{src}: no such file")
    sha = file_sha256_cached(src)
    if calibration.model_sha256 != sha:
        raise RampError(
            f"the calibration was measured on {calibration.model_name} (sha256 "
            f"{calibration.model_sha256[:12]}), not on {Path(src).name} ({sha[:12]}): calibrate this file"
        )
    digest = imatrix_digest(imatrix)
    key = measure_key(sha, calibration, imatrix, cfg)
    directory = directory_for(root, sha, digest, cc.base)
    path = _state_path(directory, key)
    state = _read_state(path, key)
    if state is not None and state.get("complete"):
        return _sensitivity(state, key)

    info = info or read_inventory(src)
    tensors = searched_tensors(info, cc.embeddings)
    check_matches(calibration, info, needed_stats(info, tensors))
    cands = {t.name: tensor_candidates(cc, t, imatrix is not None and t.name in imatrix) for t in tensors}
    empty = [t for t in tensors if not cands[t.name]]
    if empty:
        t = empty[0]
        raise RampError(
            f"{t.name}: no candidate type fits its rows of {t.n_per_row} weights "
            f"(candidates: {', '.join(x.name for x in cc.requested())}); add a 32-block type such as Q8_0"
        )
    names = [t.name for t in tensors]
    cache = build_cache(
        src, cc.requested(), root, imatrix=imatrix, base=cc.base, n_threads=cfg.n_threads,
        progress=cache_progress, searched=names, info=info, executor=executor, in_memory=cfg.in_memory,
    )
    if state is None and (cut := _from_superset(directory, key)) is not None:
        _write_state(path, cut)
        return _sensitivity(cut, key)
    align = cache.template.alignment

    def padded(n: int) -> int:
        return -(-n // align) * align

    if state is None:
        fixed = len(cache.template.meta)
        by_name = {t.name: t for t in info.tensors}
        for slot in cache.template.tensors:
            if slot.name in names:
                continue
            blob = cache.fixed.get(slot.name)
            if blob is None:  # a searchable tensor left out of this search: the base type's bytes
                wt = written_type(cc.base, by_name[slot.name].n_per_row)
                blob = cache.searched[(slot.name, wt)]
            fixed += padded(blob.nbytes)
        state = {
            "key": key,
            "fixed_bytes": fixed,
            "n_params_total": info.n_params_total,
            "order": names,
            "rows": {},
            "complete": False,
        }
    todo = [t for t in tensors if t.name not in state["rows"]]
    freqs = None
    if any(t.role == "token_embd" for t in todo):
        emb = next(t for t in todo if t.role == "token_embd")
        freqs = token_frequencies(src, calibration, emb.n_rows, text)
    source = source_tensors(src)
    since_save = 0
    for t in todo:
        written = [w for _, w in cands[t.name]]

        def rows_of(
            wt: GGMLQuantizationType, spans: Sequence[tuple[int, int]], w: np.ndarray, name: str = t.name
        ) -> np.ndarray:
            return dequantized_spans(cache, name, wt, spans, w)

        weights = weighting(t, info, calibration, freqs)
        if weights.equal_experts:
            state.setdefault("experts_weighed_equally", []).append(t.name)
        errs = tensor_errors(
            source[t.name], t, written, weights, rows_of, cfg.chunk_elements, cfg.row_sample,
        )
        nbytes = [padded(blob_nbytes(cache, t.name, w)) for w in written]
        state["rows"][t.name] = [
            t.n_params, [[w.name, nb, e] for w, nb, e in zip(written, nbytes, errs, strict=True)]
        ]
        since_save += 1
        done = len(state["rows"])
        if done == len(tensors):
            state["complete"] = True
        if since_save >= cfg.save_every or state["complete"]:
            _write_state(path, state)
            since_save = 0
        if progress:
            progress(done, len(tensors))
    if not state["complete"]:  # everything was measured before, only the flag is missing
        state["complete"] = True
        _write_state(path, state)
    return _sensitivity(state, key)

