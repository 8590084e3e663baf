"""The fast path for runs of identical replicas: rank once, then place them group by group.

Most batches are many replicas of one service in consecutive slots: tasks that differ only in
``task_id`` and ``slot``. For such a run, :func:`berth.controller.scheduler.schedule` could run the
filters and rankers over every node for every replica; this module gives the same answer (the
same node for every replica, the same host ports, the same pending reasons) in far less time.

Why it is exact. For one task the per-task path picks, among the feasible nodes, the
lexicographic minimum of ``(load key, own replicas, tie hash, row)`` (:func:`.scoring.choose`
narrows ranker by ranker and returns the first row left). Within a run of one shape, placing a
replica on node ``r`` changes only row ``r``:

* feasibility: ready, availability and constraints never change; per-node limit, fixed host ports
  and free cpu / memory / scalars change only on ``r``, and only from feasible to infeasible
  (placements only add), so a node infeasible at the start of the run stays so;
* the load key: ``BINPACK`` scores ``allocated - own x request``, which placing one more own
  replica (``+request``, ``+1``) leaves as it was; ``SPREAD`` gets worse (or stays) on ``r``
  only. Scores are per node: the one thing that couples nodes, ``BINPACK`` subtracting ``own`` only
  when some candidate holds a replica, changes nothing when no candidate has a negative
  allocation in a requested dimension (checked, else no fast path);
* own replicas: ``+1`` on ``r``;
* the tie hash is the service's (:func:`.scoring.tie_keys`): the same for every replica of the run.

So ``r``'s ``(load key, own)`` gets strictly worse and every other node's stays. Call the nodes
that share the best ``(load key, own)`` the *group*. Each replica goes to the group's node of
least ``(tie hash, row)``, which then leaves the group, and no node ever joins it; so the next
``min(group size, replicas left)`` replicas take the group's nodes in ``(tie hash, row)`` order,
one each. :meth:`ReplicaIndex.take` hands out such a stretch at once, the caller commits it as one
array operation, and :meth:`ReplicaIndex.update` files the nodes again under their new keys (or
drops those no longer feasible). When the group is used up the next best key's group (the sorted
candidates of that key and the nodes re-filed under it) takes over; when none is left the
per-task path answers the rest of the run, with the same pending reason for each (and remembers
it, as it always does).

Not handled (the caller uses the per-task path): label spread (placing changes the counts of a
whole domain), dynamic host ports, and negative allocations as above. If a node's new key were
ever not worse than the group's (it cannot be, see above), :meth:`ReplicaIndex.update` says so
and the caller undoes the placements made after it and goes back to the per-task path for the
rest of the run instead of trusting the index.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import numpy as np

from . import scoring
from .model import IntArray, NodeTable, Strategy, TaskRequest
from .ports import PortBook, dynamic_demand, fixed_keys

MIN_RUN = 4
"""Shorter runs are placed task by task: sorting the candidates costs a few tasks' worth."""

GroupKey = tuple[float, int]
"""``(load key, own replicas)`` of a node; lower is better."""


def replica_shape(task: TaskRequest) -> tuple[object, ...]:
    """Everything but ``task_id`` and ``slot``: tasks of equal shape are identical replicas."""
    return (
        task.service,
        task.resources,
        task.ports,
        task.constraints,
        task.max_per_node,
        task.spread,
        task.strategy,
    )


def run_end(tasks: Sequence[TaskRequest], start: int) -> int:
    """The end (exclusive) of the run of tasks shaped like ``tasks[start]``."""
    shape = replica_shape(tasks[start])
    end = start + 1
    while end < len(tasks) and replica_shape(tasks[end]) == shape:
        end += 1
    return end


def eligible(task: TaskRequest) -> bool:
    """Whether the fast path handles this shape at all (before looking at the nodes)."""
    return not task.spread and not dynamic_demand(task.ports)


