"""Reference schedulers for ``bench.packing``: published node-scoring rules on one feasibility check.

Each baseline is a :data:`ScoreFn` (higher is better) plugged into :class:`Cluster`, a plain numpy
model of identical-or-not nodes: a task fits a node when ``allocated + request <= capacity`` in
every dimension (cpu, memory and every scalar), the best-scoring feasible node takes it, and ties
are broken by a seeded random draw (Kubernetes picks uniformly among the top-scoring nodes too).

Resources are dimension-major integer matrices, ``[dimension, node]``; dimension 0 is cpu, 1 is
memory, 2.. are scalars, as in Berth's ``NodeTable``.

What is idealised: both real schedulers combine several score plugins/iterators; here the resource
score alone ranks the nodes, and every feasible node is scored (Nomad's limit iterator normally
scores only ``max(2, ceil(log2 n))`` feasible nodes of a shuffled list, which packs less tightly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

ScoreFn = Callable[[IntArray, IntArray, IntArray], FloatArray]
"""``(capacity[d, k], allocated[d, k], request[d]) -> score[k]`` over ``k`` feasible nodes."""

CPU, MEMORY = 0, 1
MAX_NODE_SCORE = 100
"""Kubernetes' ``framework.MaxNodeScore``."""


def least_allocated(capacity: IntArray, allocated: IntArray, request: IntArray) -> FloatArray:
    """Kubernetes ``NodeResourcesFit`` scoring strategy ``LeastAllocated`` (the default).

    From kubernetes ``pkg/scheduler/framework/plugins/noderesources/least_allocated.go``::

        leastRequestedScore(requested, capacity) =
            0                                          if capacity == 0 or requested > capacity
            (capacity - requested) * MaxNodeScore / capacity   (int64 division)
        score = sum_r(leastRequestedScore_r * weight_r) / sum_r(weight_r)   (int64 division)

    where ``requested`` is what the node's pods request *plus the incoming pod*, and the default
    resources are ``cpu`` and ``memory`` with weight 1 each. Favours the emptiest node (spreading).
    Scalars are not scored (the default configuration), only checked for fit.
    """
    score = np.zeros(capacity.shape[1], dtype=np.int64)
    weight_sum = 0
    for dim, weight in ((CPU, 1), (MEMORY, 1)):
        cap = capacity[dim]
        requested = allocated[dim] + request[dim]
        safe = np.where(cap > 0, cap, 1)
        resource = ((cap - requested) * MAX_NODE_SCORE) // safe
        resource = np.where((cap == 0) | (requested > cap), 0, resource)
        score += resource * weight
        weight_sum += weight
    result: FloatArray = (score // weight_sum).astype(np.float64)
    return result


def bestfit_v3(capacity: IntArray, allocated: IntArray, request: IntArray) -> FloatArray:
    """Nomad's bin-packing fit score, ``ScoreFitBinPack`` ("BestFit v3" from Google's work).

    From nomad ``nomad/structs/funcs.go`` (used by ``scheduler/rank.go``'s ``BinPackIterator``
    with the default ``binpack`` algorithm)::

        freePctCpu = 1 - utilCpu / nodeCpu        (util includes the proposed allocation)
        freePctRam = 1 - utilMem / nodeMem
        total = 10^freePctCpu + 10^freePctRam
        score = clamp(20 - total, 0, 18)          higher is better

    A node left exactly full scores 18, an empty one ~0: the fullest node that fits wins. Nomad
    divides by 18 to normalise; that does not change the ranking. Scalars are not scored.
    """
    util = allocated[:2] + request[:2, None]
    cap = capacity[:2].astype(np.float64)
    free = 1.0 - np.divide(util, cap, out=np.ones(util.shape), where=cap > 0)
    total = np.power(10.0, free).sum(axis=0)
    result: FloatArray = np.clip(20.0 - total, 0.0, 18.0)
    return result


@dataclass(frozen=True)
class Baseline:
    """A named scoring rule."""

    name: str
    score: ScoreFn


BASELINES = (Baseline("least_allocated", least_allocated), Baseline("bestfit_v3", bestfit_v3))
"""Kubernetes' default spreading rule and Nomad's default bin-packing rule."""


class Cluster:
    """Nodes as ``[dimension, node]`` matrices; places tasks one at a time with a :data:`ScoreFn`."""

    def __init__(self, capacity: IntArray, score: ScoreFn, *, seed: int = 0) -> None:
        self.capacity: IntArray = np.array(capacity, dtype=np.int64)
        self.allocated: IntArray = np.zeros_like(self.capacity)
        self.score = score
        self._rng = np.random.default_rng(seed)

    def feasible(self, request: IntArray) -> npt.NDArray[np.intp]:
        """Rows of the nodes with ``request`` free in every dimension."""
        fits = (self.allocated + request[:, None] <= self.capacity).all(axis=0)
        rows: npt.NDArray[np.intp] = np.flatnonzero(fits)
        return rows

    def choose(self, request: IntArray) -> int | None:
        """The node the score picks for ``request`` (without placing it), or ``None``."""
        rows = self.feasible(request)
        if rows.size == 0:
            return None
        scores = self.score(self.capacity[:, rows], self.allocated[:, rows], request)
        best = rows[scores >= scores.max() - 1e-12]
        if best.size == 1:
            return int(best[0])
        return int(best[self._rng.integers(best.size)])

    def place(self, request: IntArray) -> int | None:
        """Place ``request`` on the chosen node and return its row, or ``None`` if none fits."""
        request = np.asarray(request, dtype=np.int64)
        row = self.choose(request)
        if row is not None:
            self.allocated[:, row] += request
        return row

    def hosts_used(self) -> int:
        """Nodes with anything allocated."""
        return int(np.count_nonzero(self.allocated.any(axis=0)))
