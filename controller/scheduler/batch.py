"""Batch steps of schedule(): the order a batch is placed in, and a pass that frees hosts after.

A call to :func:`berth.controller.scheduler.schedule` places a *batch* (a whole service, a spec
with several, or everything pending after a node was lost). Two steps use that:

**Order** (:func:`placement_order`). The batch is placed largest first, as batch schedulers and
first-fit-decreasing do: a task's size is ``sum over dimensions of request / cluster capacity``
(the capacity of the ready, active nodes; the "FFD-sum" size of Panigrahy et al., 2011, made
comparable across dimensions by the cluster's own totals). The sort is stable and runs of
identical replicas (:func:`.replicas.run_end`) are kept whole, so a service's replicas are still
placed in slot order, the replica fast path still applies, and tasks of equal size keep their
order. Placing large tasks first leaves the small ones to fill the gaps, instead of small tasks
fragmenting every node before a large one arrives.

**Free hosts** (:class:`HostFreer`). After the greedy pass (and the refill step of
:mod:`.improve`, which repacks the same hosts one at a time), try to empty each host that was
empty before the call and now holds only tasks of this batch, least loaded first: take its tasks
out into a pool and put each pool task (largest first) back on another host in use, either
directly (the fitting host left with least slack), or by swapping it for one or two smaller tasks
of the batch on a host where it then fits (those go to the pool). The pool only ever gets lighter,
so this ends; when a pool task fits nowhere, or a step budget runs out, every move of the attempt
is undone. A freed host may then take tasks of the batch left pending.

What it never does: move a task that was running before the call (only the batch being planned);
over-commit (every move is checked in every requested dimension, as the filters do); put a task
on a node that is down, draining or paused, or that breaks one of its constraints; put two
replicas of one service on one node (a move only goes to a node holding none of the task's
service, so Berth's per-service spread is never undone and ``max_per_node`` always holds). Tasks
with host ports, label spread or the ``spread`` strategy are not moved at all (a node holding one
is never emptied). Work is bounded by step counts (no clock is read): at most
:data:`ATTEMPT_STEPS` steps per attempt and :data:`STEPS_PER_TASK` x tasks of the batch in all,
and a sweep over the hosts stops after :data:`MAX_FAILURES` attempts in a row that emptied
nothing; every step is array arithmetic over the nodes or the batch's movable tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from .model import BoolArray, FloatArray, IntArray, NodeTable, Strategy, TaskRequest

ATTEMPT_STEPS = 24
"""Moves (direct or swap) one attempt to empty a host may make before it gives up."""
STEPS_PER_TASK = 4
"""The free-hosts pass makes at most this many moves per task of the batch, in all."""
MAX_PAIR_HOST_TASKS = 16
"""Two-for-one swaps are looked for only on hosts holding at most this many movable tasks."""
ROUNDS = 2
"""Free-hosts passes, each followed by placing the batch's pending tasks again if a host was freed."""
MAX_FAILURES = 96
"""A sweep over the hosts (least loaded first) stops after this many attempts in a row that
emptied nothing: the hosts after them are fuller still, and each failed attempt costs up to
:data:`ATTEMPT_STEPS` moves of array arithmetic for nothing."""


def schedulable(table: NodeTable) -> BoolArray:
    """Nodes new tasks may go to at all: ready and active."""
    mask: BoolArray = table.ready & table.not_draining & table.not_paused
    return mask


def size_weights(table: NodeTable) -> FloatArray:
    """Per dimension, ``1 / total capacity of the schedulable nodes`` (0 where there is none)."""
    total = table.capacity[:, schedulable(table)].sum(axis=1).astype(np.float64)
    weights: FloatArray = np.divide(1.0, total, out=np.zeros(total.shape), where=total > 0)
    return weights


