"""The paper's `--budget` run (`ramp-cpp paper-search`) around its allocator, the SAC search of
`ramp_cpp.allocate.paper.search` (paper §3, Algorithm 1):

- `prepare`: calibrate (or reuse), fold (§4.3), compute the layer embeddings (Table 24), quantize every
  searched tensor once per rung (the tensor cache) and score the base model on the reward chunks; each
  artifact is kept in the run directory, so a resumed run repeats none of them.
- `search`: the run directory (`run.json` holds the settings; a resumed run must match them), then the
  allocator's `train`, resumable from `checkpoint.safetensors` after every episode.
- `finish`: the policy file, the best allocation (`allocation_json`), its GGUF written by llama.cpp's
  quantizer with ramp.* metadata (`output_metadata`, §4.2.3) and the report against llama.cpp's presets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp import __version__
from ramp_cpp.allocate.budget import costs
from ramp_cpp.allocate.paper.search import (
    CHECKPOINT,
    Environment,
    OnEpisode,
    Prepared,
    SearchConfig,
    State,
    load_checkpoint,
    repaired_policy_allocation,
    save_checkpoint,
    train,
)
from ramp_cpp.allocate.sac.agent import SAC, SACConfig
from ramp_cpp.calibration.features import Features
from ramp_cpp.errors import RampError
from ramp_cpp.fold.source import (
    CALIB,
    Progress,
    calibrated_source,
    cleanup,
    ramp_output_name,
    staged,
    visited_tensors,
    workdir,
)
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions
from ramp_cpp.llama.evaluate import base_logprobs, eval_chunks, kld_loaded
from ramp_cpp.store.atomic import atomic_path

SETTINGS = "run.json"
#: the paper's bit ceiling when neither --budget nor --size is given (Table 10: target 4.0, ceiling 4.25)
DEFAULT_BUDGET = 4.25


def resolve_budget(
    model: str | os.PathLike[str], budget: float | None, mode: str, size: str | None
) -> tuple[float, str]:
    """--budget / --budget-mode / --size: the bit budget and its mode (a --size becomes MODEL's bits)."""
    from ramp_cpp.allocate.budget import size_budget
    from ramp_cpp.llama.ggufio import read_inventory

    if size is not None:
        if budget is not None:
            raise RampError("give either --budget or --size, not both")
        return size_budget(read_inventory(model), size), "size"
    return (DEFAULT_BUDGET if budget is None else budget), mode


# -- preparing a run --------------------------------------------------------------------------------


def settings(model_path: str, model_sha: str, cfg: SearchConfig, sac: SACConfig) -> dict[str, Any]:
    return {
        "ramp_version": __version__,
        "model_path": model_path,
        "model_sha256": model_sha,
        "search": cfg.to_json(),
        "sac": {k: v for k, v in asdict(sac).items() if k != "episodes"},
    }


def check_settings(run_dir: Path, want: dict[str, Any]) -> None:
    """Refuse to resume a run made with other settings (the episodes count may grow)."""
    have = json.loads((run_dir / SETTINGS).read_text())
    want = json.loads(json.dumps(want))  # tuples read back as lists
    diffs = []
    for sect in ("model_sha256", "search", "sac"):
        a, b = have.get(sect), want.get(sect)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{sect}.{k}: run has {a.get(k)!r}, now {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{sect}: run has {a!r}, now {b!r}")
    if diffs:
        raise RampError(
            f"{run_dir} was made with other settings ({'; '.join(diffs[:3])}); "
            "use the same options or a new --out"
        )


def prepare(
    model_path: str | os.PathLike[str],
    run_dir: Path,
    cfg: SearchConfig,
    opts: RuntimeOptions,
    calib: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    original: Any = None,
) -> Prepared:
    """Calibrate (or reuse), fold, compute features, build the tensor cache and the base statistics; each
    artifact is saved in `run_dir` and reused when present, so a resumed run repeats none of them.
    `original`: the model's inventory when the caller has already read it."""
    from ramp_cpp.calibration.features import FeatureConfig, compute_features
    from ramp_cpp.llama.ggufio import read_inventory, weight_moments
    from ramp_cpp.measure.tensorcache import build_cache
    from ramp_cpp.store.texts import load_text

    def stage(name: str) -> Callable[[int, int], None] | None:
        return staged(progress, name)

    source = calibrated_source(model_path, run_dir, cfg, opts, calib, progress, original)
    src, cal = source.path, source.cal
    base_imatrix = source.base_cal.imatrix() if cfg.imatrix else None
    model = read_inventory(src)
    visited = visited_tensors(model, cfg.include_embeddings)
    feats_path = run_dir / "features.json"
    if feats_path.is_file():
        feats = Features.from_json(json.loads(feats_path.read_text()))
    else:
        moments = weight_moments(src, [t.name for t in visited])
        feats = compute_features(model, moments, cal, FeatureConfig(variant=cfg.features), visited)
        with atomic_path(feats_path, force=True) as tmp:
            tmp.write_text(json.dumps(feats.to_json()))
    c = costs(model, visited, cfg.bits, cfg.base_type)
    c.check_budget(cfg.budget_spec)
    imatrix = cal.imatrix() if cfg.imatrix else None
    from ramp_cpp.allocate.budget import ladder_types

    cache = build_cache(
        src,
        [t.name for t in ladder_types(cfg.bits)],
        run_dir / "cache",
        imatrix=imatrix,
        base=cfg.base_type,
        n_threads=opts.n_threads,
        progress=stage("tensor cache"),
        searched=[t.name for t in visited],
    )
    ecfg = cfg.eval_config
    text, _ = load_text(cfg.text)
    base = base_logprobs(model_path, text, ecfg, opts, stage("base"))
    with LlamaModel(model_path, replace(opts, n_ctx=cfg.n_ctx)) as m:
        cs = eval_chunks(m, text, ecfg)
    base_ppl = float(np.exp(-base.target_lp.astype(np.float64).mean()))
    return Prepared(
        model_path=str(model_path),
        src_path=str(src),
        model=model,
        visited=visited,
        features=feats,
        z=feats.standardized(),
        costs=c,
        cache=cache,
        chunks=cs,
        base=base,
        base_ppl=base_ppl,
        calibration=cal,
        imatrix=imatrix,
        base_imatrix=base_imatrix,
    )

# -- the whole command ------------------------------------------------------------------------------


@dataclass
class SearchResult:
    run_dir: Path
    state: State
    gguf: Path | None
    policy: Path
    allocation: Path
    report: dict[str, Path]


def search(
    model_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    cfg: SearchConfig = SearchConfig(),
    sac: SACConfig = SACConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    resume: bool = False,
    calib: str | os.PathLike[str] | None = None,
    presets: tuple[str, ...] = ("Q4_K_M", "Q3_K_M"),
    progress: Progress | None = None,
    on_episode: OnEpisode | None = None,
) -> SearchResult:
    """`ramp-cpp search`: prepare, train (resumable), then write policy, allocation, GGUF and report."""
    from ramp_cpp.calibration.artifact import load_calibration
    from ramp_cpp.llama.ggufio import read_inventory
    from ramp_cpp.store.cache import file_sha256_cached as file_sha256

    rd = Path(run_dir)
    if resume and not (rd / SETTINGS).is_file():
        raise RampError(f"{rd}: no run to resume ({SETTINGS} missing)")
    if not resume and (rd / SETTINGS).is_file():
        raise RampError(f"{rd} already holds a run: add --resume to continue it, or choose another --out")
    if calib is None and resume and (rd / CALIB).is_file():
        calib = rd / CALIB  # a resumed run keeps its own calibration
    if calib is not None:  # the run records the calibration it really uses
        cfg = replace(cfg, calib=load_calibration(calib).config)
    info = read_inventory(model_path)  # cheap checks first: nothing is written for a hopeless request
    costs(info, visited_tensors(info, cfg.include_embeddings), cfg.bits, cfg.base_type).check_budget(
        cfg.budget_spec
    )
    if calib is None:
        from ramp_cpp.calibration.collect import check_config

        check_config(cfg.calib, info.context_length or None)
    want = settings(str(Path(model_path).resolve()), file_sha256(model_path), cfg, sac)
    if resume:
        check_settings(rd, want)
    else:
        rd.mkdir(parents=True, exist_ok=True)
        with atomic_path(rd / SETTINGS, force=True) as tmp:
            tmp.write_text(json.dumps(want, indent=2))
    prep = prepare(model_path, rd, cfg, opts, calib, progress, original=info)
    if resume and (rd / CHECKPOINT).is_file():
        agent, st = load_checkpoint(rd)
        agent = _with_episodes(agent, sac)
    else:
        agent, st = SAC(prep.z.shape[1], sac), State()
    wd = workdir()
    try:
        env = Environment(prep, cfg, opts, wd)
        st = train(env, agent, st, sac.episodes, rd, on_episode)
        if st.best is None and st.log:
            st.best = repaired_policy_allocation(env, agent, st)
            save_checkpoint(rd, agent, st)
    finally:
        cleanup(wd)
    return finish(prep, cfg, agent, st, rd, opts, presets, progress)


def _with_episodes(agent: SAC, sac: SACConfig) -> SAC:
    """A resumed agent keeps its state; only the number of episodes may be raised on the command line."""
    agent.cfg = replace(agent.cfg, episodes=sac.episodes)
    return agent


def finish(
    prep: Prepared,
    cfg: SearchConfig,
    agent: SAC,
    st: State,
    rd: Path,
    opts: RuntimeOptions,
    presets: tuple[str, ...],
    progress: Progress | None,
) -> SearchResult:
    """Write the policy, the best allocation, its GGUF (llama.cpp's quantizer, with ramp.* metadata) and
    the report."""
    from ramp_cpp.allocate.sac.policyfile import actor_tensors, save_policy
    from ramp_cpp.llama.ggufio import add_metadata
    from ramp_cpp.llama.quantize import QuantizeOptions, quantize_map, quantize_preset
    from ramp_cpp.pipeline.report import BASE_QUALITY, write_report
    from ramp_cpp.store.cache import file_sha256, file_sha256_cached

    tensors = actor_tensors(
        agent.actor, prep.features.mean.astype(np.float32), prep.features.std.astype(np.float32)
    )
    summary = {
        "episodes": st.episode,
        "best_reward": st.best["reward"] if st.best else None,
        "best_quality": st.best["quality"] if st.best else None,
    }
    pol_meta = {
        "features": cfg.features,
        "bits": list(cfg.bits),
        "include_embeddings": cfg.include_embeddings,
        "search": cfg.to_json(),
        "source": {
            "model": Path(prep.model_path).name,
            "sha256": file_sha256_cached(prep.model_path),
            "arch": prep.model.arch,
            "n_blocks": prep.model.n_blocks,
        },
        **summary,
    }
    policy_path = save_policy(tensors, pol_meta, rd / "policy.safetensors")
    alloc_path = rd / "allocation.json"
    gguf: Path | None = None
    if st.best is not None:
        alloc = allocation_json(prep, st.best, cfg)
        with atomic_path(alloc_path, force=True) as tmp:
            tmp.write_text(json.dumps(alloc, indent=2))
        gguf = rd / ramp_output_name(prep.model_path, f"{cfg.budget:g}")
        qopts = QuantizeOptions(imatrix=prep.imatrix, n_threads=opts.n_threads, force=True)
        tmp_gguf = rd / ".final.gguf"
        quantize_map(prep.src_path, tmp_gguf, st.best["types"], cfg.base_type, qopts)
        meta = output_metadata(prep, cfg, st, file_sha256(policy_path))
        add_metadata(tmp_gguf, gguf, meta, force=True)
        tmp_gguf.unlink(missing_ok=True)
    points = []
    if st.best is not None:
        points.append(
            {
                "label": "ramp",
                "file_bytes": gguf.stat().st_size if gguf else 0,
                "quality": st.best["quality"],
                "kind": "ramp",
            }
        )
    wd = workdir()
    try:
        for name in presets:
            q = wd / f"{name}.gguf"
            im = prep.base_imatrix
            qo = QuantizeOptions(imatrix=im, n_threads=opts.n_threads)
            r = quantize_preset(prep.model_path, q, name, qo)
            with LlamaModel(q, replace(opts, n_ctx=cfg.n_ctx)) as m:
                k = kld_loaded(m, prep.chunks, prep.base)
            points.append(
                {
                    "label": name if im is None else f"{name}+imatrix",
                    "file_bytes": r.file_size,
                    "quality": k.ppl if cfg.metric == "ppl" else k.kld_mean,
                    "kind": "preset",
                }
            )
            q.unlink(missing_ok=True)
    finally:
        cleanup(wd)
    tinfo = [{"name": t.name, "role": t.role, "block": t.block, "n_params": t.n_params} for t in prep.visited]
    rmeta = {
        "model": Path(prep.model_path).name,
        "budget": cfg.budget,
        "target": cfg.budget - cfg.margin,
        BASE_QUALITY: prep.base_ppl if cfg.metric == "ppl" else 0.0,  # KLD of the base against itself
        "search": cfg.to_json(),
        **summary,
    }
    paths = write_report(rd, st.log, tinfo, st.best, points, rmeta)
    return SearchResult(rd, st, gguf, policy_path, alloc_path, paths)


def allocation_json(prep: Prepared, best: dict[str, Any], cfg: SearchConfig) -> dict[str, Any]:
    """tensor -> type, bits, bytes, in visiting order, with the budget measures of the whole allocation."""
    c = prep.costs
    rows = []
    for i, (t, r) in enumerate(zip(prep.visited, best["rungs"], strict=True)):
        rows.append(
            {
                "name": t.name,
                "bits": c.bits[r],
                "type": c.types[i][r],
                "bytes": int(c.nbytes[i, r]),
                "n_params": t.n_params,
            }
        )
    return {
        "model": Path(prep.model_path).name,
        "budget": cfg.budget,
        "budget_mode": cfg.budget_mode,
        "bpw": best["bpw"],
        "bpw_nominal": best["bpw_nominal"],
        "bpw_file": best["bpw_file"],
        "file_bytes_predicted": best["file_bytes"],
        "quality": {
            "metric": cfg.metric,
            "ppl": best["ppl"],
            "kld": best["kld"],
            "text": cfg.text,
            "chunks": cfg.chunks,
        },
        "episode": best["episode"],
        "repaired": bool(best.get("repaired", False)),
        "tensors": rows,
    }


def output_metadata(prep: Prepared, cfg: SearchConfig, st: State, policy_sha: str) -> dict[str, Any]:
    """ramp.* keys of the output GGUF (paper §4.2.3)."""
    best = st.best or {}
    return {
        "ramp.version": __version__,
        "ramp.budget": float(cfg.budget),
        "ramp.budget_mode": cfg.budget_mode,
        "ramp.bpw": float(best.get("bpw", 0.0)),
        "ramp.bpw_nominal": float(best.get("bpw_nominal", 0.0)),
        "ramp.tensor_names": [t.name for t in prep.visited],
        "ramp.tensor_bits": [int(b) for b in best.get("bits", [])],
        "ramp.tensor_types": [best["types"][t.name] for t in prep.visited] if best else [],
        "ramp.scale_folding": bool(cfg.fold),
        "ramp.calibration": prep.calibration.describe(),
        "ramp.imatrix": bool(cfg.imatrix),
        "ramp.policy_sha256": policy_sha,
        "ramp.episodes": int(st.episode),
        "ramp.best_reward": float(best.get("reward", 0.0)),
        "ramp.metric": cfg.metric,
        "ramp.repaired": bool(best.get("repaired", False)),
        "ramp.search_text": f"{cfg.text}, {cfg.chunks} chunks of {cfg.n_ctx} from chunk {cfg.first_chunk}",
    }
