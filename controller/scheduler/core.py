"""schedule(): place a batch of tasks on nodes, over a working copy of a snapshot.

The batch is placed largest first (:func:`.batch.placement_order`; runs of identical replicas
stay whole and in slot order), then :func:`.improve.refill` repacks the hosts the batch alone put
in use one at a time (kept if it needs fewer), :class:`.batch.HostFreer` tries to empty more of
them, and a freed host may take the batch's pending tasks. The plan lists placements
and pending tasks in the input's task order. The flow for each task:

    filters.run_filters  -> checks (reason, passing mask) over every node
    filters.feasible     -> candidate nodes
    scoring.choose       -> label spread, load (strategy), own spread, seeded tie-break
    ports.allocate + NodeTable.commit -> the working copy sees the placement

or, with no candidate, a :class:`Pending` whose reason counts each node under its first failing
filter. A run of identical replicas (same service and shape, only ids and slots differ) gives the
same answers through :mod:`.replicas`, which runs the filters and ranks the nodes once per run.
Nothing here does I/O, reads a clock or draws unseeded randomness: the same input gives the same
plan. The controller's plan applier re-checks the plan against fresh state.

:func:`explain` runs the same filters and rankers for one task and reports on every node, for
``berth plan``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from . import batch, filters, replicas, scoring
from .improve import refill
from .model import (
    BoolArray,
    IntArray,
    NodeInfo,
    NodeTable,
    NodeVerdict,
    Pending,
    Placement,
    Plan,
    TaskRequest,
)
from .ports import PortBook

DEFAULT_DYNAMIC_PORTS = (30000, 32767)
"""The host port range dynamic ports are taken from, like Kubernetes' NodePort range."""


def schedule(
    nodes: Sequence[NodeInfo],
    tasks: Sequence[TaskRequest],
    *,
    dynamic_ports: tuple[int, int] = DEFAULT_DYNAMIC_PORTS,
    seed: int = 0,
    improve: bool = True,
    _fast: bool = True,
) -> Plan:
    """Place the batch ``tasks`` on ``nodes``; return the placements and the pending tasks, each
    in the order of ``tasks``.

    With ``improve`` (the default) the batch is placed largest first and the refill step of
    :mod:`.improve` and the free-hosts pass of :mod:`.batch` run after; ``improve=False`` places
    the tasks strictly in the given order, one greedy pass. Runs of identical replicas (consecutive tasks
    equal but for id and slot) take the fast path of :mod:`.replicas`, which gives the same plan as
    placing them one by one; ``_fast=False`` (for tests) places every task one by one.
    """
    run = _Run(nodes, tasks, dynamic_ports=dynamic_ports, seed=seed)
    occupied = run.occupied()
    runs: list[tuple[int, int]] = []
    start = 0
    while start < len(tasks):
        end = replicas.run_end(tasks, start)
        runs.append((start, end))
        start = end
    ordered = batch.placement_order(run.table, tasks, runs) if improve else runs
    outcomes: dict[int, Placement | Pending] = {}
    rows: dict[int, int] = {}
    for start, end in ordered:
        if _fast and end - start >= replicas.MIN_RUN and replicas.eligible(tasks[start]):
            done = run.place_replicas(tasks[start:end])
        else:
            done = [run.place(task) for task in tasks[start:end]]
        committed = iter(run.take_committed())
        for index, outcome in enumerate(done, start=start):
            outcomes[index] = outcome
            if isinstance(outcome, Placement):
                rows[index] = next(committed)
    if improve and rows:
        _free_hosts(run, tasks, ordered, occupied, outcomes, rows)
    placements = tuple(o for i in range(len(tasks)) if isinstance(o := outcomes[i], Placement))
    pending = tuple(o for i in range(len(tasks)) if isinstance(o := outcomes[i], Pending))
    return Plan(placements=placements, pending=pending)