class ReplicaIndex:
    """The feasible nodes of one run, grouped by ``(load key, own replicas)``, best group first,
    each group in ``(tie hash, row)`` order.

    :meth:`take` says where the next replicas go; :meth:`update` files those nodes again once the
    replicas are committed there.
    """

    def __init__(
        self, table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray, rows: IntArray
    ) -> None:
        self._table = table
        self._ports = ports
        self._task = task
        self._request = request
        self._requested = [(c, int(request[c])) for c in np.flatnonzero(request > 0).tolist()]
        self._fixed = fixed_keys(task.ports)
        self._counts = table.service_counts(task.service)
        load = -np.round(scoring.load_scores(table, rows, request, task), scoring.SCORE_DECIMALS)
        own = self._counts[rows]
        order = np.lexsort((rows, own, load))
        self._rows: IntArray = rows[order]
        self._load = load[order]
        self._own = own[order]
        changes = (self._load[1:] != self._load[:-1]) | (self._own[1:] != self._own[:-1])
        self._bounds: list[int] = [0, *(np.flatnonzero(changes) + 1).tolist(), int(rows.size)]
        self._next = 0
        """Index into ``_bounds`` of the next untouched group of the sorted candidates."""
        self._moved: dict[GroupKey, list[IntArray]] = {}
        """Nodes placed on in this run (and still feasible), by their new key."""
        self._heap: list[GroupKey] = []
        self._key: GroupKey = (0.0, 0)
        self._group: IntArray = rows[:0]
        """The best group: feasible nodes of key ``_key``, in ``(tie hash, row)`` order."""
        self._used = 0
        """Nodes of ``_group`` already handed out."""

    @classmethod
    def start(
        cls, table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray, rows: IntArray
    ) -> ReplicaIndex | None:
        """The index over the feasible ``rows`` (non-empty), or None when the fast path would not
        be exact for the run."""
        if task.strategy is not Strategy.SPREAD:
            requested = np.flatnonzero(request > 0)
            if (table.allocated[requested][:, rows] < 0).any():
                return None
        return cls(table, ports, task, request, rows)

    def take(self, limit: int) -> IntArray:
        """The nodes the next replicas go to, one each, in order: at most ``limit``, all from the
        best group (empty when no node is feasible). Commit them, then call :meth:`update`."""
        if self._used == self._group.size and not self._activate():
            return self._group[:0]
        taken = self._group[self._used : self._used + limit]
        self._used += int(taken.size)
        return taken

    def update(self, rows: IntArray) -> int | None:
        """File ``rows`` (the last :meth:`take`, now committed) under their new keys. None when
        all went as the index assumes; else how many of ``rows`` stand (at least 1: a replica's
        node was chosen before its own placement changed anything), after which the index can no
        longer be trusted and the caller must undo the rest and go on task by task."""
        counts = self._counts[rows]
        feasible = np.ones(rows.size, dtype=np.bool_)
        limit = self._task.max_per_node
        if limit > 0:
            feasible &= counts < limit
        for port in self._fixed:  # (a task asking for a fixed port twice had no candidate to begin with)
            feasible &= ~self._ports.used_mask(port)[rows]
        capacity, allocated = self._table.capacity, self._table.allocated
        for column, amount in self._requested:
            feasible &= capacity[column, rows] - allocated[column, rows] >= amount
        if self._task.strategy is Strategy.SPREAD:
            scores = scoring.load_scores(self._table, rows, self._request, self._task)
            load = -np.round(scores, scoring.SCORE_DECIMALS)
        else:
            load = np.full(rows.size, self._key[0])
        current_load, current_own = self._key
        not_worse = feasible & ((load < current_load) | ((load == current_load) & (counts <= current_own)))
        if not_worse.any():
            return int(np.flatnonzero(not_worse)[0]) + 1
        rows, load, counts = rows[feasible], load[feasible], counts[feasible]
        if rows.size == 0:
            return None
        order = np.lexsort((counts, load))
        rows, load, counts = rows[order], load[order], counts[order]
        changes = (load[1:] != load[:-1]) | (counts[1:] != counts[:-1])
        bounds = [0, *(np.flatnonzero(changes) + 1).tolist(), int(rows.size)]
        for begin, end in itertools.pairwise(bounds):
            key = (float(load[begin]), int(counts[begin]))
            moved = self._moved.get(key)
            if moved is None:
                self._moved[key] = [rows[begin:end]]
                heapq.heappush(self._heap, key)
            else:
                moved.append(rows[begin:end])
        return None

    def _activate(self) -> bool:
        """Make the best remaining group the current one; False when no node is left."""
        candidates: list[GroupKey] = []
        if self._next + 1 < len(self._bounds):
            first = self._bounds[self._next]
            candidates.append((float(self._load[first]), int(self._own[first])))
        if self._heap:
            candidates.append(self._heap[0])
        if not candidates:
            return False
        key = min(candidates)
        parts: list[IntArray] = []
        if self._next + 1 < len(self._bounds) and candidates[0] == key:
            parts.append(self._rows[self._bounds[self._next] : self._bounds[self._next + 1]])
            self._next += 1
        if self._heap and self._heap[0] == key:
            heapq.heappop(self._heap)
            parts.extend(self._moved.pop(key))
        group = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ties = scoring.tie_keys(self._table, group, self._task.service)
        self._group = group[np.lexsort((group, ties))]
        self._used = 0
        self._key = key
        return True
