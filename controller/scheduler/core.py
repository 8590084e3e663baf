"""schedule(): place tasks on nodes, one at a time, over a working copy of a snapshot.

The flow for each task, in the given order:

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

from . import filters, replicas, scoring
from .model import IntArray, NodeInfo, NodeTable, NodeVerdict, Pending, Placement, Plan, TaskRequest
from .ports import PortBook

DEFAULT_DYNAMIC_PORTS = (30000, 32767)
"""The host port range dynamic ports are taken from, like Kubernetes' NodePort range."""


def schedule(
    nodes: Sequence[NodeInfo],
    tasks: Sequence[TaskRequest],
    *,
    dynamic_ports: tuple[int, int] = DEFAULT_DYNAMIC_PORTS,
    seed: int = 0,
    _fast: bool = True,
) -> Plan:
    """Place ``tasks`` (in order) on ``nodes``; return the placements and the pending tasks.

    Runs of identical replicas (consecutive tasks equal but for id and slot) take the fast path of
    :mod:`.replicas`, which gives the same plan as placing them one by one; ``_fast=False`` (for
    tests) places every task one by one.
    """
    run = _Run(nodes, tasks, dynamic_ports=dynamic_ports, seed=seed)
    placements: list[Placement] = []
    pending: list[Pending] = []
    start = 0
    while start < len(tasks):
        end = replicas.run_end(tasks, start) if _fast else start + 1
        if end - start >= replicas.MIN_RUN and replicas.eligible(tasks[start]):
            outcomes = run.place_replicas(tasks[start:end])
        else:
            outcomes = [run.place(task) for task in tasks[start:end]]
        for outcome in outcomes:
            if isinstance(outcome, Placement):
                placements.append(outcome)
            else:
                pending.append(outcome)
        start = end
    return Plan(placements=tuple(placements), pending=tuple(pending))


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
        slots = [task.slot for task in tasks]
        index = replicas.ReplicaIndex.start(self.table, self.ports, first, request, rows, slots)
        if index is None:
            return [self.place(task) for task in tasks]
        outcomes: list[Placement | Pending] = []
        for done, task in enumerate(tasks):
            row = index.take()
            if row < 0:  # no node left: the per-task path says why (and remembers it)
                outcomes.extend(self.place(task) for task in tasks[done:])
                break
            mapped = self.ports.allocate(row, task.ports) if task.ports else ()
            self.table.commit(row, request, task.service)
            outcomes.append(Placement(task_id=task.task_id, node_id=self.table.ids[row], ports=mapped))
            if not index.update(row):
                outcomes.extend(self.place(task) for task in tasks[done + 1 :])
                break
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