def _free_hosts(
    run: _Run,
    tasks: Sequence[TaskRequest],
    ordered: Sequence[tuple[int, int]],
    occupied: BoolArray,
    outcomes: dict[int, Placement | Pending],
    rows: dict[int, int],
) -> None:
    """Refill (:mod:`.improve`, first round only) and the free-hosts pass of :mod:`.batch` over
    the greedy plan, then the batch's pending tasks again (in placement order) when they freed a
    host; ``outcomes`` and ``rows`` are updated."""
    fresh = ~occupied
    for round_ in range(batch.ROUNDS):
        placed = np.fromiter(rows.values(), dtype=np.int64, count=len(rows))
        now_occupied = occupied.copy()
        now_occupied[placed] = True
        if not (now_occupied & fresh).any():
            return  # no host in use that the call could free (the common case of a busy cluster)
        pinned = np.zeros(run.table.size, dtype=np.bool_)
        positions: list[int] = []
        requests: list[IntArray] = []
        counts: list[int] = []
        for start, end in ordered:  # a run shares its shape: decide and convert once per run
            done = [i for i in range(start, end) if i in rows]
            if not done:
                continue
            if batch.movable(tasks[start]):
                positions += done
                requests.append(run.request(tasks[start]))
                counts.append(len(done))
            else:
                pinned[[rows[i] for i in done]] = True
        if not positions:
            return
        moved = np.array(positions, dtype=np.int64)
        where = np.array([rows[i] for i in positions], dtype=np.int64)
        matrix = np.repeat(np.array(requests, dtype=np.int64).T, counts, axis=1)
        refilled = None if round_ else refill(run.table, tasks, moved, where, matrix, fresh & ~pinned)
        if refilled is not None:  # the hosts refill emptied are no longer in use
            now_occupied = occupied | pinned
            now_occupied[refilled] = True
        budget = batch.STEPS_PER_TASK * len(tasks)
        start_rows = where.copy() if refilled is None else refilled
        freer = batch.HostFreer(run.table, now_occupied, tasks, moved, start_rows, matrix, budget)
        if freer.run(fresh, pinned) == 0 and refilled is None:
            return
        for k in np.flatnonzero(freer.rows != where).tolist():
            i, row = positions[k], int(freer.rows[k])
            rows[i] = row
            outcomes[i] = Placement(task_id=tasks[i].task_id, node_id=run.table.ids[row])
        retried = [i for start, end in ordered for i in range(start, end) if isinstance(outcomes[i], Pending)]
        if not retried:
            return
        for i in retried:
            outcome = run.place(tasks[i])
            outcomes[i] = outcome
            if isinstance(outcome, Placement):
                rows[i] = run.take_committed()[0]


def explain(
    nodes: Sequence[NodeInfo],
    task: TaskRequest,
    *,
    dynamic_ports: tuple[int, int] = DEFAULT_DYNAMIC_PORTS,
    seed: int = 0,
) -> tuple[NodeVerdict, ...]:
    """What :func:`schedule` would make of ``task`` alone on ``nodes``: a verdict per node, in
    input order, with the first failing filter's reason, the load score and the rank."""
    run = _Run(nodes, [task], dynamic_ports=dynamic_ports, seed=seed)
    request = run.request(task)
    checks = filters.run_filters(run.table, run.ports, task, request)
    reasons = filters.first_failures(run.table.size, checks)
    rows = np.flatnonzero(filters.feasible(run.table.size, checks))
    ranked = scoring.order(run.table, rows, request, task)
    scores = dict(
        zip(rows.tolist(), scoring.load_scores(run.table, rows, request, task).tolist(), strict=True)
    )
    ranks = {row: rank for rank, row in enumerate(ranked.tolist(), start=1)}
    return tuple(
        NodeVerdict(
            node_id=node_id,
            feasible=not reasons[row],
            reason=reasons[row],
            score=scores.get(row, 0.0),
            rank=ranks.get(row, 0),
        )
        for row, node_id in enumerate(run.table.ids)
    )


