"""Allocators on hand-built sensitivity tables: against brute force, the LP bound, each other, the budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ramp_cpp.allocate.allocators import (
    ALLOCATORS,
    GreedySettings,
    exact,
    frontier,
    greedy,
    lower_bound,
    uniform,
)
from ramp_cpp.errors import RampError
from ramp_cpp.measure.sensitivity import Option, Sensitivity, TensorOptions

T = GGMLQuantizationType
# labels for the options of random tables, cheapest first (only their identity matters there)
LABELS = (T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16)
ALL: dict[str, Callable[..., dict[str, GGMLQuantizationType]]] = {**ALLOCATORS, "exact": exact}


def table(
    rows: Sequence[Sequence[tuple[int, float]]], fixed: int = 1000, n_params: int = 4096
) -> Sensitivity:
    """Rows of (nbytes, error), one row per tensor, cheapest option first."""
    tensors = tuple(
        TensorOptions(f"blk.{i}.w", n_params, tuple(Option(LABELS[k], b, e) for k, (b, e) in enumerate(row)))
        for i, row in enumerate(rows)
    )
    return Sensitivity("0" * 64, None, fixed, n_params * len(rows) + 1000, tensors)


def random_rows(
    rng: np.random.Generator, n: int, k_lo: int, k_hi: int, step: int
) -> list[list[tuple[int, float]]]:
    """Strictly ascending bytes, strictly descending error, often non-convex."""
    rows = []
    for _ in range(n):
        k = int(rng.integers(k_lo, k_hi + 1))
        nb = int(rng.integers(step, 4 * step)) + np.cumsum(rng.integers(1, step, size=k))
        err = 0.01 + np.cumsum(rng.exponential(1.0, size=k))[::-1]
        rows.append([(int(b), float(e)) for b, e in zip(nb, err, strict=True)])
    return rows


def brute_force(sens: Sensitivity, budget: int) -> float:
    """Least total error over every allocation that fits, by enumeration."""
    nb, err = np.zeros(1, dtype=np.int64), np.zeros(1)
    for t in sens.tensors:
        nb = np.add.outer(nb, [o.nbytes for o in t.options]).ravel()
        err = np.add.outer(err, [o.error for o in t.options]).ravel()
    return float(err[nb + sens.fixed_bytes <= budget].min())


def random_budget(rng: np.random.Generator, sens: Sensitivity) -> int:
    return int(rng.integers(sens.min_bytes(), sens.max_bytes() + 1))


def next_steps(sens: Sensitivity, choice: dict[str, GGMLQuantizationType]) -> list[int]:
    """Bytes of each tensor's upgrade to its next option (tensors at their largest have none)."""
    out = []
    for t in sens.tensors:
        k = [o.ggml_type for o in t.options].index(choice[t.name])
        if k + 1 < len(t.options):
            out.append(t.options[k + 1].nbytes - t.options[k].nbytes)
    return out


# --- small random tables against brute force ----------------------------------------------------------------

SMALL = [  # (seed, tables, tensors lo-hi, options lo-hi, byte step)
    (0, 120, (4, 7), (2, 5), 50),
    (1, 120, (4, 7), (2, 5), 7),  # small steps: many ties in bytes between allocations
    (2, 60, (1, 3), (1, 4), 30),  # degenerate: single tensors, single options
]


@pytest.mark.parametrize(("seed", "count", "n", "k", "step"), SMALL)
def test_exact_equals_brute_force(
    seed: int, count: int, n: tuple[int, int], k: tuple[int, int], step: int
) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        sens = table(random_rows(rng, int(rng.integers(n[0], n[1] + 1)), *k, step))
        budget = random_budget(rng, sens)
        choice = exact(sens, budget)
        assert sens.file_bytes(choice) <= budget
        assert sens.error(choice) == pytest.approx(brute_force(sens, budget), rel=1e-12)


