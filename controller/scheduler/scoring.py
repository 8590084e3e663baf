"""Ranking: which feasible node a task goes to.

Nodes are ranked lexicographically by named rankers; each later one only breaks the ties of the
ones before it. Every ranker gives a key per node, lower is better:

1. **Label spread** (:func:`domain_counts`, one ranker per key of ``task.spread``, in order):
   replicas of the service in the node's label domain (all nodes with the same value of that
   label, placements of this call included; no label is the domain ``""``). Like Swarm's spread
   preference or Nomad's spread at full weight, it outranks load: 6 replicas over zones ``a``
   (2 nodes) and ``b`` (1 node) land 3 and 3.
2. **Load** (:func:`load_scores`, higher score is better), by ``task.strategy``:

   - ``BINPACK`` (:func:`fit_scores`): the mean, over cpu, memory and every scalar the task
     requests, of ``(allocated - own + request) / capacity``, where ``own`` is ``replicas of this
     service already on the node x request``, less :data:`BALANCE_WEIGHT` x :func:`imbalance` of
     the free room left (over the dimensions the task requests, when it requests two or more).
     Dimensions with zero capacity are left out (a feasible node has capacity wherever the task
     has a request). Best-fit bin packing: the task goes where it fills the node most tightly, so
     small tasks fill gaps in busy nodes and large free nodes stay free for large tasks; but not
     where that leaves the node's free room lopsided (all memory and no cpu, say), because such
     room is stranded: no later task of a usual shape fits in it. Measured on the mixed stream of
     ``bench.packing`` (one task per call, up to the first that fits nowhere), plain best fit
     reached 93.1 % of the bottleneck resource and this score 95.9 %; it changes the hosts used
     on the packing instances by less than their noise. The ``imbalance`` is ``1 - cos`` of the
     angle between the free shares and the capacity's diagonal, faded out below
     :data:`BALANCE_FADE` of free room (a nearly full node's shape hardly matters, its fullness
     does); it depends on the node's own shares only, so the replica fast path stays exact.
   - ``SPREAD`` (:func:`emptiness_scores`): ``1 -`` the mean of ``(allocated + request) /
     capacity`` over the same dimensions: the emptiest node wins.

   Scores are rounded to :data:`SCORE_DECIMALS` decimals, so scores that differ only by float
   noise are equal and the next ranker decides.
3. **Own spread** (:func:`spread_counts`): the node with fewest replicas of the same service.
4. **Seeded tie-break** (:func:`tie_keys`): a 64-bit hash of ``(seed, node id, service)``, stable
   across processes; never input order, never ``hash()``, never the task id (a plan and its later
   apply give the same slot different task ids and must pick the same node). Each service thus
   has its own pseudo-random order of otherwise equal nodes, and its replicas take them in that
   order (each placement makes its node rank worse for the next). Not the slot: with one order
   per service, the replica fast path (:mod:`.replicas`) hands a whole group of tied nodes to
   consecutive replicas at once, where a per-slot hash made it pick one node at a time.

Why subtract ``own`` when bin-packing: with plain best fit, a service's own replicas make a node
look fuller, so identical replicas on identical nodes would pile onto one node. Fit measured
*without this service's replicas* is the same on nodes that differ only in how many of them they
hold, so own spread decides there (6 replicas on 3 identical nodes land 2/2/2), while load from
other services still drives packing. ``own`` assumes the replicas already on a node asked for what
this task asks for (true within one spec generation); it is clipped so a node never looks emptier
than empty. ``SPREAD`` needs no such correction: its own replicas make a node look fuller, which is
what spreading wants.

:func:`choose` narrows the candidates ranker by ranker (cheap: later keys are computed only for
the nodes still tied); :func:`order` sorts all candidates by the same rankers for ``explain``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .model import (
    CPU_DIM,
    MEMORY_DIM,
    BoolArray,
    FloatArray,
    HashArray,
    IntArray,
    NodeTable,
    Strategy,
    TaskRequest,
    mix64,
    stable_hash,
)

SCORE_DECIMALS = 9
"""Load scores are compared after rounding to this many decimals."""
BALANCE_WEIGHT = 3.0
"""How much :func:`imbalance` (free room out of the capacity's shape) costs in ``BINPACK``."""
BALANCE_FADE = 0.1
"""Below this much free room (the norm of the free shares) :func:`imbalance` fades out."""

Key = npt.NDArray[np.int64] | npt.NDArray[np.uint64] | npt.NDArray[np.float64]
_Matrix = TypeVar("_Matrix", IntArray, FloatArray)
Ranker = Callable[[IntArray], Key]
"""Keys (lower is better) for the candidate nodes ``rows`` of one task."""


def scored_columns(request: IntArray) -> list[int]:
    """Columns the load is measured on: cpu, memory and every scalar the task requests."""
    scalars = np.flatnonzero(request[MEMORY_DIM + 1 :] > 0) + MEMORY_DIM + 1
    return [CPU_DIM, MEMORY_DIM, *scalars.tolist()]


def fit_scores(table: NodeTable, rows: IntArray, request: IntArray, own_counts: IntArray) -> FloatArray:
    """Best-fit score of each node in ``rows`` (higher is tighter): the mean load after placing
    the task, less :data:`BALANCE_WEIGHT` x :func:`imbalance`; see the module docstring.

    ``own_counts`` holds the replicas of the task's service on each of ``rows``.
    """
    shares, present = _load_shares(table, rows, request, own_counts)
    scores: FloatArray = _mean(shares, present)
    requested = request[scored_columns(request)] > 0
    count = int(np.count_nonzero(requested))
    if count < 2:  # balance only between dimensions the task asks for
        return scores
    if count < requested.size:
        shares, present = shares[requested], present[requested]
    scores -= BALANCE_WEIGHT * imbalance(shares, present)
    return scores


def imbalance(shares: FloatArray, present: BoolArray) -> FloatArray:
    """How far each node's free room after the placement is from the shape of its capacity, in
    ``[0, 1 - 1/sqrt(d)]``; 0 when the room is the same share of every dimension or nearly none.

    With ``f`` the free share per dimension (``[dimension, node]``, dimensions with capacity only):
    ``(|f| - sum(f) / sqrt(d)) / max(|f|, BALANCE_FADE)``, which is ``1 - cos`` of the angle
    between ``f`` and the capacity's diagonal while ``|f| >= BALANCE_FADE``, and fades to 0 with
    ``|f|`` below it (a nearly full node's shape hardly matters, and its fullness must still win).
    """
    free = np.maximum(1.0 - shares, 0.0)
    if present.all():
        dims: IntArray | int = shares.shape[0]
    else:
        free[~present] = 0.0
        dims = np.maximum(present.sum(axis=0), 1)
    norm = np.sqrt(np.einsum("dn,dn->n", free, free))
    off: FloatArray = np.maximum(norm - free.sum(axis=0) / np.sqrt(dims), 0.0)
    off /= np.maximum(norm, BALANCE_FADE)
    return off


def emptiness_scores(table: NodeTable, rows: IntArray, request: IntArray) -> FloatArray:
    """``1 -`` mean load after placing the task, per node in ``rows`` (higher is emptier)."""
    shares, present = _load_shares(table, rows, request, None)
    scores: FloatArray = 1.0 - _mean(shares, present)
    return scores


def load_scores(table: NodeTable, rows: IntArray, request: IntArray, task: TaskRequest) -> FloatArray:
    """The score ``task.strategy`` ranks nodes by (higher is better)."""
    if task.strategy is Strategy.SPREAD:
        return emptiness_scores(table, rows, request)
    return fit_scores(table, rows, request, spread_counts(table, rows, task.service))


def _load_shares(
    table: NodeTable, rows: IntArray, request: IntArray, own_counts: IntArray | None
) -> tuple[FloatArray, BoolArray]:
    """``(allocated - own + request) / capacity`` per scored column and node in ``rows``
    (``[column, node]``), and where the capacity is not 0 (the share is 0 there)."""
    columns = scored_columns(request)
    used = _gather(table.allocated, columns, rows)
    wanted = request[columns][:, np.newaxis]
    if own_counts is not None and own_counts.any():  # only where the task asks for something
        used = np.where(wanted > 0, np.maximum(used - own_counts * wanted, 0), used)
    inverse = _gather(table.inverse_capacity, columns, rows)
    shares: FloatArray = (used + wanted) * inverse
    present: BoolArray = inverse > 0
    return shares, present


def _gather(matrix: _Matrix, columns: list[int], rows: IntArray) -> _Matrix:
    """``matrix[columns][:, rows]``, the fast way: ``np.take`` along the node axis of a slice
    (two-dimensional fancy indexing costs several times more, and this runs for every task)."""
    prefix = columns == list(range(len(columns)))
    picked = matrix[: len(columns)] if prefix else matrix[columns]
    gathered: _Matrix = np.take(picked, rows, axis=1)
    return gathered


def _mean(shares: FloatArray, present: BoolArray) -> FloatArray:
    """The mean share per node over the dimensions it has capacity in (0 with none)."""
    total: FloatArray = shares.sum(axis=0)
    if present.all():
        mean: FloatArray = total / shares.shape[0]
        return mean
    mean = total / np.maximum(present.sum(axis=0), 1)
    return mean


def domain_counts(table: NodeTable, rows: IntArray, service: str, key: str) -> IntArray:
    """Replicas of ``service`` in the label-``key`` domain of each node in ``rows`` (fewer is better)."""
    counts: IntArray = table.domain_counts(service, key)[table.domains(key)[rows]]
    return counts


def spread_counts(table: NodeTable, rows: IntArray, service: str) -> IntArray:
    """Replicas of ``service`` on each node in ``rows`` (fewer is better)."""
    counts: IntArray = table.service_counts(service)[rows]
    return counts


def service_hash(table: NodeTable, service: str) -> int:
    """The seeded hash of a service that :func:`tie_keys` mixes with each node's."""
    return stable_hash(table.seed, service)


def tie_keys(table: NodeTable, rows: IntArray, service: str) -> HashArray:
    """Seeded, process-stable pseudo-random key per node in ``rows`` for a service."""
    return mix64(table.node_hashes[rows] ^ np.uint64(service_hash(table, service)))


def rankers(table: NodeTable, request: IntArray, task: TaskRequest) -> list[Ranker]:
    """The task's rankers in precedence order; see the module docstring."""
    by_domain = [_domain_ranker(table, task.service, key) for key in task.spread]

    def load(rows: IntArray) -> Key:
        return -np.round(load_scores(table, rows, request, task), SCORE_DECIMALS)

    def own(rows: IntArray) -> Key:
        return spread_counts(table, rows, task.service)

    def tie(rows: IntArray) -> Key:
        return tie_keys(table, rows, task.service)

    return [*by_domain, load, own, tie]


def _domain_ranker(table: NodeTable, service: str, key: str) -> Ranker:
    def by_domain(rows: IntArray) -> Key:
        return domain_counts(table, rows, service, key)

    return by_domain


def choose(table: NodeTable, rows: IntArray, request: IntArray, task: TaskRequest) -> int:
    """The best node among the feasible ``rows`` (non-empty) for ``task``."""
    for ranker in rankers(table, request, task):
        if rows.size == 1:
            break
        keys = ranker(rows)
        rows = rows[keys == keys.min()]
    return int(rows[0])


def order(table: NodeTable, rows: IntArray, request: IntArray, task: TaskRequest) -> IntArray:
    """The feasible ``rows`` best first, by the same rankers as :func:`choose`."""
    if rows.size == 0:
        return rows
    keys: Sequence[Key] = [ranker(rows) for ranker in rankers(table, request, task)]
    ranked: IntArray = rows[np.lexsort(keys[::-1])]
    return ranked
