"""Feasibility: which nodes can take a task, and why the others cannot.

Each filter is a small named function ``(table, ports, task, request) -> list[Check]``; a
:data:`Check` is a reason code with the mask of nodes that *pass* it. :data:`FILTERS` runs them
in a fixed order (ready, availability, constraints, max per node, ports, cpu, memory, scalars),
and a node that
fails several is counted only under the first, as Kubernetes does, so a pending task reads
``0/5 nodes available: 3 insufficient memory, 2 constraint env==prod not met``.

Reason codes are the constants below, plus three families built by functions:
:func:`constraint_reason` (``constraint env==prod not met``, ``constraint zone in (a,b) not met``),
:func:`max_per_node_reason` (``at max 1 replica(s) of web per node``) and :func:`scalar_reason`
(``insufficient gpu``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from .model import CPU_DIM, MEMORY_DIM, BoolArray, Constraint, IntArray, NodeTable, TaskRequest
from .ports import PortBook, dynamic_demand, fixed_keys

REASON_NODE_DOWN = "node down"
REASON_NODE_DRAINING = "node draining"
REASON_NODE_PAUSED = "node paused"
REASON_PORT_CONFLICT = "host port conflict"
REASON_NO_FREE_PORT = "no free dynamic port"
REASON_INSUFFICIENT_CPU = "insufficient cpu"
REASON_INSUFFICIENT_MEMORY = "insufficient memory"
REASON_NO_NODES = "no nodes registered"

Check = tuple[str, BoolArray]
"""A reason code and the nodes that pass the check it names."""
Filter = Callable[[NodeTable, PortBook, TaskRequest, IntArray], list[Check]]
"""A feasibility filter: the checks it makes for one task over every node."""


def constraint_reason(constraint: Constraint) -> str:
    """Reason code for a node that does not meet ``constraint``."""
    return f"constraint {constraint} not met"


def max_per_node_reason(service: str, limit: int) -> str:
    """Reason code for a node that already holds ``limit`` replicas of ``service``."""
    return f"at max {limit} replica(s) of {service} per node"


def scalar_reason(name: str) -> str:
    """Reason code for a node without enough of scalar resource ``name``."""
    return f"insufficient {name}"


def node_ready(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node's agent is connected."""
    return [(REASON_NODE_DOWN, table.ready)]


def node_active(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node is neither draining nor paused."""
    return [(REASON_NODE_DRAINING, table.not_draining), (REASON_NODE_PAUSED, table.not_paused)]


def constraints_met(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node's labels meet every constraint of the task, checked in the task's order."""
    return [(constraint_reason(c), table.constraint_mask(c)) for c in task.constraints]


def below_max_per_node(
    table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray
) -> list[Check]:
    """The node holds fewer than ``max_per_node`` replicas of the service (placements of this
    call included); no check when the task sets no limit."""
    if task.max_per_node <= 0:
        return []
    below = table.service_counts(task.service) < task.max_per_node
    return [(max_per_node_reason(task.service, task.max_per_node), below)]


def host_ports_free(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """Every fixed host port is free on the node (and the task does not ask for one twice)."""
    if not fixed_keys(task.ports):
        return []
    return [(REASON_PORT_CONFLICT, ports.fixed_free_mask(task.ports))]


def dynamic_ports_free(
    table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray
) -> list[Check]:
    """The node's dynamic range still has a free port for every dynamic request."""
    if not dynamic_demand(task.ports):
        return []
    return [(REASON_NO_FREE_PORT, ports.dynamic_free_mask(task.ports))]


def cpu_fits(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node has the CPU the task asks for free."""
    return _dimension_checks(table, request, [(REASON_INSUFFICIENT_CPU, CPU_DIM)])


def memory_fits(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node has the memory the task asks for free."""
    return _dimension_checks(table, request, [(REASON_INSUFFICIENT_MEMORY, MEMORY_DIM)])


def scalars_fit(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """The node has every scalar the task asks for free (a scalar it lacks counts as 0)."""
    names = sorted(task.resources.scalars)
    return _dimension_checks(table, request, [(scalar_reason(name), table.dim(name)) for name in names])


def _dimension_checks(table: NodeTable, request: IntArray, dims: Sequence[tuple[str, int]]) -> list[Check]:
    checks: list[Check] = []
    for reason, column in dims:
        amount = request[column]
        if amount > 0:
            checks.append((reason, table.free(column) >= amount))
    return checks


FILTERS: tuple[Filter, ...] = (
    node_ready,
    node_active,
    constraints_met,
    below_max_per_node,
    host_ports_free,
    dynamic_ports_free,
    cpu_fits,
    memory_fits,
    scalars_fit,
)
"""Every filter, in the order that decides which reason a rejected node is counted under."""


def run_filters(table: NodeTable, ports: PortBook, task: TaskRequest, request: IntArray) -> list[Check]:
    """Every check of every filter for ``task``, in :data:`FILTERS` order."""
    return [check for f in FILTERS for check in f(table, ports, task, request)]


def first_failing(size: int, checks: Sequence[Check]) -> IntArray:
    """Per node, the index in ``checks`` of its first failing check, or -1 when it passes them all."""
    first = np.full(size, -1, dtype=np.int64)
    remaining = np.ones(size, dtype=np.bool_)
    for i, (_, passing) in enumerate(checks):
        first[remaining & ~passing] = i
        remaining &= passing
    return first


def first_failures(size: int, checks: Sequence[Check]) -> list[str]:
    """Per node, the reason code of its first failing check, or ``""`` when it passes them all."""
    return [checks[i][0] if i >= 0 else "" for i in first_failing(size, checks).tolist()]


def feasible(size: int, checks: Sequence[Check]) -> BoolArray:
    """Nodes that pass every check."""
    mask = np.ones(size, dtype=np.bool_)
    for _, passing in checks:
        mask &= passing
    return mask


def rejections(size: int, checks: Sequence[Check]) -> Mapping[str, int]:
    """Reason code -> number of nodes whose first failing check has that code."""
    counts: dict[str, int] = {}
    first = first_failing(size, checks)
    indexes, failed = np.unique(first[first >= 0], return_counts=True)
    for i, count in zip(indexes.tolist(), failed.tolist(), strict=True):
        reason = checks[i][0]
        counts[reason] = counts.get(reason, 0) + count
    return MappingProxyType(counts)


def explain(size: int, counts: Mapping[str, int]) -> str:
    """Human text for a pending task, most common reason first."""
    if size == 0:
        return f"0/0 nodes available: {REASON_NO_NODES}"
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return f"0/{size} nodes available: " + ", ".join(f"{count} {reason}" for reason, count in ordered)