@pytest.mark.parametrize(("seed", "count", "n", "k", "step"), SMALL)
def test_greedy_within_its_gap_of_brute_force(
    seed: int, count: int, n: tuple[int, int], k: tuple[int, int], step: int
) -> None:
    """LP bound ≤ optimum ≤ greedy ≤ fill alone ≤ Lagrangian solution ≤ LP bound + one hull segment's
    error drop, at most the widest error range of any tensor; the Lagrangian solution is optimal for its
    own bytes."""
    rng = np.random.default_rng(100 + seed)
    hits = 0
    for _ in range(count):
        sens = table(random_rows(rng, int(rng.integers(n[0], n[1] + 1)), *k, step))
        budget = random_budget(rng, sens)
        opt = brute_force(sens, budget)
        choice = greedy(sens, budget)
        filled = greedy(sens, budget, GreedySettings(max_exchanges=0))
        relaxed = greedy(sens, budget, GreedySettings(fill=False))
        got, got_filled, got_relaxed = sens.error(choice), sens.error(filled), sens.error(relaxed)
        lb = lower_bound(sens, budget)
        widest = max(t.options[0].error - t.options[-1].error for t in sens.tensors)
        assert all(sens.file_bytes(c) <= budget for c in (choice, filled, relaxed))
        assert lb <= opt + 1e-9 <= got + 2e-9 <= got_filled + 3e-9 <= got_relaxed + 4e-9 <= lb + widest + 5e-9
        assert all(s > budget - sens.file_bytes(filled) for s in next_steps(sens, filled))
        assert got_relaxed == pytest.approx(brute_force(sens, sens.file_bytes(relaxed)), rel=1e-12)
        assert all(s > budget - sens.file_bytes(choice) for s in next_steps(sens, choice))
        hits += got <= opt * (1 + 1e-12)
    assert hits >= 0.6 * count  # a fixed draw: measured 95-100% optimal


# --- medium tables against exact ----------------------------------------------------------------------------

WIDE = {  # row width -> candidate types, cheapest first (IQ4_NL before Q4_0: same bytes, less error)
    576: (T.IQ4_NL, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0),
    1536: (T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0),
}
# (name, rows, row width) per block of a SmolLM2-135M-shaped model
BLOCK = (
    ("attn_q", 576, 576),
    ("attn_k", 192, 576),
    ("attn_v", 192, 576),
    ("attn_output", 576, 576),
    ("ffn_gate", 1536, 576),
    ("ffn_up", 1536, 576),
    ("ffn_down", 576, 1536),
)