def placement_order(
    table: NodeTable, tasks: Sequence[TaskRequest], runs: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The runs ``[start, end)`` of ``tasks`` in placement order: largest size first, stable."""
    weights = size_weights(table)
    keys = [float(np.maximum(table.vector(tasks[start].resources), 0) @ weights) for start, _ in runs]
    ranked = sorted(range(len(runs)), key=lambda i: -keys[i])
    return [runs[i] for i in ranked]


def movable(task: TaskRequest) -> bool:
    """Whether the free-hosts pass may move this task (see the module docstring)."""
    return not task.ports and not task.spread and task.strategy is Strategy.BINPACK


class HostFreer:
    """The free-hosts pass over one schedule() call's table (see the module docstring).

    ``positions[i]`` is the batch position of movable task ``i``, ``rows[i]`` its node (updated
    in place as it moves) and ``requests[:, i]`` its request.
    """

    def __init__(
        self,
        table: NodeTable,
        occupied: BoolArray,
        tasks: Sequence[TaskRequest],
        positions: IntArray,
        rows: IntArray,
        requests: IntArray,
        budget: int,
    ) -> None:
        self.table = table
        self.budget = budget
        self._tasks = tasks
        self._positions = positions
        self.rows = rows
        self._requests = requests
        self._sizes: FloatArray = size_weights(table) @ requests.astype(np.float64)
        self._schedulable = schedulable(table)
        self._occupied = occupied.copy()
        """Nodes in use: running tasks before the call, or tasks of this batch now."""
        by_row = np.argsort(rows, kind="stable")
        cuts = np.flatnonzero(np.diff(rows[by_row])) + 1
        self._on_node: dict[int, list[int]] = {
            int(rows[group[0]]): group.tolist() for group in np.split(by_row, cuts) if group.size
        }
        self._movable_load: IntArray = np.zeros((len(table.dims), table.size), dtype=np.int64)
        """Per node, the summed request of the movable tasks on it."""
        for column in range(len(table.dims)):
            self._movable_load[column] = np.bincount(rows, weights=requests[column], minlength=table.size)
        self._journal: list[tuple[int, int, int]] = []
        self._room: IntArray | None = None
        """Free room summed over the schedulable nodes in use (see :meth:`_could_fit_elsewhere`)."""

    def _task(self, i: int) -> TaskRequest:
        return self._tasks[int(self._positions[i])]

    # --- the pass -----------------------------------------------------------------------------

    def run(self, fresh: BoolArray, pinned: BoolArray) -> int:
        """Try to empty every node of ``fresh`` (empty before the call) that holds only movable
        tasks of the batch (``pinned``: nodes holding any other task of the batch); return how
        many were emptied."""
        freed = 0
        progress = True
        fresh = fresh & ~pinned
        while progress and self.budget > 0:
            progress = False
            failures = 0
            for row in self._candidates(fresh, pinned):
                if self.budget <= 0 or failures >= MAX_FAILURES:
                    break
                if self._try_empty(row):
                    freed += 1
                    failures = 0
                    progress = True
                else:
                    failures += 1
        return freed

    def _candidates(self, fresh: BoolArray, pinned: BoolArray) -> list[int]:
        rows = [r for r, on in self._on_node.items() if on and fresh[r]]
        load = {r: self._load(r) for r in rows}
        return sorted(rows, key=lambda r: (load[r], r))

    def _load(self, row: int) -> float:
        table = self.table
        used = table.allocated[:, row] * table.inverse_capacity[:, row]
        return float(used.sum())

    def _try_empty(self, host: int) -> bool:
        self._journal = []
        pool = list(self._on_node.get(host, []))
        if not pool or not self._could_fit_elsewhere(host, pool):
            return False
        first = max(pool, key=lambda i: (self._sizes[i], -i))
        if not self._targets(first, host).any():
            return False  # the first pool task could go nowhere: no need to lift anything
        for i in pool:
            self._lift(i)
        steps = 0
        while pool:
            if steps >= ATTEMPT_STEPS or self.budget <= 0:
                self._undo()
                return False
            steps += 1
            self.budget -= 1
            u = max(pool, key=lambda i: (self._sizes[i], -i))
            pool.remove(u)
            targets = self._targets(u, host)
            row = self._direct(u, targets)
            if row >= 0:
                self._drop(u, row)
                continue
            swapped = self._swap_one(u, targets)
            if swapped is None:
                swapped = self._swap_two(u, targets)
            if swapped is None:
                pool.append(u)
                self._undo()
                return False
            row, out = swapped
            for v in out:
                self._lift(v)
                pool.append(v)
            self._drop(u, row)
        self._occupied[host] = False
        self._room = None
        return True

    def _could_fit_elsewhere(self, host: int, pool: list[int]) -> bool:
        """The pool's total is no more than the free room of the other nodes in use (per dimension)."""
        table = self.table
        if self._room is None:  # moves between nodes in use leave it as it is; emptying one does not
            use = self._occupied & self._schedulable
            self._room = np.maximum(table.capacity[:, use] - table.allocated[:, use], 0).sum(axis=1)
        own = np.maximum(table.capacity[:, host] - table.allocated[:, host], 0)
        need = self._requests[:, pool].sum(axis=1)
        return bool((need <= self._room - own).all())

    # --- where a pool task may go -------------------------------------------------------------

    def _targets(self, u: int, host: int) -> BoolArray:
        """Nodes in use (not ``host``) that ``u`` may go to, resources aside."""
        task = self._task(u)
        allowed = self._schedulable & self.table.constraints_mask(task.constraints)
        mask: BoolArray = allowed & self._occupied & (self.table.service_counts(task.service) == 0)
        mask[host] = False
        return mask

    def _direct(self, u: int, targets: BoolArray) -> int:
        """The node of ``targets`` where ``u`` fits with least slack left, or -1."""
        rows = np.flatnonzero(targets)
        if rows.size == 0:
            return -1
        request = self._requests[:, u]
        dims = np.flatnonzero(request > 0)
        table = self.table
        free = table.capacity[:, rows] - table.allocated[:, rows]
        fits = (free[dims] >= request[dims, None]).all(axis=0)
        rows, free = rows[fits], free[:, fits]
        if rows.size == 0:
            return -1
        slack = ((free - request[:, None]) * table.inverse_capacity[:, rows]).sum(axis=0)
        return int(rows[np.argmin(slack)])

    def _swap_one(self, u: int, targets: BoolArray) -> tuple[int, list[int]] | None:
        """``(node, [v])``: a smaller task ``v`` on a node of ``targets`` that ``u`` may replace."""
        placed = self.rows >= 0
        candidates = np.flatnonzero(placed & (self._sizes < self._sizes[u]))
        if candidates.size == 0:
            return None
        rows = self.rows[candidates]
        keep = targets[rows]
        candidates, rows = candidates[keep], rows[keep]
        if candidates.size == 0:
            return None
        request = self._requests[:, u]
        dims = np.flatnonzero(request > 0)
        table = self.table
        after = table.capacity[:, rows] - table.allocated[:, rows] + self._requests[:, candidates]
        after -= request[:, None]
        fits = (after[dims] >= 0).all(axis=0)
        if not fits.any():
            return None
        candidates, rows, after = candidates[fits], rows[fits], after[:, fits]
        slack = (after * table.inverse_capacity[:, rows]).sum(axis=0)
        best = int(np.argmin(slack))
        return int(rows[best]), [int(candidates[best])]

    def _swap_two(self, u: int, targets: BoolArray) -> tuple[int, list[int]] | None:
        """``(node, [v, w])``: two tasks on one node of ``targets``, together smaller than ``u``,
        that ``u`` may replace."""
        request = self._requests[:, u]
        dims = np.flatnonzero(request > 0)
        table = self.table
        size = self._sizes[u]
        rows = np.flatnonzero(targets)
        room = table.capacity[:, rows] - table.allocated[:, rows] + self._movable_load[:, rows]
        rows = rows[(room[dims] >= request[dims, None]).all(axis=0)]
        best: tuple[float, int, int, int] | None = None
        for row in rows.tolist():
            on = self._on_node.get(row, [])
            if len(on) < 2 or len(on) > MAX_PAIR_HOST_TASKS:
                continue
            free = table.capacity[:, row] - table.allocated[:, row]
            for v, w in combinations(on, 2):
                if self._sizes[v] + self._sizes[w] >= size:
                    continue
                after = free + self._requests[:, v] + self._requests[:, w] - request
                if (after[dims] < 0).any():
                    continue
                slack = float((after * table.inverse_capacity[:, row]).sum())
                key = (slack, row, v, w)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        return best[1], [best[2], best[3]]

    # --- moves --------------------------------------------------------------------------------

    def _lift(self, i: int) -> None:
        """Take task ``i`` off its node into the pool."""
        row = int(self.rows[i])
        self.table.uncommit(row, self._requests[:, i], self._task(i).service)
        self._on_node[row].remove(i)
        self._movable_load[:, row] -= self._requests[:, i]
        self.rows[i] = -1
        self._journal.append((i, row, -1))

    def _drop(self, i: int, row: int) -> None:
        """Put pool task ``i`` on node ``row``."""
        self.table.commit(row, self._requests[:, i], self._task(i).service)
        self._on_node.setdefault(row, []).append(i)
        self._movable_load[:, row] += self._requests[:, i]
        self.rows[i] = row
        self._journal.append((i, -1, row))

    def _undo(self) -> None:
        for i, old, new in reversed(self._journal):
            request, service = self._requests[:, i], self._task(i).service
            if new >= 0:
                self.table.uncommit(new, request, service)
                self._on_node[new].remove(i)
                self._movable_load[:, new] -= request
            if old >= 0:
                self.table.commit(old, request, service)
                self._on_node.setdefault(old, []).append(i)
                self._movable_load[:, old] += request
            self.rows[i] = old
        self._journal = []
