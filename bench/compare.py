"""One harness for every allocation comparison: presets with an imatrix, uniform and greedy (and later SAC) at
the whole-file sizes of llama.cpp's presets, on held-out `wikitext2-test`, with one calibration, folding
choice and imatrix shared by every row of a base. Resumable: each finished cell is stored in
`bench/results/<model>.json` and skipped next time; intermediate files go to `bench/out/<model>/`.

Protocol (the README's "Benchmark protocol"):
- bases (`bench/models.py`): `offgrid` (seeded function-preserving rescale: what a user's bf16 model is like)
  and `dequant` (the F16 dequantization of the shipped quantized file: on the source's grid);
- one calibration per base (`calib/bench.toml`: 16 × 512 tokens of wikitext2-valid, seed 0); the unfolded
  model's presets get its imatrix; a folded model gets the folded calibration's imatrix (E[x²]/s²);
  another `--recipe` keeps its calibration, folded copies and tensor cache in `recipe-<name>/` of the
  base's folder and its cells in a `--results` folder of their own;
- the target size of a row is the whole-file size of the named preset + imatrix on the same base; every
  allocated file must land within 0.5% below it;
- quality: mean KLD (and PPL, same-top %) against the base F16 on `wikitext2-test` chunks 0..N-1 of 512.

    .venv/bin/python -m bench.compare smollm2 --sizes Q3_K_M,Q4_K_S,Q4_K_M --methods uniform,greedy
    .venv/bin/python -m bench.compare qwen0.5b --sizes Q4_K_M --bases offgrid
    .venv/bin/python -m bench.compare smollm2 --workers 2          # cells as jobs on a local Ray
    .venv/bin/python -m bench.compare smollm2 --ray auto           # or on a cluster (same paths everywhere)

Cells fan out (`fan_out`): a `Cell` is a job `ramp_cpp.executor` runs anywhere. First the preset cells (they
set each size's target bytes), then every other cell, each batch on the executor; what cells share (the folded
copy, the sensitivity, the tensor cache, the base log-probs) is made once, before, in this process
(`warm`), so no two jobs write the same file. Every job writes its cell through `Results` (merged under a
lock), so a cell finished on a worker is kept if the run dies.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.models import MODELS, base_path
from ramp_cpp.calibration.artifact import Calibration, load_calibration, save_calibration
from ramp_cpp.calibration.collect import calibrate, load_recipe
from ramp_cpp.executor import Executor, Serial, make_executor
from ramp_cpp.fold.folding import FoldConfig, fold, folded_calibration_from_file
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, kld
from ramp_cpp.llama.quantize import QuantizeOptions, QuantizeResult, quantize_preset
from ramp_cpp.store.atomic import atomic_path
from ramp_cpp.store.texts import load_text

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
TOLERANCE = 0.005  # every allocated file within 0.5% below its target
#: llama.cpp's options for every cell this process runs; a cell run as a job sets its threads (`run_cell`), so
#: that two jobs on one machine do not both take all its cores
RUN = RuntimeOptions()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SEARCHED = "search"  # Fold.power of the exponent searched per fold group (FoldConfig(power=None))


@dataclass(frozen=True)
class Fold:
    """A folding setting: none, or Scale Folding with s = max|x|^power (the paper's power 1/2 is "fold",
    issue 14's strengths 0.25 ... are "fold-p0.25", issue 37's power searched per group is "fold-search"):
    the cell keys' second field."""

    power: float | str | None  # str: SEARCHED

    @classmethod
    def parse(cls, s: str) -> Fold:
        if s in ("off", "on"):
            return cls(FoldConfig().power if s == "on" else None)
        if s.startswith("p"):
            return cls(float(s[1:]))
        if s == SEARCHED:
            return cls(SEARCHED)
        raise SystemExit(f"--fold: off, on, pX (X the power of max|x|) or search, not {s!r}")

    def __bool__(self) -> bool:
        return self.power is not None

    @property
    def tag(self) -> str:
        if self.power is None:
            return "nofold"
        if self.power == SEARCHED:
            return "fold-search"
        return "fold" if self.power == FoldConfig().power else f"fold-p{self.power:g}"

    @property
    def row(self) -> dict[str, Any]:
        return {"fold": bool(self), **({"fold_power": self.power} if self.tag.startswith("fold-") else {})}


