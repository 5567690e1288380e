"""Finer measured sensitivity where it pays: after the group probes, split the groups whose damage per byte is
largest and probe their parts, within a budget of evaluations (issue 37 item 2; `GroupConfig.
refine_evaluations`, `search --refine-probes`).

A group (role × depth bucket, groups.groups_of) shares one measured ratio; its tensors need not. The parts a
probed node splits into (`Tree.children`): its per-layer sub-groups (label "role@block": the node's tensors
of that block) when its probe changes tensors of more than one block, else its single tensors (label: the
tensor's name) when it changes more than one, else none (a leaf). A level whose one part would probe the same
file as the node is skipped: a group of one block splits into its tensors directly.

    probe type  groups.probe_type of each tensor t; `effective`: the tensors whose probe type is not their
                highest option's (the reference's), the only ones a probe's file changes
    measured_n  KLD(probe_n) − KLD(reference): the ΔKLD of node n's probe (groups.py)
    saved_n     Σ_{t∈n} (nbytes_t(highest) − nbytes_t(probe)): the bytes n's probe saves against the reference
    damage per byte of n = measured_n / saved_n  (`damage_per_byte`)

`refine` spends the budget one split at a time: of the probed nodes not yet split that have parts (the probed
groups first, then every probed part), the one with the largest damage per byte (the first probed on a tie) is
split, and its parts are probed in one batch, those whose proxy predicts the most damage per byte first
(predicted_c / saved_c: the parent's ratio is common to them), as many as the budget has left. The measured
parts join the candidates, so a layer that stands out is split into its tensors before a milder group is
touched. With budget B it spends min(B, `Tree.capacity`) evaluations: every probed node eventually splits.

The choices depend only on the measured values, so a rerun with the saved evaluations (groups.py keeps them
by label) walks the same path without evaluating again, and a larger budget walks the same path further: its
first B probes are the budget-B run's. A probed part's ratio (measured / predicted, floored as the groups'
are) replaces its parent's for the part's tensors; the parts not probed keep the parent's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class Grouped(Protocol):
    """What a tree reads of a group (groups.Group)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def tensors(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Node:
    """A group or one of its parts: the tensors that share one measured ratio."""

    label: str  # a group's name, "role@block", or a tensor's name
    role: str
    tensors: tuple[str, ...]  # every tensor of the node, in visiting order (not only the effective ones)


class Tree:
    """The parts of `groups`: `block_of` each tensor's block (None for the embeddings); `effective` the
    tensors whose probe type is not their highest option (module docstring)."""

    def __init__(
        self, groups: Sequence[Grouped], block_of: Mapping[str, int | None], effective: Collection[str]
    ) -> None:
        self.block_of, self.effective = block_of, frozenset(effective)
        self.roots = {g.name: Node(g.name, g.role, g.tensors) for g in groups}

    def _by_block(self, tensors: Sequence[str]) -> dict[int | None, tuple[str, ...]]:
        out: dict[int | None, list[str]] = {}
        for t in tensors:
            out.setdefault(self.block_of[t], []).append(t)
        return {b: tuple(ts) for b, ts in out.items()}

    def children(self, node: Node) -> tuple[Node, ...]:
        """The parts `node` splits into (module docstring), in visiting order; () for a leaf."""
        eff = [t for t in node.tensors if t in self.effective]
        blocks = self._by_block(eff)
        if len(blocks) > 1:
            whole = self._by_block(node.tensors)
            return tuple(Node(f"{node.role}@{b}", node.role, whole[b]) for b in blocks)
        if len(eff) > 1:
            return tuple(Node(t, node.role, (t,)) for t in eff)
        return ()

    def capacity(self, roots: Sequence[str]) -> int:
        """How many nodes lie below the groups `roots`: the most evaluations a refinement of them spends."""
        todo, n = [self.roots[r] for r in roots], 0
        while todo:
            kids = self.children(todo.pop())
            n += len(kids)
            todo.extend(kids)
        return n

    def members(self) -> dict[str, tuple[str, ...]]:
        """Every part's label → its tensors, whatever the probes change (what groups.py's saved evaluations
        are read back by): the same for another candidate set of the same tensors, so its probes can lend."""
        out: dict[str, tuple[str, ...]] = {}
        for g in self.roots.values():
            blocks = self._by_block(g.tensors)
            if len(blocks) > 1:
                out.update((f"{g.role}@{b}", ts) for b, ts in blocks.items())
            if len(g.tensors) > 1:
                out.update((t, (t,)) for t in g.tensors)
        return out


def damage_per_byte(measured: float, saved: int) -> float:
    """ΔKLD of a probe per byte its types save against the reference (module docstring); 0 for a probe that
    saves nothing (it changes no tensor, and is never probed)."""
    return measured / saved if saved > 0 else 0.0


@dataclass(frozen=True)
class Probe:
    """One refined node's probe: its parent (a group's name or a part's label), the proxy's prediction, the
    bytes its types save and the ΔKLD it measured."""

    node: Node
    parent: str
    predicted: float
    saved: int
    measured: float

    @property
    def damage_per_byte(self) -> float:
        return damage_per_byte(self.measured, self.saved)


@dataclass(frozen=True)
class RefinedResult:
    """A probed part as groups.GroupReport holds it: `ratio` replaces `parent`'s for `tensors`."""

    name: str  # "role@block" or a tensor's name
    parent: str
    tensors: tuple[str, ...]
    predicted: float  # Δproxy of the probe
    saved_bytes: int  # bytes the probe's types save against the reference
    kld: float
    measured: float  # ΔKLD = kld − reference KLD
    damage_per_byte: float  # measured / saved_bytes
    raw_ratio: float  # measured / predicted
    ratio: float  # the scale applied: raw_ratio floored as the groups' are
    floored: bool


@dataclass(frozen=True)
class Refinement:
    probes: tuple[Probe, ...]  # in the order they were chosen: a parent's before its parts'
    splits: tuple[str, ...]  # the nodes split, in order (the last one's parts may be probed in part)


def refine(
    tree: Tree,
    measured: Mapping[str, float],
    budget: int,
    predicted: Callable[[Sequence[str]], float],
    saved: Callable[[Sequence[str]], int],
    measure: Callable[[Sequence[Node]], Mapping[str, float]],
) -> Refinement:
    """Spend up to `budget` evaluations on parts of the groups of `measured` (group name → its ΔKLD, in the
    order the groups were probed), as the module docstring says. `predicted(tensors)`: Δproxy of a probe of
    those tensors; `saved(tensors)`: the bytes it saves; `measure(nodes)`: each node's ΔKLD by label, its
    probes evaluated as one batch."""
    # (node, its ΔKLD, its damage per byte) of every probed node not yet split, in the order probed
    pool = [(tree.roots[g], m, damage_per_byte(m, saved(tree.roots[g].tensors))) for g, m in measured.items()]
    probes: list[Probe] = []
    splits: list[str] = []
    while len(probes) < budget:
        open_ = [e for e in pool if tree.children(e[0])]
        if not open_:
            break
        best = max(open_, key=lambda e: e[2])  # the first of the largest
        pool.remove(best)
        parent = best[0]
        # the parent's ratio is common to its parts: their proxy's damage per byte orders them
        kids = sorted(tree.children(parent), key=lambda c: -predicted(c.tensors) / max(1, saved(c.tensors)))
        kids = kids[: budget - len(probes)]
        got = measure(kids)
        splits.append(parent.label)
        for c in kids:
            p = Probe(c, parent.label, predicted(c.tensors), saved(c.tensors), got[c.label])
            probes.append(p)
            pool.append((c, p.measured, p.damage_per_byte))
    return Refinement(tuple(probes), tuple(splits))