def nbytes_of(t: GGMLQuantizationType, rows: int, width: int, align: int = 32) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return -(-(rows * width // block * size) // align) * align


def realistic(n_layers: int, seed: int) -> Sensitivity:
    """Errors falling ~4x per extra bit on a per-tensor scale spread over two decades, ±10% noise."""
    rng = np.random.default_rng(seed)
    tensors = []
    for layer in range(n_layers):
        for name, rows, width in BLOCK:
            scale = 10 ** rng.uniform(-1, 1)
            opts: list[Option] = []
            for t in WIDE[width]:
                nb = nbytes_of(t, rows, width)
                bpw = 8 * nb / (rows * width)
                err = scale * rows * width * 4.0**-bpw * rng.uniform(0.9, 1.1)
                if opts and nb == opts[-1].nbytes:  # Q4_0 after IQ4_NL: the artifact keeps the better one
                    continue
                opts.append(Option(t, nb, float(err)))
            tensors.append(TensorOptions(f"blk.{layer}.{name}.weight", rows * width, tuple(opts)))
    n_params = sum(t.n_params for t in tensors)
    return Sensitivity("0" * 64, None, 30_000_000, n_params + 28_000_000, tuple(tensors))


@pytest.mark.parametrize(
    ("make", "count", "tol"),
    [
        (lambda rng: table(random_rows(rng, int(rng.integers(20, 41)), 3, 6, 300)), 25, 0.01),
        (lambda rng: realistic(3, int(rng.integers(1 << 30))), 25, 0.01),
    ],
    ids=["random", "realistic"],
)
def test_greedy_close_to_exact(
    make: Callable[[np.random.Generator], Sensitivity], count: int, tol: float
) -> None:
    rng = np.random.default_rng(7)
    worst = 1.0
    for _ in range(count):
        sens = make(rng)
        budget = random_budget(rng, sens)
        g, x = greedy(sens, budget), exact(sens, budget)
        assert sens.file_bytes(g) <= budget and sens.file_bytes(x) <= budget
        assert lower_bound(sens, budget) <= sens.error(x) * (1 + 1e-12)
        assert sens.error(x) <= sens.error(g) * (1 + 1e-12)
        worst = max(worst, sens.error(g) / sens.error(x))
    assert worst <= 1 + tol


# --- the budget's edges -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ALL))
def test_infeasible_budget_names_the_range(method: str) -> None:
    sens = table([[(2**20, 3.0), (2 * 2**20, 1.0)], [(2**20, 5.0), (3 * 2**20, 2.0)]], fixed=2**20)
    with pytest.raises(RampError, match=r"feasible range 3\.000-6\.000 MiB"):
        ALL[method](sens, sens.min_bytes() - 1)


@pytest.mark.parametrize("method", sorted(ALL))
@pytest.mark.parametrize("extra", [0, 1, 10**9])
def test_budget_at_or_above_max_gives_every_largest(method: str, extra: int) -> None:
    sens = table(random_rows(np.random.default_rng(3), 6, 2, 5, 40))
    choice = ALL[method](sens, sens.max_bytes() + extra)
    assert choice == {t.name: t.options[-1].ggml_type for t in sens.tensors}


@pytest.mark.parametrize("method", sorted(ALL))
def test_budget_at_min_gives_every_smallest(method: str) -> None:
    sens = table(random_rows(np.random.default_rng(4), 6, 2, 5, 40))
    choice = ALL[method](sens, sens.min_bytes())
    assert choice == {t.name: t.options[0].ggml_type for t in sens.tensors}


@pytest.mark.parametrize("method", sorted(ALL))
def test_every_tensor_allocated_in_model_order_and_fits(method: str) -> None:
    rng = np.random.default_rng(5)
    for _ in range(30):
        sens = table(random_rows(rng, 6, 1, 5, 60))
        budget = random_budget(rng, sens)
        choice = ALL[method](sens, budget)
        assert list(choice) == [t.name for t in sens.tensors]
        assert sens.file_bytes(choice) <= budget


# --- uniform ------------------------------------------------------------------------------------------------


def test_uniform_is_monotone_in_the_budget() -> None:
    for seed in range(4):
        sens = (
            realistic(2, seed) if seed % 2 else table(random_rows(np.random.default_rng(seed), 7, 2, 5, 50))
        )
        budgets = np.linspace(sens.min_bytes(), sens.max_bytes(), 150).astype(int)
        sizes = [sens.file_bytes(uniform(sens, int(b))) for b in budgets]
        assert all(s <= b for s, b in zip(sizes, budgets, strict=True))
        assert sizes == sorted(sizes)


@pytest.mark.parametrize("level", range(5))
def test_uniform_at_a_level_gives_every_tensor_that_level(level: int) -> None:
    """Tensors of different sizes whose k-th option is k+2 bits per weight; errors far from uniform."""
    rng = np.random.default_rng(level)
    rows = []
    sizes = [1024, 4096, 2048, 8192, 1024, 3072]
    for i, n in enumerate(sizes):
        errs = np.sort(rng.uniform(0, 1, 5))[::-1] * (1000 if i % 2 else 1)
        rows.append([((bits + 2) * n // 8, float(e)) for bits, e in enumerate(errs)])
    tensors = tuple(
        TensorOptions(f"t{i}", n, tuple(Option(LABELS[k], b, e) for k, (b, e) in enumerate(row)))
        for i, (n, row) in enumerate(zip(sizes, rows, strict=True))
    )
    sens = Sensitivity("0" * 64, None, 500, sum(sizes) + 500, tensors)
    budget = sens.fixed_bytes + sum(row[level][0] for row in rows)
    assert uniform(sens, budget) == {t.name: LABELS[level] for t in tensors}


@pytest.mark.parametrize(("t576", "t1536"), [(T.IQ4_NL, T.Q4_K), (T.Q5_0, T.Q5_K), (T.Q8_0, T.Q8_0)])
def test_uniform_on_the_realistic_table_at_a_type_level(
    t576: GGMLQuantizationType, t1536: GGMLQuantizationType
) -> None:
    sens = realistic(4, 0)
    want = {t.name: (t576 if t.options[0].ggml_type == T.IQ4_NL else t1536) for t in sens.tensors}
    budget = sens.fixed_bytes + sum(t.option(want[t.name]).nbytes for t in sens.tensors)
    assert uniform(sens, budget) == want


def test_uniform_ignores_the_errors() -> None:
    rng = np.random.default_rng(9)
    rows = random_rows(rng, 7, 2, 5, 50)
    a = table(rows)
    b = table(
        [[(nb, float(rng.uniform(1, 2)) * (len(row) - k)) for k, (nb, _) in enumerate(row)] for row in rows]
    )
    for budget in np.linspace(a.min_bytes(), a.max_bytes(), 40).astype(int):
        assert uniform(a, int(budget)) == uniform(b, int(budget))


# --- dominated options, the realistic table -----------------------------------------------------------------


def test_greedy_never_picks_a_dominated_option() -> None:
    """Options costing more and erring more than another of the same tensor (a table that skipped pruning)."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        rows = random_rows(rng, 6, 3, 5, 60)
        bad = []
        for row in rows:  # copy an option, make it a bit dearer and worse, insert it in bytes order
            j = int(rng.integers(0, len(row) - 1))
            b, e = row[j]
            dom = (b + int(rng.integers(0, row[j + 1][0] - b)), e * 1.5 + 0.1)
            row.insert(j + 1, dom)
            bad.append(j + 1)
        sens = table(rows)
        clean = table([[o for k, o in enumerate(row) if k != d] for row, d in zip(rows, bad, strict=True)])
        budget = random_budget(rng, sens)
        choice = greedy(sens, budget)
        assert all(choice[t.name] != LABELS[d] for t, d in zip(sens.tensors, bad, strict=True))
        assert sens.file_bytes(choice) <= budget
        # the same allocation as on the pruned table, up to the shifted labels
        kept = [[LABELS[k] for k in range(len(row)) if k != d] for row, d in zip(rows, bad, strict=True)]
        want = greedy(clean, budget)
        assert [choice[t.name] for t in sens.tensors] == [
            kept[i][LABELS.index(want[t.name])] for i, t in enumerate(clean.tensors)
        ]


@pytest.mark.parametrize("bpw", [4.6, 5.0, 5.5, 6.2, 7.5])
def test_realistic_table_lands_within_one_step(bpw: float) -> None:
    sens = realistic(30, 1)
    searched = sum(t.n_params for t in sens.tensors)
    budget = sens.fixed_bytes + int(bpw * searched / 8)
    g, u = greedy(sens, budget), uniform(sens, budget)
    for choice in (g, u):
        slack = budget - sens.file_bytes(choice)
        assert 0 <= slack < min(next_steps(sens, choice), default=slack + 1)
    assert lower_bound(sens, budget) <= sens.error(g) < sens.error(u)
    assert sens.error(g) <= lower_bound(sens, budget) * 1.005  # measured at most 1.0013


def test_uniform_tie_goes_to_the_cheaper_candidate() -> None:
    """Level 4 bpw lies midway between tensor a's 2 and 6: a takes 2 there, and the fill (model order) then
    promotes b first, which leaves no room for a's big step. Taking a's 6 at level 4 would end (b 4, a 6)."""
    n = 1024
    opts = {"b": ((T.Q4_0, 4), (T.Q5_0, 5)), "a": ((T.Q2_K, 2), (T.Q6_K, 6))}
    tensors = tuple(
        TensorOptions(name, n, tuple(Option(t, bits * n // 8, 10.0 - bits) for t, bits in o))
        for name, o in opts.items()
    )
    sens = Sensitivity("0" * 64, None, 0, 2 * n, tensors)
    assert uniform(sens, (4 + 6) * n // 8) == {"b": T.Q5_0, "a": T.Q2_K}


HAND = [  # (rows, budget, options picked by the Lagrangian solution + fill alone, by the full greedy)
    # c's step (best efficiency) does not fit; with 60 bytes left the fill buys x's 2.0, not y's 1.0
    (
        [[(100, 10.0), (200, 0.0)], [(100, 5.0), (150, 3.0)], [(100, 5.0), (150, 4.0)]],
        360,
        [0, 1, 0],
        [0, 1, 0],
    ),
    # a and b fill the budget; w's one big step, paid for by a and b going down, lowers the error 122 → 100
    (
        [[(100, 100.0), (400, 0.0)], [(100, 50.0), (200, 10.0)], [(100, 50.0), (200, 12.0)]],
        600,
        [0, 1, 1],
        [1, 0, 0],
    ),
]


@pytest.mark.parametrize(("rows", "budget", "filled", "full"), HAND)
def test_greedy_hand_cases(
    rows: list[list[tuple[int, float]]], budget: int, filled: list[int], full: list[int]
) -> None:
    sens = table(rows, fixed=0)
    picks = [LABELS[k] for k in filled]
    assert list(greedy(sens, budget, GreedySettings(max_exchanges=0)).values()) == picks
    assert list(greedy(sens, budget).values()) == [LABELS[k] for k in full]
    assert sens.error(greedy(sens, budget)) == brute_force(sens, budget)



def _kept_by_brute_force(opts: list[Option], o: Option, slack: float) -> bool:
    """Nothing costs no more and errs less, and o errs at most (1 + slack) x the lowest chord between two
    front options around its bytes (none around it: an end, kept)."""
    def dominated(p: Option) -> bool:
        return any(q.nbytes <= p.nbytes and q.error < p.error for q in opts if q is not p)

    if dominated(o):
        return False
    front = [p for p in opts if not dominated(p)]
    chords = [a.error + (b.error - a.error) * (o.nbytes - a.nbytes) / (b.nbytes - a.nbytes)
              for a in front for b in front if a.nbytes < o.nbytes < b.nbytes]
    return not chords or o.error <= (1 + slack) * min(chords) + 1e-12


@pytest.mark.parametrize("slack", [0.0, 0.05, 0.3])
def test_frontier_is_the_lower_convex_envelope_by_brute_force(slack: float) -> None:
    """allocators.frontier against its definition, on random option lists."""
    rng = np.random.default_rng(5)
    types = list(GGMLQuantizationType)[:8]
    for _ in range(200):
        n = int(rng.integers(2, 8))
        nbytes = sorted(int(b) for b in rng.choice(np.arange(1, 60), n, replace=False))
        opts = [Option(types[k], b, float(rng.uniform(0.0, 10.0))) for k, b in enumerate(nbytes)]
        assert frontier(opts, slack) == [o for o in opts if _kept_by_brute_force(opts, o, slack)]