@dataclass
class Base:
    key: str
    name: str  # offgrid | dequant | permuted
    seed: int
    path: Path
    cal: Calibration
    out: Path
    recipe: dict[str, Any] = field(default_factory=dict)  # the rows' recipe fields (recipe_row)
    _folded: dict[str, tuple[Path, Calibration]] = field(default_factory=dict)

    def model(self, folded: Fold) -> tuple[Path, Calibration]:
        """(F16 file, its calibration): the base itself, or its scale-folded copy (made once per power)."""
        if folded.power is None:
            return self.path, self.cal
        if folded.tag not in self._folded:
            f = self.out / f"{folded.tag.replace('fold', 'folded')}.f16.gguf"
            cfg = FoldConfig(power=None if folded.power == SEARCHED else float(folded.power))
            if f.is_file():
                self._folded[folded.tag] = (f, folded_calibration_from_file(self.cal, f, cfg))
            else:
                r = fold(self.path, self.cal, f, cfg=cfg)
                self._folded[folded.tag] = (f, r.calibration)
        return self._folded[folded.tag]


#: the benchmark's calibration (calib/bench.toml); its files sit directly in a base's folder
BENCH_RECIPE = "bench"


def recipe_name(recipe: str) -> str:
    """A recipe's short name: its file's stem (calib/bench-32.toml: bench-32), or the name as given."""
    return Path(recipe).stem


def recipe_row(recipe: str, cal: Calibration) -> dict[str, Any]:
    """The row fields naming a cell's calibration: the recipe's name and keys, and where the calibration
    recorded them (made by `prepare` since issue 37), its wall time and its text's sha256."""
    kept = {f"calib_{k}": cal.extra[k] for k in ("seconds", "text_sha256") if k in cal.extra}
    return {"recipe": recipe_name(recipe), "calib": asdict(cal.config), **kept}


def calib_path(key: str, base: str, seed: int, recipe: str) -> Path:
    """Where `prepare` keeps the base's calibration by `recipe`; its folder is the base's `out`."""
    out = HERE / "out" / key / (base if base == "dequant" else f"{base}-s{seed}")
    cfg = load_recipe(recipe)
    if cfg != load_recipe(BENCH_RECIPE):
        out = out / f"recipe-{recipe_name(recipe)}"
    return out / f"calib-{cfg.samples}x{cfg.ctx}-s{cfg.seed}.safetensors"


