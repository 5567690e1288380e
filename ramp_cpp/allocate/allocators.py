"""Allocators over the sensitivity artifact: one GGUF type per searched tensor under a whole-file byte budget.

Every allocator maps (`Sensitivity`, `budget_bytes`) to `{tensor name: GGMLQuantizationType}` for every tensor
in `sens.tensors`, with `sens.file_bytes(choice) <= budget_bytes`. A budget below `sens.min_bytes()` is a
`RampError` naming the feasible range; one at or above `sens.max_bytes()` gives every tensor its largest
option.

- `uniform`: no sensitivity at all; the baseline "uniform at the same file size".
- `greedy`: the multiple-choice knapsack on the measured errors (Lagrangian relaxation, fill, exchanges).
- `exact`: dynamic programming over bytes; the reference for tests and small models.

`ALLOCATORS` names the ones the CLI offers (`--method uniform|greedy`; "sac" lives in `search`). Both take a
second cap, `gpu` (allocate/gpu.py: the bytes of the GPU-resident tensors when experts are offloaded), and
honour both; `exact` and `project` know only the whole-file budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.allocate.gpu import GpuBudget
from ramp_cpp.errors import RampError
from ramp_cpp.measure.sensitivity import Option, Sensitivity, TensorOptions, undominated

Choice = dict[str, GGMLQuantizationType]


class Allocator(Protocol):
    def __call__(
        self, sens: Sensitivity, budget_bytes: int, /, *, gpu: GpuBudget | None = None
    ) -> Choice: ...


_MIB = 2**20
# exact's backtracking table is n_tensors x (capacity / quantum) bytes; past this it is not a "small model"
MAX_DP_CELLS = 50_000_000


def _check_budget(sens: Sensitivity, budget_bytes: int) -> bool:
    """Refuse an infeasible budget; True when it holds every tensor's largest option."""
    lo, hi = sens.min_bytes(), sens.max_bytes()
    if budget_bytes < lo:
        raise RampError(
            f"a budget of {budget_bytes / _MIB:.3f} MiB is below the smallest file these candidate types "
            f"allow: feasible range {lo / _MIB:.3f}-{hi / _MIB:.3f} MiB"
        )
    return budget_bytes >= hi


def _largest(sens: Sensitivity) -> Choice:
    return {t.name: t.options[-1].ggml_type for t in sens.tensors}


# --- uniform ------------------------------------------------------------------------------------------------


def uniform(sens: Sensitivity, budget_bytes: int, *, gpu: GpuBudget | None = None) -> Choice:
    """The sensitivity-free baseline: the one type nearest the budget, then filled to it.

    Every tensor takes the candidate whose bpw = 8 · nbytes / n_params is nearest a common level L (ties to
    the cheaper one); L is the highest of the distinct bpw values of all options whose allocation fits. The
    leftover bytes are then filled without looking at any error: in model order, first to last, each tensor is
    promoted to its next option when that still fits, in passes until a pass promotes nothing. The options are
    taken as listed (ascending nbytes), not pruned, since pruning reads the errors.

    Nothing here uses `Option.error`, so the result is "uniform at the same file size" as a sensitivity-driven
    allocation, the baseline to compare it with. The file size is nondecreasing in `budget_bytes`.

    With `gpu`, a level and a promotion must also keep the GPU-resident tensors' bytes within
    `gpu.weights_bytes` (those bytes grow with L too, so the bisection still holds).
    """
    if gpu is not None:
        gpu.check(sens)
    top = _largest(sens)
    if _check_budget(sens, budget_bytes) and (gpu is None or gpu.used(sens, top) <= gpu.weights_bytes):
        return top
    tensors = sens.tensors
    on_gpu = [gpu is not None and t.name in gpu.resident for t in tensors]
    gpu_cap = gpu.weights_bytes if gpu is not None else 0
    bpw = [[8 * o.nbytes / t.n_params for o in t.options] for t in tensors]
    levels = sorted({b for row in bpw for b in row})

    def nearest(level: float) -> list[int]:
        picks = []
        for row in bpw:
            best = 0
            for k, b in enumerate(row):  # ascending nbytes: strict < keeps the cheaper of a tie
                if abs(b - level) < abs(row[best] - level):
                    best = k
            picks.append(best)
        return picks

    def nbytes(picks: Sequence[int]) -> int:
        return sens.fixed_bytes + sum(t.options[k].nbytes for t, k in zip(tensors, picks, strict=True))

    def gbytes(picks: Sequence[int]) -> int:
        return sum(t.options[k].nbytes for t, k, g in zip(tensors, picks, on_gpu, strict=True) if g)

    def fits(picks: Sequence[int]) -> bool:
        return nbytes(picks) <= budget_bytes and (gpu is None or gbytes(picks) <= gpu_cap)

    # each tensor's nearest candidate only moves up as L grows, so the bytes are monotone in L: bisect
    lo, hi = 0, len(levels) - 1  # the lowest level is every tensor's first option, which fits (checked)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(nearest(levels[mid])):
            lo = mid
        else:
            hi = mid - 1
    cur = nearest(levels[lo])
    used, gused = nbytes(cur), gbytes(cur)
    promoted = True
    while promoted:
        promoted = False
        for i, t in enumerate(tensors):
            k = cur[i]
            if k + 1 < len(t.options):
                step = t.options[k + 1].nbytes - t.options[k].nbytes
                gstep = step if on_gpu[i] else 0
                if used + step <= budget_bytes and (gpu is None or gused + gstep <= gpu_cap):
                    cur[i], used, gused, promoted = k + 1, used + step, gused + gstep, True
    return {t.name: t.options[k].ggml_type for t, k in zip(tensors, cur, strict=True)}