class _Run:
    """The working state of one schedule() call."""

    def __init__(
        self,
        nodes: Sequence[NodeInfo],
        tasks: Sequence[TaskRequest],
        *,
        dynamic_ports: tuple[int, int],
        seed: int,
    ) -> None:
        self.table = NodeTable.build(nodes, tasks, seed=seed)
        self.ports = PortBook(nodes, dynamic_ports)
        self._unplaceable: dict[Hashable, tuple[int, Pending]] = {}
        self._committed: list[int] = []

    def occupied(self) -> BoolArray:
        """Nodes holding anything before the call: an allocation, a replica or a host port."""
        table = self.table
        mask: BoolArray = (table.allocated != 0).any(axis=0) | self.ports.any_used() | table.any_service()
        return mask

    def take_committed(self) -> list[int]:
        """The rows committed to since the last call, in order (one per placement)."""
        rows, self._committed = self._committed, []
        return rows

    def place(self, task: TaskRequest) -> Placement | Pending:
        """Place one task on the best feasible node, or say why none can take it."""
        known = self._known_unplaceable(task)
        if known is not None:
            return known
        request = self.request(task)
        checks = filters.run_filters(self.table, self.ports, task, request)
        rows = np.flatnonzero(filters.feasible(self.table.size, checks))
        if rows.size == 0:
            return self._pending(task, checks)
        row = scoring.choose(self.table, rows, request, task)
        mapped = self.ports.allocate(row, task.ports)
        self.table.commit(row, request, task.service)
        self._committed.append(row)
        return Placement(task_id=task.task_id, node_id=self.table.ids[row], ports=mapped)

    def place_replicas(self, tasks: Sequence[TaskRequest]) -> list[Placement | Pending]:
        """Place a run of identical replicas (:func:`.replicas.run_end`): the same outcomes as
        :meth:`place` for each in turn, by ranking the nodes once (see :mod:`.replicas`)."""
        first = tasks[0]
        if self._known_unplaceable(first) is not None:
            return [self.place(task) for task in tasks]
        request = self.request(first)
        checks = filters.run_filters(self.table, self.ports, first, request)
        rows = np.flatnonzero(filters.feasible(self.table.size, checks))
        if rows.size == 0:
            return [self.place(task) for task in tasks]
        index = replicas.ReplicaIndex.start(self.table, self.ports, first, request, rows)
        if index is None:
            return [self.place(task) for task in tasks]
        ids = self.table.ids
        outcomes: list[Placement | Pending] = []
        done = 0
        while done < len(tasks):
            # an untrusted index undoes part of a stretch in the table, and the port book cannot
            # give a port back: with host ports, one node at a time (its first node always stands)
            chosen = index.take(1 if first.ports else len(tasks) - done)
            if chosen.size == 0:  # no node left: the per-task path says why (and remembers it)
                break
            mapped = [self.ports.allocate(row, first.ports) for row in chosen.tolist()] if first.ports else []
            self.table.commit_rows(chosen, request, first.service)
            stand = index.update(chosen)
            if stand is not None:  # the index cannot be trusted after ``stand`` nodes
                self.table.uncommit_rows(chosen[stand:], request, first.service)
                chosen = chosen[:stand]
            placed = chosen.tolist()
            self._committed.extend(placed)
            outcomes.extend(
                Placement(task_id=task.task_id, node_id=ids[row], ports=mapped[i] if mapped else ())
                for i, (task, row) in enumerate(zip(tasks[done : done + len(placed)], placed, strict=True))
            )
            done += len(placed)
            if stand is not None:
                break
        outcomes.extend(self.place(task) for task in tasks[done:])
        return outcomes

    def request(self, task: TaskRequest) -> IntArray:
        """The task's request as a row of the table; a negative request frees nothing."""
        request: IntArray = np.maximum(self.table.vector(task.resources), 0)
        return request

    def _pending(self, task: TaskRequest, checks: Sequence[filters.Check]) -> Pending:
        counts = filters.rejections(self.table.size, checks)
        reason = filters.explain(self.table.size, counts)
        pending = Pending(task_id=task.task_id, reason=reason, rejections=counts)
        self._unplaceable[_shape(task)] = (self.table.version, pending)
        return pending

    def _known_unplaceable(self, task: TaskRequest) -> Pending | None:
        """The answer for an identical-shaped task that was pending, if nothing was placed since.

        Placements only ever fill nodes, so the answer and its reason would be the same.
        """
        known = self._unplaceable.get(_shape(task))
        if known is None or known[0] != self.table.version:
            return None
        pending = known[1]
        return Pending(task_id=task.task_id, reason=pending.reason, rejections=pending.rejections)


def _shape(task: TaskRequest) -> Hashable:
    """What feasibility depends on: resources, ports, constraints, and the service when it has a
    per-node limit (not id or slot)."""
    resources = task.resources
    scalars = tuple(sorted(resources.scalars.items()))
    limit = (task.service, task.max_per_node) if task.max_per_node > 0 else None
    return (resources.cpu_millis, resources.memory_bytes, scalars, task.ports, task.constraints, limit)
