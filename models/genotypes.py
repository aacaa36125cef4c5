"""Cell genotypes and the (standard / task-aware) search spaces they are drawn from.

A cell has `nodes` nodes; node 0 is the cell input and every pair i < j is an
edge carrying exactly one op. Edges are ordered by destination node, then by
source node: (0,1), (0,2), (1,2), (0,3), (1,3), (2,3), ...
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .operations import OP_NAMES

Space = tuple[tuple[str, ...], ...]


def edges(nodes: int) -> list[tuple[int, int]]:
    return [(i, j) for j in range(1, nodes) for i in range(j)]


def num_edges(nodes: int) -> int:
    return nodes * (nodes - 1) // 2


def _check_op(name: str) -> None:
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; valid op names: {', '.join(OP_NAMES)}")


@dataclass(frozen=True)
class Genotype:
    ops: tuple[str, ...]
    nodes: int = 3
    C: int = 16
    N: int = 1

    def __post_init__(self) -> None:
        # Normalise to a tuple so genotypes built from JSON lists hash and compare equal.
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.nodes < 2:
            raise ValueError(f"nodes must be >= 2, got {self.nodes}")
        if self.C < 1:
            raise ValueError(f"C must be >= 1, got {self.C}")
        if self.N < 1:
            raise ValueError(f"N must be >= 1, got {self.N}")
        expected = num_edges(self.nodes)
        if len(self.ops) != expected:
            raise ValueError(
                f"a cell with {self.nodes} nodes needs {expected} ops (one per edge), "
                f"got {len(self.ops)}"
            )
        for name in self.ops:
            _check_op(name)

    def to_json(self) -> dict[str, Any]:
        return {"ops": list(self.ops), "nodes": self.nodes, "C": self.C, "N": self.N}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Genotype:
        return cls(ops=tuple(d["ops"]), nodes=int(d["nodes"]), C=int(d["C"]), N=int(d["N"]))


def standard_space(nodes: int) -> Space:
    return tuple(OP_NAMES for _ in range(num_edges(nodes)))


def task_aware_space(genotypes: Iterable[Genotype]) -> Space:
    genotypes = list(genotypes)
    if not genotypes:
        raise ValueError("task_aware_space needs at least one genotype")
    nodes = {g.nodes for g in genotypes}
    if len(nodes) != 1:
        raise ValueError(f"all genotypes must have the same number of nodes, got {sorted(nodes)}")
    return tuple(
        tuple(sorted({g.ops[e] for g in genotypes})) for e in range(num_edges(nodes.pop()))
    )


def _check_space(space: Sequence[Sequence[str]], nodes: int) -> None:
    if len(space) != num_edges(nodes):
        raise ValueError(
            f"a space for {nodes} nodes needs {num_edges(nodes)} edges, got {len(space)}"
        )
    for e, allowed in enumerate(space):
        if not allowed:
            raise ValueError(f"edge {e} of the space has no allowed ops")
        for name in allowed:
            _check_op(name)


def space_size(space: Sequence[Sequence[str]]) -> int:
    return math.prod(len(set(allowed)) for allowed in space)


def sample_genotype(
    space: Sequence[Sequence[str]], rng: random.Random, nodes: int, C: int, N: int
) -> Genotype:
    _check_space(space, nodes)
    # Deduplicate and sort so a repeated name does not bias the draw and the
    # result depends only on the rng state, not on how the space was listed.
    ops = tuple(rng.choice(sorted(set(allowed))) for allowed in space)
    return Genotype(ops=ops, nodes=nodes, C=C, N=N)


def sample_distinct(
    space: Sequence[Sequence[str]],
    rng: random.Random,
    k: int,
    exclude: Iterable[Genotype] = (),
    nodes: int = 3,
    C: int = 16,
    N: int = 1,
) -> list[Genotype]:
    """Up to k uniformly drawn genotypes of the space, distinct and not in `exclude`."""
    _check_space(space, nodes)
    allowed = [set(a) for a in space]
    taken = {
        g for g in exclude
        if (g.nodes, g.C, g.N) == (nodes, C, N) and all(op in a for op, a in zip(g.ops, allowed))
    }
    target = min(k, space_size(space) - len(taken))
    out: list[Genotype] = []
    # Rejection sampling is cheap while most of the space is still free; the
    # attempt cap hands over to exact enumeration when the space is nearly used up.
    attempts = 0
    max_attempts = 20 * max(target, 1) + 100
    while len(out) < target and attempts < max_attempts:
        attempts += 1
        g = sample_genotype(space, rng, nodes, C, N)
        if g not in taken:
            taken.add(g)
            out.append(g)
    if len(out) < target:
        remaining = [
            g for g in (
                Genotype(ops=ops, nodes=nodes, C=C, N=N)
                for ops in itertools.product(*(sorted(a) for a in allowed))
            )
            if g not in taken
        ]
        out.extend(rng.sample(remaining, target - len(out)))
    return out