def prepare(key: str, base: str, seed: int, recipe: str) -> Base:
    """The base, its calibration by `recipe` (made once) and its folder. The benchmark's recipe keeps the
    folder it always had; any other recipe gets its own `recipe-<name>/` inside it, so the calibration, the
    folded copies (made from the calibration's scales) and the tensor cache (quantized with its imatrix) of
    two recipes are never mixed up."""
    path = base_path(key, base, seed)
    cfg = load_recipe(recipe)
    cp = calib_path(key, base, seed, recipe)
    out = cp.parent
    out.mkdir(parents=True, exist_ok=True)
    if cp.is_file():
        cal = load_calibration(cp)
        if cal.config != cfg:
            raise SystemExit(f"{cp} was made by {asdict(cal.config)}, not by {recipe} ({asdict(cfg)}): "
                             "two recipes of one name; rename one")
    else:
        log(f"{key}/{base}: calibrating {cfg.samples}x{cfg.ctx} of {cfg.text}")
        text, _ = load_text(cfg.text)
        t0 = time.perf_counter()
        cal = calibrate(path, text, cfg)
        cal.extra |= {"seconds": time.perf_counter() - t0,
                      "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        save_calibration(cal, cp, force=True)
    return Base(key, base, seed, path, cal, out, recipe_row(recipe, cal))


class Results:
    """bench/results/<model>.json: cell key -> row. Every save merges into what is on disk under a lock
    (the cells and commands this process added win), so two processes on one model lose nothing."""

    def __init__(self, key: str, folder: str | None = None) -> None:
        self.path = (Path(folder) if folder else HERE / "results") / f"{key}.json"
        self.data: dict[str, Any] = self._read()
        self._cells: dict[str, Any] = {}  # what this process put
        self._commands: list[str] = []

    def _read(self) -> dict[str, Any]:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data.setdefault("cells", {})
        data.setdefault("commands", [])
        return data

    def command(self, argv: list[str], script: str = "-m bench.compare") -> None:
        self._commands.append(" ".join([".venv/bin/python", script, *argv]))
        self.save()

    def get(self, cell: str) -> dict[str, Any] | None:
        return self.data["cells"].get(cell)

    def put(self, cell: str, row: dict[str, Any]) -> None:
        self._cells[cell] = row
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            data["cells"].update(self._cells)
            data["commands"] += [c for c in self._commands if c not in data["commands"]]
            with atomic_path(self.path, force=True) as tmp:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        self.data = data


def evaluate(path: Path, b: Base, chunks: int) -> dict[str, Any]:
    text, _ = load_text("wikitext2-test")
    k = kld(path, b.path, text, EvalConfig(n_chunks=chunks), RUN)
    return {
        "ppl": k.ppl,
        "base_ppl": k.base_ppl,
        "kld_mean": k.kld_mean,
        "kld_stderr": k.kld_stderr,
        "kld_p99": k.kld_p99,
        "kld_p999": k.kld_p999,
        "same_top_pct": k.same_top_pct,
        "chunks": chunks,
    }


def file_row(r: QuantizeResult) -> dict[str, Any]:
    return {
        "file_bytes": r.file_size,
        "mib": r.file_size / MIB,
        "bpw_file": r.bpw_file,
        "bpw_searched": r.bpw_searched,
    }


def preset_cell(
    res: Results, b: Base, preset: str, folded: Fold, chunks: int, imatrix: bool = True
) -> dict[str, Any]:
    """llama.cpp's own preset on the (folded) base, with the base's imatrix or (imatrix=False, the
    "preset" cells of bench/run.py's sweep) without one."""
    kind = "preset+imatrix" if imatrix else "preset"
    cell = f"{b.name}-s{b.seed}|{folded.tag}|{kind}|{preset}|{chunks}"
    row = res.get(cell)
    if row is not None:
        return row
    src, cal = b.model(folded)
    q = b.out / f"{preset}.{folded.tag}.{kind}.gguf"
    log(f"{b.key}/{b.name}: {preset}{' + imatrix' if imatrix else ''} ({folded.tag})")
    im = cal.imatrix() if imatrix else None
    r = quantize_preset(src, q, preset, QuantizeOptions(imatrix=im, force=True, n_threads=RUN.n_threads))
    row = {
        "method": f"{preset}{' + imatrix' if imatrix else ''}",
        "base": b.name,
        "seed": b.seed,
        **b.recipe,
        **folded.row,
        "size_of": preset,
        **file_row(r),
        **evaluate(q, b, chunks),
    }
    q.unlink(missing_ok=True)
    res.put(cell, row)
    return row


MEASURED = "-measured"
TRANSFERRED = "greedy-transferred"  # greedy on the other benchmark models' group ratios (issue 23)
REWARD = EvalConfig(n_ctx=512, n_chunks=4)  # the search's reward chunks: wikitext2-valid, never the test text


def reward_kld(path: Path, b: Base) -> float:
    """KLD on the reward chunks (validation text): what `--fold auto` compares, never the held-out text."""
    return kld(path, b.path, load_text("wikitext2-valid")[0], REWARD, RUN).kld_mean


def candidate_config(method: str) -> Any:
    """The candidate set a method allocates over: a named set (`candidates.TYPE_SETS`) among its `-` fields
    (`greedy-measured-portable`: the K-quants and legacy types, no IQ), else the full set."""
    from ramp_cpp.measure.candidates import TYPE_SETS, CandidateConfig

    named = [tok for tok in method.split("-")[1:] if tok in TYPE_SETS]
    return CandidateConfig(types=TYPE_SETS[named[-1]].types) if named else CandidateConfig()


def measured(src: Path, cal: Calibration, b: Base, method: str = "") -> Any:
    """The proxy sensitivity of `src` over `method`'s candidate set, in the base's cache: a subset of the full
    set is cut from the full set's measurement (proxy._from_superset), not measured again."""
    from ramp_cpp.measure.proxy import MeasureConfig, measure

    mcfg = MeasureConfig(candidates=candidate_config(method))
    return measure(src, cal, cal.imatrix(), mcfg, cache_root=b.out / "cache")


def group_config(method: str) -> Any:
    """`greedy-measured[-bN][-probeX][-refineN][-SET]`: N depth buckets per role, probes at the candidate
    nearest X bpw (default: GroupConfig's, 4 buckets and each tensor's cheapest candidate), N refined probes
    after the groups (GroupConfig.refine_evaluations; the row's kld_groups.evaluations: the probes spent); SET
    a named candidate set (`candidate_config`)."""
    from ramp_cpp.measure.candidates import TYPE_SETS
    from ramp_cpp.measure.groups import GroupConfig

    kw: dict[str, Any] = {}
    for tok in method.split(MEASURED, 1)[1].split("-")[1:] if MEASURED in method else []:
        if tok in TYPE_SETS:
            continue
        if tok.startswith("b") and tok[1:].isdigit():
            kw["n_buckets"] = int(tok[1:])
        elif tok.startswith("probe"):
            kw["probe_bpw"] = float(tok.removeprefix("probe"))
        elif tok.startswith("refine") and tok[6:].isdigit():
            kw["refine_evaluations"] = int(tok[6:])
        else:
            raise SystemExit(f"{method}: unknown option {tok!r}")
    return GroupConfig(**kw)


def tensor_cache(b: Base, src: Path, cal: Calibration, sens: Any) -> Any:
    """The base's tensor cache of every candidate type of the searched tensors, quantized with the (folded)
    calibration's imatrix: the bytes every allocation of a cell is assembled from."""
    from ramp_cpp.measure.proxy import MeasureConfig
    from ramp_cpp.measure.tensorcache import build_cache

    cc = MeasureConfig().candidates
    return build_cache(src, cc.requested(), b.out / "cache", imatrix=cal.imatrix(), base=cc.base,
                       searched=[t.name for t in sens.tensors])


def calibrated(b: Base, src: Path, cal: Calibration, sens: Any, gcfg: Any = None) -> tuple[Any, Any]:
    """The measured sensitivity: group ratios from KLD on 4 chunks of wikitext2-valid vs the unfolded base.
    Another candidate set's probes of the same cache lend every probe file the two share (groups.py)."""
    from ramp_cpp.measure.groups import GroupConfig, calibrate_sensitivity

    cache = tensor_cache(b, src, cal, sens)
    log(f"{b.key}/{b.name}: group calibration on {src.name}")
    return calibrate_sensitivity(sens, cache, b.path, load_text("wikitext2-valid")[0], REWARD,
                                 cfg=gcfg or GroupConfig(), opts=RUN)


def sac_settings(method: str) -> Any:
    """`sac[-eN][-sN][-paper][-noproj][-cold][-tbl24][-frozen]`: N evaluations, seed N, Eq. 19-21 reward, no
    projection, no warm start, Table 24's state, no SAC updates."""
    from ramp_cpp.allocate.sac.search import SizedSearchConfig

    kw: dict[str, Any] = {}
    for tok in method.split("-")[1:]:
        if tok.startswith("s") and tok[1:].isdigit():
            kw["seed"] = int(tok[1:])
        elif tok == "paper":
            kw["reward"] = "paper"
        elif tok == "noproj":
            kw["projection"] = False
        elif tok == "cold":
            kw["warm_start"] = False
        elif tok == "tbl24":
            kw["variant"] = "paper"
        elif tok == "frozen":  # no SAC update: sampling around the warm start only (does learning help?)
            kw["updates_per_episode"] = 0
        elif tok.startswith("e") and tok[1:].isdigit():
            kw["evaluations"] = int(tok[1:])
        else:
            raise SystemExit(f"unknown SAC variant {tok!r} in {method!r}")
    return SizedSearchConfig(**kw)


def head(method: str, b: Base, folded: Fold, preset: str) -> dict[str, Any]:
    """The fields every row starts with."""
    return {"method": method, "base": b.name, "seed": b.seed, **b.recipe, **folded.row, "size_of": preset}


def transfer_cell(
    res: Results, b: Base, method: str, preset: str, target: int, folded: Fold, chunks: int
) -> dict[str, Any]:
    """`transfer-KEY`: the policy of `sac` at this size on model KEY (its bench run), rolled out zero-shot
    (mean action, projected) on this model's measured sensitivity; no search evaluation.
    `transfer-across`: the policy `bench/studies/across.py` trained on the other benchmark models, rolled
    out on this model's proxy sensitivity (issue 23: no evaluation on this model at all)."""
    cell = f"{b.name}-s{b.seed}|{folded.tag}|{method}|{preset}|{chunks}"
    row = res.get(cell)
    if row is not None:
        return row
    from ramp_cpp.allocate.sac.policyfile import load_sized_policy
    from ramp_cpp.measure.proxy import measure
    from ramp_cpp.measure.tensorcache import assemble

    key = method.split("-", 1)[1]
    across = key == "across"
    runs = HERE / "out" / key / "offgrid-s0" / "sac"
    pol_path = runs / f"fold-sac-{preset}" / "policy.safetensors"
    if across:
        pol_path = HERE / "out" / "across" / f"leave-{b.key}" / "policy.safetensors"
    elif not pol_path.is_file():  # a sized policy acts relative to the budget: Q4_K_M's serves any size
        pol_path = runs / "fold-sac-Q4_K_M" / "policy.safetensors"
    pol = load_sized_policy(pol_path)
    src, cal = b.model(folded)
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    if not across:
        sens, report = calibrated(b, src, cal, sens)
    from ramp_cpp.allocate.sac.scoring import policy_episode

    ep = policy_episode(pol, src, cal, sens, target)

    cache = tensor_cache(b, src, cal, sens)
    q = b.out / f"{method}.{preset}.{folded.tag}.gguf"
    log(f"{b.key}/{b.name}: {method} at {preset}'s size ({target / MIB:.2f} MiB)")
    assemble(cache, ep.choice, q, force=True)
    size = q.stat().st_size
    if size > target:
        raise SystemExit(f"{method}: {size} bytes is over the target {target}")
    row = {
        **head(method, b, folded, preset),
        "policy": str(pol_path.relative_to(HERE.parent)),
        "policy_sha256": pol.sha256,
        "projected_tensors": int(sum(ep.proposed[t.name] != ep.choice[t.name] for t in sens.tensors)),
        "bpw_file": 8 * size / sens.n_params_total,
        "under_target": size < target * (1 - TOLERANCE),
        "file_bytes": size,
        "mib": size / MIB,
        **evaluate(q, b, chunks),
        "reward_kld": reward_kld(q, b),
        "types": dict(sorted(Counter(t.name for t in ep.choice.values()).items())),
    }
    q.unlink(missing_ok=True)
    res.put(cell, row)
    return row


def sac_cell(
    res: Results, b: Base, method: str, preset: str, target: int, folded: Fold, chunks: int
) -> dict[str, Any]:
    """SAC on the measured sensitivity, warm-started from the measured greedy at the same size (same
    calibration, folding, imatrix and tensor cache); the result and the final policy's mean-action
    allocation both evaluated on the held-out chunks."""
    cell = f"{b.name}-s{b.seed}|{folded.tag}|{method}|{preset}|{chunks}"
    row = res.get(cell)
    if row is not None:
        return row
    from ramp_cpp.allocate.allocators import greedy
    from ramp_cpp.allocate.sac.policyfile import save_policy
    from ramp_cpp.allocate.sac.rollout import Context
    from ramp_cpp.allocate.sac.scoring import RewardScorer, layer_embeddings
    from ramp_cpp.allocate.sac.search import policy_meta, policy_tensors, search
    from ramp_cpp.fold.source import cleanup, workdir
    from ramp_cpp.measure.proxy import measure
    from ramp_cpp.measure.tensorcache import assemble

    scfg = sac_settings(method)
    src, cal = b.model(folded)
    sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
    sens, report = calibrated(b, src, cal, sens)
    ref = greedy(sens, target)
    ctx = Context(sens, layer_embeddings(src, cal, sens, scfg.variant), target, scfg.span, scfg.variant,
                  scfg.projection)
    cache = tensor_cache(b, src, cal, sens)
    rd = b.out / "sac" / f"{folded.tag}-{method}-{preset}"
    rd.mkdir(parents=True, exist_ok=True)
    wd = workdir()
    fl = f" ({folded.tag})"
    log(f"{b.key}/{b.name}: {method} at {preset}'s size ({target / MIB:.2f} MiB){fl}")
    t0 = time.perf_counter()

    def on_episode(r: dict[str, Any]) -> None:
        if r["episode"] % 10 == 0 or r["kind"] in ("reference", "final"):
            best = "-" if r["best_kld"] is None else f"{r['best_kld']:.5f}"
            log(f"  ep {r['episode']:3d} {r['kind']:9s} kld {r['kld']:.5f} best {best} "
                f"evals {r['evaluations']} R {r['reward']:+.4f} moved {r['projected_tensors']}")

    try:
        scorer = RewardScorer(cache, b.path, load_text("wikitext2-valid")[0], REWARD, RUN, wd)
        out = search(ctx, scorer, ref, scfg, rd, on_episode)
        t_search = time.perf_counter() - t0
        meta = policy_meta(ctx, scfg, scfg.variant)
        save_policy(policy_tensors(out.agent), meta, rd / "policy.safetensors")
        rows: dict[str, Any] = {}
        for label, choice in (("", out.choice), ("policy_", out.policy_choice)):
            q = b.out / f"{method}.{preset}.{folded.tag}.gguf"
            assemble(cache, choice, q, force=True)
            size = q.stat().st_size
            if size > target:
                raise SystemExit(f"{method}: {size} bytes is over the target {target}")
            ev = evaluate(q, b, chunks)
            rows[label] = {"file_bytes": size, "mib": size / MIB, **ev}
            q.unlink(missing_ok=True)
    finally:
        cleanup(wd)
    log_ = out.state.log
    beat = [r["evaluations"] for r in log_ if r["kind"] != "reference" and r["kld"] < out.kld_ref]
    row = {
        **head(method, b, folded, preset),
        "sac": scfg.to_json(),
        "t_search": t_search,
        "evaluations": out.state.evaluations,
        "episodes": out.state.episode,
        "reward_kld": out.kld,
        "reward_kld_greedy": out.kld_ref,
        "reward_kld_policy": out.policy_kld,
        "best_kind": out.state.best["kind"] if out.state.best else None,
        "evals_to_beat_greedy": beat[0] if beat else None,
        "t_eval_mean": float(sum(r["t_eval"] for r in log_ if not r["memo"]) / max(out.state.evaluations, 1)),
        "t_update_mean": float(sum(r.get("t_update", 0.0) for r in log_) / max(len(log_), 1)),
        "kld_groups": report.to_json(),
        "bpw_file": 8 * rows[""]["file_bytes"] / sens.n_params_total,
        "under_target": rows[""]["file_bytes"] < target * (1 - TOLERANCE),
        **rows[""],
        "policy": rows["policy_"],
        "types": dict(sorted(Counter(t.name for t in out.choice.values()).items())),
        "curve": [[r["evaluations"], r["kld"], r["best_kld"], r["kind"]] for r in log_],
    }
    res.put(cell, row)
    return row


def by_role(choice: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Tensor counts per (role, type) of an allocation: what each role (the experts' among them) received."""
    from ramp_cpp.model.arch import classify

    out: dict[str, Counter[str]] = {}
    for name, t in choice.items():
        out.setdefault(classify(name)[0].name, Counter())[t.name] += 1
    return {r: dict(sorted(c.items())) for r, c in out.items()}


def allocation(b: Base, method: str, target: int, folded: Fold) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(choice, sensitivity, the row's method fields) of an allocator's cell: the proxy sensitivity,
    calibrated per group by KLD on the reward chunks where the method is measured (probes kept beside the
    tensor cache, so a second call re-evaluates nothing), then the allocator at `target` whole-file bytes."""
    from ramp_cpp.allocate.allocators import ALLOCATORS
    from ramp_cpp.measure.candidates import CandidateConfig

    src, cal = b.model(folded)
    t0 = time.perf_counter()
    sens = proxy = measured(src, cal, b, method)
    cc = candidate_config(method)
    extra: dict[str, Any] = {"candidate_types": [t.name for t in cc.types]} if cc != CandidateConfig() else {}
    if MEASURED in method:  # the proxy calibrated per group by KLD on the reward chunks (groups.py)
        sens, report = calibrated(b, src, cal, sens, group_config(method))
        extra |= {"kld_groups": report.to_json()}
    elif method == TRANSFERRED:  # the other models' measured groups (bench/ratios.py): no evaluation here
        from bench.ratios import leave_out
        from ramp_cpp.llama.ggufio import read_inventory

        table = leave_out(b.key)
        sens = sens.scaled(table.factors(read_inventory(src), [t.name for t in sens.tensors]))
        extra |= {"ratio_sources": list(table.sources), "evaluations": 0}
    t1 = time.perf_counter()
    choice = ALLOCATORS[method.split("-")[0]](sens, target)
    t2 = time.perf_counter()
    # proxy_error: the imatrix-weighted error sum of the allocation under this calibration's own imatrix
    # (comparable between allocations of one calibration only); predicted_kld: the measured sensitivity's
    # sum, KLD above the reference (every searched tensor at its highest option) on the
    # reward chunks as the group probes predict it
    extra |= {"proxy_error": proxy.error(choice),
              **({"predicted_kld": sens.error(choice)} if sens is not proxy else {})}
    return choice, sens, {"t_measure": t1 - t0, "t_allocate": t2 - t1, **extra}


def alloc_cell(
    res: Results, b: Base, method: str, preset: str, target: int, folded: Fold, chunks: int
) -> dict[str, Any]:
    cell = f"{b.name}-s{b.seed}|{folded.tag}|{method}|{preset}|{chunks}"
    row = res.get(cell)
    if row is not None:
        return row
    from ramp_cpp.llama.quantize import quantize_map

    choice, sens, extra = allocation(b, method, target, folded)
    src, cal = b.model(folded)
    q = b.out / f"{method}.{preset}.{folded.tag}.gguf"
    log(
        f"{b.key}/{b.name}: {method} at {preset}'s size ({target / MIB:.2f} MiB)({folded.tag})"
    )
    qo = QuantizeOptions(imatrix=cal.imatrix(), force=True, n_threads=RUN.n_threads)
    r = quantize_map(src, q, choice, base="Q8_0", opts=qo)
    if r.file_size > target:
        raise SystemExit(f"{method}: {r.file_size} bytes is over the target {target}")
    # below the tolerance only when every larger candidate is dominated (measured no better): on a base
    # dequantized from a quantized file the source's type often is, and the table says so
    short = r.file_size < target * (1 - TOLERANCE)
    if short:
        log(
            f"{method}: {r.file_size} bytes, {100 * (1 - r.file_size / target):.1f}% under the target: "
            f"the largest undominated allocation is {sens.max_bytes()} bytes"
        )
    if r.file_size != sens.file_bytes(choice):
        log(f"warning: predicted {sens.file_bytes(choice)} bytes, wrote {r.file_size}")
    measured_here = any(k in extra for k in ("kld_groups", "ratio_sources", "candidate_types"))
    row = {
        "method": method,
        "base": b.name,
        "seed": b.seed,
        **b.recipe,
        **folded.row,
        "size_of": preset,
        "target_bytes": target,
        "under_target": short,
        "max_bytes": sens.max_bytes(),
        **extra,
        **file_row(r),
        **evaluate(q, b, chunks),
        **({"reward_kld": reward_kld(q, b)} if measured_here else {}),
        "types": dict(sorted(Counter(t.name for t in choice.values()).items())),
        "types_by_role": by_role(choice),
        "allocation": {n: t.name for n, t in choice.items()},
    }
    q.unlink(missing_ok=True)
    res.put(cell, row)
    return row


# -- cells as jobs ---------------------------------------------------------------------------------------

CELLS = {"alloc": alloc_cell, "sac": sac_cell, "transfer": transfer_cell}


@dataclass(frozen=True)
class Cell:
    """One cell of a base, as a job: `kind` is preset, preset-noimatrix (llama.cpp's preset without the
    imatrix), or the method's kind (alloc, sac, transfer); `target` the whole-file bytes (0 for presets)."""

    model: str
    base: str
    seed: int
    recipe: str
    kind: str
    method: str
    preset: str
    target: int
    fold: float | str | None
    chunks: int
    results: str | None = None  # Results' folder (None: bench/results)
    threads: int | None = None  # llama.cpp's threads in the job (None: all cores)

    @classmethod
    def of(cls, b: Base, recipe: str, method: str, preset: str, target: int, folded: Fold, chunks: int,
           results: str | None = None) -> Cell:
        first = method.split("-")[0]
        kind = method if first == "preset" else first if first in CELLS else "alloc"
        return cls(b.key, b.name, b.seed, recipe, kind, method, preset, target, folded.power, chunks, results)


def run_cell(c: Cell) -> dict[str, Any]:
    """The cell's row: computed here (on whatever worker runs the job) or read back when it is stored."""
    global RUN
    RUN = RuntimeOptions(n_threads=c.threads)
    res, b, folded = Results(c.model, c.results), prepare(c.model, c.base, c.seed, c.recipe), Fold(c.fold)
    if c.kind.startswith("preset"):
        return preset_cell(res, b, c.preset, folded, c.chunks, imatrix=c.kind == "preset")
    return CELLS[c.kind](res, b, c.method, c.preset, c.target, folded, c.chunks)


def warm(b: Base, folds: list[Fold], methods: list[str], chunks: int) -> None:
    """What the cells of `b` share, made once in this process before they fan out: each folding's model
    and sensitivity, the tensor cache where a method reads it, the base's log-probs on the held-out and the
    reward chunks."""
    from ramp_cpp.llama.evaluate import ensure_base_logprobs
    from ramp_cpp.measure.proxy import measure

    ensure_base_logprobs(b.path, load_text("wikitext2-test")[0], EvalConfig(n_chunks=chunks))
    ensure_base_logprobs(b.path, load_text("wikitext2-valid")[0], REWARD)
    cached = any(MEASURED in m or m.split("-")[0] in ("sac", "transfer") for m in methods)
    for folded in folds:
        src, cal = b.model(folded)
        if methods:
            sens = measure(src, cal, cal.imatrix(), cache_root=b.out / "cache")
            if cached:
                tensor_cache(b, src, cal, sens)
            # each named subset's measurement, cut from the full one once, here
            for m in {candidate_config(m): m for m in methods}.values():
                measured(src, cal, b, m)


def fan_out(ex: Executor, cells: list[Cell]) -> list[dict[str, Any]]:
    """Each cell's row, in the cells' order; the cells run as one batch of `ex` with its threads each."""
    jobs = [replace(c, threads=ex.threads) for c in cells]

    def done(i: int, row: dict[str, Any]) -> None:
        c = cells[i]
        log(f"cell {c.method} {c.preset} ({Fold(c.fold).tag}): done")

    return ex.map(run_cell, jobs, done if ex.workers > 1 else None)


def add_executor_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workers", type=int, default=None, help="cells as Ray jobs on N local workers")
    ap.add_argument("--ray", default=os.environ.get("RAY_ADDRESS"),
                    help="a Ray cluster's address (RAY_ADDRESS); the checkout must be at the same path there")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads per cell job")


def executor_of(a: argparse.Namespace) -> Executor:
    if a.workers is not None and a.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if not a.workers and not a.ray:
        return Serial(threads=a.threads)
    # the jobs import `bench.compare` from the checkout's root
    return make_executor(a.workers, a.ray, a.threads, 0, pythonpath=(str(HERE.parent),))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--bases", default="offgrid,dequant")
    ap.add_argument("--seed", type=int, default=0, help="off-grid seed")
    ap.add_argument("--sizes", default="Q3_K_M,Q4_K_M", help="presets whose whole-file size is each target")
    ap.add_argument("--methods", default="uniform,greedy")
    ap.add_argument("--fold", default="off,on",
                    help="folding settings to run: off, on (power 0.5), pX (power X), search (per group), "
                    "comma-separated")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--recipe", default=str(HERE.parent / "calib" / "bench.toml"))
    ap.add_argument("--results", default=None, help="the results folder (default: bench/results)")
    add_executor_args(ap)
    a = ap.parse_args()
    if a.results is None and load_recipe(a.recipe) != load_recipe(BENCH_RECIPE):
        raise SystemExit(f"--recipe {a.recipe}: give its cells a --results FOLDER of their own "
                         "(bench/results/<model>.json holds the benchmark recipe's)")
    ex = executor_of(a)
    res = Results(a.model, a.results)
    res.command(sys.argv[1:])
    folds = [Fold.parse(f) for f in a.fold.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    sizes = a.sizes.split(",")
    try:
        for base in a.bases.split(","):
            b = prepare(a.model, base, a.seed, a.recipe)
            warm(b, folds, methods, a.chunks)
            presets = [Cell.of(b, a.recipe, "preset", p, 0, f, a.chunks, a.results)
                       for p in sizes for f in [Fold(None), *(f for f in folds if f)]]
            rows = fan_out(ex, presets)
            target = {c.preset: r["file_bytes"] for c, r in zip(presets, rows, strict=True) if c.fold is None}
            fan_out(ex, [Cell.of(b, a.recipe, m, p, target[p], f, a.chunks, a.results)
                         for p in sizes for f in folds for m in methods])
    finally:
        ex.close()
    print(json.dumps(Results(a.model, a.results).data["cells"], indent=1))


if __name__ == "__main__":
    main()
