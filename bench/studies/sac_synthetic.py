"""Does the sized SAC search learn, or only sample around greedy? A synthetic objective, no llama.cpp.

48 tensors with candidate types Q2_K..Q8_0; proxy error w_i · 2^(−bpw). The "true" KLD multiplies the errors
of the tensors whose first layer-embedding dim exceeds 0.8 (a feature-defined group, ~1/5 of them) by
`--hidden`, which the proxy, and so greedy, does not know; `--noise` adds a fixed pseudo-random ±noise/2
relative term per allocation (what the reward chunks' idiosyncrasies look like to the search). Each row: the
search's best and its final mean-action policy as a ratio of greedy's true KLD, mean over seeds, with SAC
updates and without (`updates_per_episode=0`: the behaviour-cloned actor only samples around greedy).

    .venv/bin/python -m bench.studies.sac_synthetic [--evaluations 60] [--seeds 4] [--hidden 3] [--noise 0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ramp_cpp.allocate.allocators import greedy
from ramp_cpp.allocate.sac.search import search
from tests.test_sized_sac import budget_at, ctx_of, sens_of, small_cfg


def run(seed: int, evaluations: int, hidden: float, noise: float, updates: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    sens = sens_of(list(rng.exponential(1.0, 48)))
    ctx = ctx_of(sens, budget_at(sens, 4.6))
    weight = {i: hidden for i in np.flatnonzero(ctx.z[:, 0] > 0.8)}

    def score(choice: dict[str, Any]) -> float:
        key = ",".join(choice[t.name].name for t in sens.tensors).encode()
        u = int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF
        true = sum(t.option(choice[t.name]).error * weight.get(i, 1.0) for i, t in enumerate(sens.tensors))
        return true * (1 + noise * (u - 0.5))

    g = greedy(sens, ctx.budget_bytes)
    cfg = small_cfg(evaluations=evaluations, hidden=(256, 256), updates_per_episode=updates, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        out = search(ctx, score, g, cfg, Path(d))
    return out.kld / out.kld_ref, out.policy_kld / out.kld_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluations", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--hidden", type=float, default=3.0)
    ap.add_argument("--noise", type=float, default=0.1)
    a = ap.parse_args()
    print(f"{a.evaluations} evaluations, hidden factor {a.hidden}, noise ±{a.noise / 2:.0%}, {a.seeds} seeds")
    print("| SAC updates / episode | best / greedy (seeds) | mean | final policy / greedy (seeds) | mean |")
    print("|---|---|---|---|---|")
    for updates in (8, 0):
        r = [run(s, a.evaluations, a.hidden, a.noise, updates) for s in range(a.seeds)]
        best, pol = [x[0] for x in r], [x[1] for x in r]
        print(
            f"| {updates} | {', '.join(f'{x:.3f}' for x in best)} | {np.mean(best):.3f} | "
            f"{', '.join(f'{x:.3f}' for x in pol)} | {np.mean(pol):.3f} |"
        )


if __name__ == "__main__":
    main()
