"""Calibrate stage: run calibration text through llama.cpp and collect per-input-column activation
statistics of every weight tensor (the `Calibration` artifact of calibration.py).

Protocol: the whole text is tokenized once by the model's own tokenizer (with BOS when the vocabulary asks
for it) and cut into n_avail = len(tokens) // ctx aligned, non-overlapping windows; `samples` of them are
drawn without replacement by numpy's default_rng(seed). Each window is a fresh sequence whose first token
is replaced by BOS when the model uses one (as llama-perplexity's chunks). For every matmul input x of a
weight W (rows = tokens, columns = W's input features):

    max_abs[j] = max_t |x[t, j]|        sum_sq[j] = sum_t x[t, j]^2        count = samples * ctx

and for an expert tensor (3-D, met in MUL_MAT_ID) the same per expert e over the tokens routed to e, with
counts[e] those tokens (top-k of them per token, so counts add up to k * count), as llama-imatrix keeps them.

Windows never overlap, so no token is counted twice; a text too short for samples x ctx tokens is an
error that says how many tokens were needed and found, never silently a smaller or overlapping sample.

Recipes (calib/*.toml) name a text, samples, ctx and seed; see calib/README.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.calibration.artifact import CalibConfig, Calibration
from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.ggufio import ModelInfo, read_inventory
from ramp_cpp.store.cache import file_sha256_cached
from ramp_cpp.store.texts import CORPORA

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

Progress = Callable[[int, int], None]  # (windows done, windows total)

#: The recipe used when none is named: the paper's (CalibConfig's defaults, §5.2 / Table 10).
DEFAULT_RECIPE = "paper"


def recipe_dir() -> Path | None:
    """calib/ of the checkout this package runs from, or None for an installed package without it."""
    d = Path(__file__).resolve().parents[2] / "calib"
    return d if d.is_dir() else None


def recipes() -> list[str]:
    d = recipe_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d else [DEFAULT_RECIPE]


def config_from_mapping(data: Mapping[str, Any], where: str) -> CalibConfig:
    """A CalibConfig from a recipe's keys (text, samples, ctx, seed), each optional and type-checked."""
    known = {f.name: f for f in fields(CalibConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RampError(f"{where}: unknown key {unknown[0]!r} (a recipe has {', '.join(known)})")
    cfg = CalibConfig()
    for k, v in data.items():
        want = type(getattr(cfg, k))
        if not isinstance(v, want) or isinstance(v, bool):
            raise RampError(f"{where}: {k} must be {want.__name__}, got {v!r}")
        cfg = replace(cfg, **{k: v})
    return cfg


def load_recipe(spec: str = DEFAULT_RECIPE) -> CalibConfig:
    """A recipe by name (calib/NAME.toml) or by path to a .toml file. Without a calib/ directory, the name
    `paper` still resolves to the built-in paper defaults."""
    p = Path(spec)
    if p.suffix == ".toml" or os.sep in spec:
        if not p.is_file():
            raise RampError(f"{spec}: no such recipe file")
    else:
        d = recipe_dir()
        if d is None or not (d / f"{spec}.toml").is_file():
            if spec == DEFAULT_RECIPE:
                return CalibConfig()
            raise RampError(f"unknown recipe {spec!r} (known: {', '.join(recipes())}; or give a .toml path)")
        p = d / f"{spec}.toml"
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RampError(f"{p}: not valid TOML ({e})") from None
    return config_from_mapping(data, str(p))


def check_config(cfg: CalibConfig, context_length: int | None = None) -> None:
    """Refuse settings that cannot be run: too few samples or tokens, a window longer than the model's
    training context, or the held-out evaluation text."""
    if cfg.samples < 1:
        raise RampError(f"samples must be >= 1, got {cfg.samples}")
    if cfg.ctx < 2:
        raise RampError(f"ctx must be >= 2 tokens, got {cfg.ctx}")
    if cfg.seed < 0:
        raise RampError(f"seed must be >= 0, got {cfg.seed}")
    if context_length and cfg.ctx > context_length:
        raise RampError(f"ctx {cfg.ctx} exceeds the model's training context of {context_length} tokens")
    c = CORPORA.get(cfg.text)
    if c is not None and c.held_out:
        raise RampError(f"{cfg.text} is held out for evaluation; calibrate on another text (wikitext2-valid)")


def windows(tokens: np.ndarray, cfg: CalibConfig, bos: int | None) -> list[np.ndarray]:
    """The calibration windows: `samples` distinct aligned windows of `ctx` tokens drawn by
    default_rng(seed), in text order, each starting with BOS when the model uses one."""
    n_avail = len(tokens) // cfg.ctx
    if n_avail < cfg.samples:
        raise RampError(
            f"text too short: {cfg.samples} windows of {cfg.ctx} tokens need {cfg.samples * cfg.ctx} tokens, "
            f"found {len(tokens)} (room for {n_avail}); lower --samples or --ctx"
        )
    rng = np.random.default_rng(cfg.seed)
    picked = np.sort(rng.choice(n_avail, size=cfg.samples, replace=False))
    out = []
    for j in picked:
        w = tokens[j * cfg.ctx : (j + 1) * cfg.ctx].copy()
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def calibrate(
    model_path: str | os.PathLike[str],
    text: str,
    cfg: CalibConfig = CalibConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
    info: ModelInfo | None = None,
) -> Calibration:
    """Run `text` (the body of the text named `cfg.text`) through the model and return its statistics.
    `opts.n_ctx` is ignored: the context is `cfg.ctx`. `info`: the inventory, when the caller has it."""
    info = info or read_inventory(model_path)
    check_config(cfg, info.context_length or None)
    run_opts = RuntimeOptions(n_ctx=cfg.ctx, n_threads=opts.n_threads, n_gpu_layers=opts.n_gpu_layers)
    from ramp_cpp.llama.native import stats_model

    with stats_model(model_path, run_opts) as model:
        ws = windows(model.tokenize(text), cfg, model.bos if model.add_bos else None)
        model.reset()
        for i, w in enumerate(ws):
            model.run(w)
            if progress:
                progress(i + 1, len(ws))
        stats = model.stats()
    n_tokens = cfg.samples * cfg.ctx
    if not stats:
        raise RampError(f"{model_path}: llama.cpp ran no matmul on a named weight: nothing was measured")
    for name, s in stats.items():
        if s.count != n_tokens:
            raise RampError(f"{name} saw {s.count} rows, expected {n_tokens}: llama.cpp skipped tokens")
        if not (np.isfinite(s.max_abs).all() and np.isfinite(s.sum_sq).all()):
            raise RampError(f"{name}: non-finite activations: the model overflows on this text")
    return Calibration(
        model_name=Path(model_path).name,
        model_sha256=file_sha256_cached(model_path),
        arch=info.arch,
        config=cfg,
        n_tokens=n_tokens,
        stats=stats,
    )