# --- greedy (Lagrangian relaxation, fill, exchanges) --------------------------------------------------------


@dataclass(frozen=True)
class GreedySettings:
    fill: bool = True  # False stops at the Lagrangian solution (to see what the fill adds)
    max_exchanges: int = 1000  # after the fill (0: none); each lowers Σ error, so few are ever taken


def _pruned(options: Sequence[Option]) -> list[Option]:
    """The Pareto front: ascending nbytes, strictly descending error. The artifact promises this already;
    enforcing it again means a hand-built table can never make the knapsack buy bytes that add error."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if not front or o.error < front[-1].error:
            front.append(o)
    return front


def _hull(front: Sequence[Option]) -> list[int]:
    """Indices of `front` on its lower convex hull in the (nbytes, error) plane; collinear points are kept so
    the Lagrangian steps stay as small as the options allow."""
    h: list[int] = []
    for k, o in enumerate(front):
        while len(h) >= 2:
            a, b = front[h[-2]], front[h[-1]]
            # b lies above the chord a→o: slope(a, b) > slope(b, o), cross-multiplied (nbytes ascend)
            if (b.error - a.error) * (o.nbytes - b.nbytes) > (o.error - b.error) * (b.nbytes - a.nbytes):
                h.pop()
            else:
                break
        h.append(k)
    return h


def frontier(options: Sequence[Option], slack: float = 0.0) -> list[Option]:
    """The options greedy's Lagrangian steps between: the Pareto front's lower convex hull in the (nbytes,
    error) plane. A type off it (more error per byte saved than a neighbour on it) is taken only by the fill
    or an exchange, so a plan that guesses greedy's types before it runs (`pipeline.mixes`) guesses from
    these. With `slack`, a front option whose error is at most (1 + slack) times the hull's chord at its
    bytes is kept too: errors measured roughly may put one just above a hull that exact ones put it on."""
    front = _pruned(options)
    hull = _hull(front)
    keep = []
    for k, o in enumerate(front):
        i, j = max(h for h in hull if h <= k), min(h for h in hull if h >= k)
        a, b = front[i], front[j]
        t = 0.0 if i == j else (o.nbytes - a.nbytes) / (b.nbytes - a.nbytes)
        chord = a.error + t * (b.error - a.error)
        if o.error <= (1 + slack) * chord:
            keep.append(o)
    return keep


@dataclass(frozen=True)
class _Relaxation:
    fronts: list[list[Option]]
    cur: list[int]  # per tensor, index into its front: the Lagrangian solution
    used: int  # file bytes of `cur`
    lower_bound: float  # the LP relaxation's optimum: no allocation within the budget has less error


def _relax(sens: Sensitivity, budget_bytes: int) -> _Relaxation:
    """Walk all tensors' hull segments by falling efficiency −Δerror/Δbytes, taking each while it fits.

    For a multiplier λ ≥ 0 every tensor independently takes argmin_t error_i(t) + λ·nbytes_i(t), a hull
    vertex; lowering λ past a segment's efficiency moves that tensor along the segment. Sorting all segments
    by efficiency therefore visits every Lagrangian solution in order of growing bytes, and the longest
    prefix that fits is the one with the smallest total error that fits. Taking the first segment that does
    not fit by the fraction that would fill the budget exactly gives the LP relaxation's optimum, a lower
    bound on the knapsack: `lower_bound` ≤ optimum ≤ error of the prefix ≤ `lower_bound` + that segment's
    Δerror.
    """
    fronts = [_pruned(t.options) for t in sens.tensors]
    segs: list[tuple[float, int, int, int]] = []  # (−efficiency, tensor, position on its hull, vertex)
    for i, f in enumerate(fronts):
        h = _hull(f)
        eff_prev = math.inf
        for p, (j, k) in enumerate(zip(h, h[1:], strict=False)):
            # the running min keeps one tensor's segments in order even where rounding breaks convexity
            eff_prev = min(eff_prev, (f[j].error - f[k].error) / (f[k].nbytes - f[j].nbytes))
            segs.append((-eff_prev, i, p, k))
    segs.sort()
    cur = [0] * len(fronts)
    used = sens.fixed_bytes + sum(f[0].nbytes for f in fronts)
    err = sum(f[0].error for f in fronts)
    lower = None
    for _, i, _, k in segs:
        f, j = fronts[i], cur[i]
        step = f[k].nbytes - f[j].nbytes
        if used + step > budget_bytes:
            lower = err - (budget_bytes - used) / step * (f[j].error - f[k].error)
            break
        cur[i], used, err = k, used + step, err - (f[j].error - f[k].error)
    return _Relaxation(fronts, cur, used, err if lower is None else lower)


def lower_bound(sens: Sensitivity, budget_bytes: int) -> float:
    """The LP relaxation's optimum (see `_relax`): no allocation within `budget_bytes` has a smaller
    `sens.error`, so `sens.error(choice) − lower_bound` bounds how far any allocator is from optimal."""
    _check_budget(sens, budget_bytes)
    return _relax(sens, budget_bytes).lower_bound


def _fill(fronts: Sequence[Sequence[Option]], cur: list[int], slack: int) -> int:
    """While some single-tensor upgrade fits in `slack`, apply the one with the best −Δerror/Δbytes (to any
    higher option, hull or not); `cur` is updated in place, the slack left is returned."""
    while True:
        best: tuple[float, int, int] | None = None
        for i, f in enumerate(fronts):
            j = cur[i]
            for k in range(j + 1, len(f)):
                step = f[k].nbytes - f[j].nbytes
                if step > slack:
                    break
                gain = (f[j].error - f[k].error) / step
                if best is None or gain > best[0]:
                    best = (gain, i, k)
        if best is None:
            return slack
        _, i, k = best
        slack -= fronts[i][k].nbytes - fronts[i][cur[i]].nbytes
        cur[i] = k


def _exchange(fronts: Sequence[Sequence[Option]], cur: list[int], slack: int) -> int | None:
    """Apply the best "one tensor up, others down" exchange that lowers Σ error: the slack left, or None
    where none does. This crosses hull steps too big for the slack the fill left (a Q5_1 → Q8_0 step of a
    wide tensor paid for by a few narrow ones going down).

    For every upgrade u (tensor i to any higher option) the bytes it lacks, need = Δbytes_u − slack, are
    freed by downgrades of other tensors, at most one per tensor: taken in order of least error added per
    byte freed, each prefix of that order finished by the single downgrade adding the least error that
    frees the rest. An exchange's gain is −Δerror_u − Σ Δerror of its downgrades.
    """
    # (error added per byte freed, tensor, option, bytes freed, error added)
    downs: list[tuple[float, int, int, int, float]] = []
    ups: list[tuple[int, int, int, float]] = []
    for i, f in enumerate(fronts):
        j = cur[i]
        for k in range(len(f)):
            db, de = f[k].nbytes - f[j].nbytes, f[k].error - f[j].error
            if k < j:
                downs.append((de / -db, i, k, -db, de))
            elif k > j:
                ups.append((i, k, db, de))
    if not downs:
        return None
    downs.sort()
    d_tensor = np.array([d[1] for d in downs])
    d_freed = np.array([d[3] for d in downs])
    d_added = np.array([d[4] for d in downs])
    # relative threshold: a round-off "gain" must not make exchanges cycle
    best_gain = 1e-12 * sum(f[k].error for f, k in zip(fronts, cur, strict=True))
    best: list[int] | None = None  # indices into downs, the upgrade's index last
    for u, (i, _, db, de) in enumerate(ups):
        need, gain, taken = db - slack, -de, list[int]()
        free = d_tensor != i
        pos = 0
        while gain > best_gain:
            last = np.where(free & (d_freed >= need), d_added, np.inf)
            j = int(np.argmin(last))
            if gain - last[j] > best_gain:
                best_gain, best = gain - last[j], [*taken, j, -1 - u]
            while pos < len(downs) and not free[pos]:
                pos += 1
            if pos == len(downs):
                break
            taken.append(pos)
            need, gain = need - int(d_freed[pos]), gain - float(d_added[pos])
            free &= d_tensor != d_tensor[pos]
            if need <= 0:  # the prefix alone fits (a finish freeing ≥ need ≤ 0 was already weighed)
                break
    if best is None:
        return None
    for m in best:
        i, k = (downs[m][1], downs[m][2]) if m >= 0 else ups[-1 - m][:2]
        slack -= fronts[i][k].nbytes - fronts[i][cur[i]].nbytes
        cur[i] = k
    return slack


def greedy(
    sens: Sensitivity,
    budget_bytes: int,
    settings: GreedySettings | None = None,
    *,
    gpu: GpuBudget | None = None,
) -> Choice:
    """The multiple-choice knapsack over the measured errors,

        minimise Σ_i error_i(t_i)  subject to  fixed_bytes + Σ_i nbytes_i(t_i) ≤ budget_bytes,

    by Lagrangian relaxation: for λ ≥ 0 each tensor i independently takes argmin_t error_i(t) + λ·nbytes_i(t);
    the λ giving the smallest total that fits is found exactly by walking all tensors' convex-hull segments
    sorted by slope Δerror/Δbytes (`_relax`). Then the greedy fill (`_fill`): while some single-tensor upgrade
    still fits, apply the one with the best −Δerror/Δbytes, to any higher option of its tensor, hull or not.
    Then, while some exchange (one tensor up, others down) fits and lowers Σ error, apply the best and fill
    again (`_exchange`). Every step lowers the error, so the result is never worse than the Lagrangian
    solution, and it ends on a fill: no tensor's next option fits, the file is within one step of the budget.

    Gap: with E_LP = `lower_bound(sens, budget_bytes)` and Δ the error drop of the first hull segment that did
    not fit, E_LP ≤ optimum ≤ result ≤ E_LP + Δ. Cost: O(S log S) for S hull segments, O(n_tensors ·
    n_options) per fill step and O(M²) per exchange for M = n_tensors · n_options single moves (a few
    milliseconds on 210 tensors x 6 options).

    With `gpu` (a second cap, allocate/gpu.py) the objective is the same Σ error under both constraints,
    file bytes ≤ budget_bytes and GPU-resident bytes ≤ gpu.weights_bytes; `_two_caps` says how.
    """
    settings = settings or GreedySettings()
    if gpu is not None:
        gpu.check(sens)
        _check_budget(sens, budget_bytes)
        return _two_caps(sens, budget_bytes, settings, gpu)
    return _greedy(sens, budget_bytes, settings)


def _greedy(sens: Sensitivity, budget_bytes: int, settings: GreedySettings) -> Choice:
    if _check_budget(sens, budget_bytes):
        return _largest(sens)
    r = _relax(sens, budget_bytes)
    fronts, cur = r.fronts, list(r.cur)
    if settings.fill:
        slack = _fill(fronts, cur, budget_bytes - r.used)
        for _ in range(settings.max_exchanges):
            left = _exchange(fronts, cur, slack)
            if left is None:
                break
            slack = _fill(fronts, cur, left)
    return {t.name: f[k].ggml_type for t, f, k in zip(sens.tensors, fronts, cur, strict=True)}


def _penalised(sens: Sensitivity, resident: frozenset[str], mu: float) -> Sensitivity:
    """`sens` with every GPU-resident option's error raised by mu · its bytes (options that become dominated
    dropped): the Lagrangian of the GPU constraint."""
    out = [
        TensorOptions(t.name, t.n_params, undominated(Option(o.ggml_type, o.nbytes, o.error + mu * o.nbytes)
                                                      for o in t.options))
        if t.name in resident else t
        for t in sens.tensors
    ]
    return replace(sens, tensors=tuple(out))


def _two_caps(sens: Sensitivity, budget_bytes: int, settings: GreedySettings, gpu: GpuBudget) -> Choice:
    """Greedy under two knapsack constraints: minimise Σ_i error_i(t_i) subject to file bytes ≤ budget_bytes
    and Σ_{i GPU-resident} nbytes_i(t_i) ≤ gpu.weights_bytes.

    The GPU constraint is relaxed with a multiplier mu ≥ 0: the one-constraint greedy runs on errors
    error_i(t) + mu · nbytes_i(t) for the GPU-resident tensors (`_penalised`). At mu = 0 that is plain greedy
    (returned when it meets the cap: the cap does not bind); at `mu_hi`, above every resident tensor's
    steepest error drop per byte, every resident tensor takes its smallest option, which the caller has
    checked fits. Between them mu is bisected geometrically (48 steps) and the feasible allocation with the
    least true Σ error is kept (greedy's GPU bytes need not fall monotonically in mu, so the best one seen is
    kept, not the last). A last fill then spends what is left of both caps: while some single-tensor upgrade
    fits both, apply the one with the best −Δerror/Δfile-bytes. Every step keeps both caps; the result is
    feasible, never worse than the all-smallest GPU-resident allocation greedy finds at mu_hi, and carries
    no optimality bound (the relaxation's gap is not tracked).
    """
    def bytes_gpu(c: Choice) -> int:
        return gpu.used(sens, c)

    best = _greedy(sens, budget_bytes, settings)
    if bytes_gpu(best) <= gpu.weights_bytes:
        return best
    steep = [
        (a.error - b.error) / (b.nbytes - a.nbytes)
        for t in sens.tensors if t.name in gpu.resident
        for a, b in zip(t.options, t.options[1:], strict=False)
    ]
    # a drop between any two options is a byte-weighted mean of the neighbour drops between them, so above
    # the steepest neighbour drop every resident option costs more than the one below it
    mu_hi = 2.0 * max(steep, default=0.5) or 1.0
    best = _greedy(_penalised(sens, gpu.resident, mu_hi), budget_bytes, settings)
    assert bytes_gpu(best) <= gpu.weights_bytes  # every resident tensor at its smallest option (checked)
    lo, hi = math.log(mu_hi) - 40.0, math.log(mu_hi)
    for _ in range(48):
        mid = (lo + hi) / 2
        c = _greedy(_penalised(sens, gpu.resident, math.exp(mid)), budget_bytes, settings)
        if bytes_gpu(c) <= gpu.weights_bytes:
            hi = mid
            if sens.error(c) < sens.error(best):
                best = c
        else:
            lo = mid
    return _fill_two(sens, best, budget_bytes, gpu)


def _fill_two(sens: Sensitivity, choice: Choice, budget_bytes: int, gpu: GpuBudget) -> Choice:
    """`_fill` under both caps: single-tensor upgrades by best −Δerror/Δfile-bytes while one fits both."""
    fronts = [t.options for t in sens.tensors]
    cur = [f.index(t.option(choice[t.name])) for t, f in zip(sens.tensors, fronts, strict=True)]
    on_gpu = [t.name in gpu.resident for t in sens.tensors]
    slack, gslack = budget_bytes - sens.file_bytes(choice), gpu.weights_bytes - gpu.used(sens, choice)
    while True:
        pick: tuple[float, int, int] | None = None
        for i, f in enumerate(fronts):
            j = cur[i]
            for k in range(j + 1, len(f)):
                step = f[k].nbytes - f[j].nbytes
                if step > slack or (on_gpu[i] and step > gslack):
                    break
                gain = (f[j].error - f[k].error) / step
                if pick is None or gain > pick[0]:
                    pick = (gain, i, k)
        if pick is None:
            return {t.name: f[k].ggml_type for t, f, k in zip(sens.tensors, fronts, cur, strict=True)}
        _, i, k = pick
        step = fronts[i][k].nbytes - fronts[i][cur[i]].nbytes
        slack, gslack = slack - step, gslack - (step if on_gpu[i] else 0)
        cur[i] = k


# --- exact --------------------------------------------------------------------------------------------------


def exact(sens: Sensitivity, budget_bytes: int, quantum: int | None = None) -> Choice:
    """The knapsack's optimum by dynamic programming over bytes in units of `quantum`.

    Option i,t weighs w = ceil(nbytes_i(t) / quantum); capacity C = floor((budget_bytes − fixed_bytes) /
    quantum); best[i][c] = min_t best[i−1][c − w_t] + error_i(t) over the first i tensors. Rounding weights
    up keeps every result within the budget; it is exact when `quantum` divides every nbytes, as the default
    (their gcd) does. Cost: O(n_tensors · n_options · C) time and n_tensors · C bytes for backtracking, so it
    is for tests and small models; past MAX_DP_CELLS cells it is refused (raise `quantum`).
    """
    if _check_budget(sens, budget_bytes):
        return _largest(sens)
    tensors = sens.tensors
    if not tensors:
        return {}
    q = quantum if quantum is not None else math.gcd(*(o.nbytes for t in tensors for o in t.options))
    if q <= 0:
        raise RampError(f"the DP's byte quantum must be positive, not {q}")
    weights = [[-(-o.nbytes // q) for o in t.options] for t in tensors]
    cap = (budget_bytes - sens.fixed_bytes) // q - sum(min(w) for w in weights)
    if cap < 0:
        raise RampError(f"a byte quantum of {q} rounds every allocation over the budget: use a smaller one")
    if len(tensors) * (cap + 1) > MAX_DP_CELLS:
        raise RampError(
            f"exact allocation needs {len(tensors)} x {cap + 1} cells (limit {MAX_DP_CELLS}): "
            "raise the quantum"
        )
    if max(len(t.options) for t in tensors) > 255:
        raise RampError("exact allocation handles at most 255 options per tensor")
    best = np.zeros(cap + 1)  # best error with total weight ≤ c over the tensors so far
    pick = np.zeros((len(tensors), cap + 1), dtype=np.uint8)
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        new = np.full(cap + 1, np.inf)
        for k, (o, wk) in enumerate(zip(t.options, w, strict=True)):
            d = wk - min(w)
            if d > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[d:] = best[: cap + 1 - d] + o.error
            better = cand < new  # strict: a tie keeps the earlier, cheaper option
            new[better] = cand[better]
            pick[i, better] = k
        best = new
    choice: Choice = {}
    c = cap
    for i in range(len(tensors) - 1, -1, -1):
        k = int(pick[i, c])
        choice[tensors[i].name] = tensors[i].options[k].ggml_type
        c -= weights[i][k] - min(weights[i])
    return {t.name: choice[t.name] for t in tensors}


ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "greedy": greedy}


# --- projection ---------------------------------------------------------------------------------------------


def project(sens: Sensitivity, choice: Choice, budget_bytes: int) -> Choice:
    """The allocation nearest `choice` that fills the budget: the repair every SAC episode goes through.

    Over budget: repeatedly take the one-step downgrade (a tensor to its next cheaper option) adding the least
    error per byte freed, Δerror/Δbytes, until the file fits. Then the greedy fill (`_fill`): while some
    single-tensor upgrade fits in the slack, apply the one with the best −Δerror/Δbytes. The result satisfies
    `sens.file_bytes(result) <= budget_bytes` and no single upgrade fits any more, so every projected episode
    uses the budget up to the last step (the paper's episodes may land anywhere around the ceiling).
    """
    if _check_budget(sens, budget_bytes):
        return _largest(sens)
    fronts = [t.options for t in sens.tensors]
    cur = [f.index(t.option(choice[t.name])) for t, f in zip(sens.tensors, fronts, strict=True)]
    over = sens.file_bytes(choice) - budget_bytes
    while over > 0:
        best: tuple[float, int] | None = None
        for i, f in enumerate(fronts):
            j = cur[i]
            if j == 0:
                continue
            cost = (f[j - 1].error - f[j].error) / (f[j].nbytes - f[j - 1].nbytes)
            if best is None or cost < best[0]:
                best = (cost, i)
        assert best is not None  # budget >= min_bytes, so something can still go down
        i = best[1]
        over -= fronts[i][cur[i]].nbytes - fronts[i][cur[i] - 1].nbytes
        cur[i] -= 1
    _fill(fronts, cur, -over)
    return {t.name: f[k].ggml_type for t, f, k in zip(sens.tensors, fronts, cur, strict=True)}
