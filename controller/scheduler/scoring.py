"""Ranking: which feasible node a task goes to.

Nodes are ranked lexicographically by three named scorers; each later one only breaks the ties
of the ones before it:

1. **Best fit** (:func:`fit_scores`, higher is better): the mean, over cpu, memory and every
   scalar the task requests, of ``(allocated - own + request) / capacity``, where ``own`` is
   ``replicas of this service already on the node x request``. Dimensions with zero capacity are
   left out (a feasible node has capacity wherever the task has a request). This is best-fit
   bin-packing: the task goes where it fills the free shape most tightly, so small tasks fill
   gaps in busy nodes and large free nodes stay free for large tasks.
2. **Spread** (:func:`spread_counts`, lower is better): among nodes whose fit is equal (within
   :data:`FIT_TOLERANCE`), the one with fewest replicas of the same service.
3. **Seeded tie-break** (:func:`tie_keys`, lower is better): a 64-bit hash of
   ``(seed, node id, task id)``, stable across processes; never input order, never ``hash()``.

Why subtract ``own``: with plain best fit, a service's own replicas make a node look fuller, so
identical replicas on identical nodes would pile onto one node. Fit measured *without this
service's replicas* is the same on nodes that differ only in how many of them they hold, so the
spread scorer decides there (6 replicas on 3 identical nodes land 2/2/2), while load from other
services still drives packing. ``own`` assumes the replicas already on a node asked for what this
task asks for (true within one spec generation); it is clipped so a node never looks emptier than
empty.
"""

from __future__ import annotations

import numpy as np

from .model import CPU_DIM, MEMORY_DIM, FloatArray, HashArray, IntArray, NodeTable, mix64, stable_hash

FIT_TOLERANCE = 1e-9
"""Fit scores closer than this are equal, and spread decides."""


def scored_columns(request: IntArray) -> list[int]:
    """Columns the fit is measured on: cpu, memory and every scalar the task requests."""
    scalars = np.flatnonzero(request[MEMORY_DIM + 1 :] > 0) + MEMORY_DIM + 1
    return [CPU_DIM, MEMORY_DIM, *scalars.tolist()]


def fit_scores(table: NodeTable, rows: IntArray, request: IntArray, own_counts: IntArray) -> FloatArray:
    """Best-fit score of each node in ``rows`` (higher is tighter); see the module docstring.

    ``own_counts`` holds the replicas of the task's service on each of ``rows``.
    """
    total = np.zeros(rows.size)
    dimensions = np.zeros(rows.size, dtype=np.int64)
    subtract_own = bool(own_counts.any())
    for column in scored_columns(request):
        wanted = int(request[column])
        used = table.allocated[column][rows]
        if subtract_own and wanted:
            used = np.maximum(used - own_counts * wanted, 0)
        total += (used + wanted) * table.inverse_capacity[column][rows]
        dimensions += table.capacity[column][rows] > 0
    scores: FloatArray = total / np.maximum(dimensions, 1)
    return scores


def spread_counts(table: NodeTable, rows: IntArray, service: str) -> IntArray:
    """Replicas of ``service`` on each node in ``rows`` (fewer is better)."""
    counts: IntArray = table.service_counts(service)[rows]
    return counts


def tie_keys(table: NodeTable, rows: IntArray, task_id: str) -> HashArray:
    """Seeded, process-stable pseudo-random key per node in ``rows`` for ``task_id`` (lower wins)."""
    task_hash = np.uint64(stable_hash(table.seed, task_id))
    return mix64(table.node_hashes[rows] ^ task_hash)


def choose(table: NodeTable, rows: IntArray, request: IntArray, service: str, task_id: str) -> int:
    """The best node among the feasible ``rows`` (non-empty) for a task."""
    own = spread_counts(table, rows, service)
    scores = fit_scores(table, rows, request, own)
    best = scores >= scores.max() - FIT_TOLERANCE
    rows, own = rows[best], own[best]
    fewest = own == own.min()
    rows = rows[fewest]
    if rows.size == 1:
        return int(rows[0])
    return int(rows[np.argmin(tie_keys(table, rows, task_id))])
