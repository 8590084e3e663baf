"""Feasibility filters: each filter's checks, first-failure counting and the pending text."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from berth.controller.scheduler import filters
from berth.controller.scheduler.model import (
    Availability,
    BoolArray,
    Constraint,
    NodeInfo,
    NodeTable,
    PortRequest,
    Resources,
    TaskRequest,
)
from berth.controller.scheduler.ports import PortBook

GIB = 1 << 30


def node(
    node_id: str,
    *,
    cpu: int = 4000,
    memory: int = 8 * GIB,
    scalars: Mapping[str, int] | None = None,
    used_cpu: int = 0,
    used_memory: int = 0,
    used_scalars: Mapping[str, int] | None = None,
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    availability: Availability = Availability.ACTIVE,
    ports: frozenset[tuple[str, int]] = frozenset(),
    services: Mapping[str, int] | None = None,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        name=node_id,
        capacity=Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {}),
        allocated=Resources(cpu_millis=used_cpu, memory_bytes=used_memory, scalars=used_scalars or {}),
        labels=labels or {},
        ready=ready,
        availability=availability,
        used_ports=ports,
        service_counts=services or {},
    )


def task(
    *,
    cpu: int = 0,
    memory: int = 0,
    scalars: Mapping[str, int] | None = None,
    ports: tuple[PortRequest, ...] = (),
    constraints: tuple[Constraint, ...] = (),
    max_per_node: int = 0,
) -> TaskRequest:
    return TaskRequest(
        task_id="web.1.x",
        service="web",
        slot=1,
        resources=Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {}),
        ports=ports,
        constraints=constraints,
        max_per_node=max_per_node,
    )


def run_filter(f: filters.Filter, nodes: list[NodeInfo], t: TaskRequest) -> list[tuple[str, list[bool]]]:
    table = NodeTable.build(nodes, [t], seed=0)
    book = PortBook(nodes, (30000, 30002))
    return [(reason, mask.tolist()) for reason, mask in f(table, book, t, table.vector(t.resources))]


PROD = Constraint(key="env", op="==", value="prod")
NOT_PROD = Constraint(key="env", op="!=", value="prod")
ZONE_A_OR_B = Constraint(key="zone", op="in", values=("a", "b"))
TCP_80 = PortRequest(container_port=80, host_port=80)
DYNAMIC = PortRequest(container_port=80)

FILTER_CASES = [
    (
        "ready",
        filters.node_ready,
        [node("a"), node("b", ready=False)],
        task(),
        [("node down", [True, False])],
    ),
    (
        "availability",
        filters.node_active,
        [node("a"), node("b", availability=Availability.DRAIN), node("c", availability=Availability.PAUSE)],
        task(),
        [("node draining", [True, False, True]), ("node paused", [True, True, False])],
    ),
    (
        "constraint-eq-missing-label-fails",
        filters.constraints_met,
        [node("a", labels={"env": "prod"}), node("b", labels={"env": "dev"}), node("c")],
        task(constraints=(PROD,)),
        [("constraint env==prod not met", [True, False, False])],
    ),
    (
        "constraint-ne-missing-label-passes",
        filters.constraints_met,
        [node("a", labels={"env": "prod"}), node("b", labels={"env": "dev"}), node("c")],
        task(constraints=(NOT_PROD,)),
        [("constraint env!=prod not met", [False, True, True])],
    ),
    (
        "constraint-unknown-op-fails-everywhere",
        filters.constraints_met,
        [node("a", labels={"env": "prod"})],
        task(constraints=(Constraint(key="env", op="~", value="prod"),)),
        [("constraint env~prod not met", [False])],
    ),
    ("constraint-none", filters.constraints_met, [node("a")], task(), []),
    (
        "constraint-in",
        filters.constraints_met,
        [node("a", labels={"zone": "a"}), node("b", labels={"zone": "b"}), node("c", labels={"zone": "c"})],
        task(constraints=(ZONE_A_OR_B,)),
        [("constraint zone in (a,b) not met", [True, True, False])],
    ),
    (
        "constraint-in-missing-label-fails",
        filters.constraints_met,
        [node("a", labels={"env": "a"}), node("b", labels={"zone": ""})],
        task(constraints=(ZONE_A_OR_B,)),
        [("constraint zone in (a,b) not met", [False, False])],
    ),
    (
        "constraint-in-ignores-value",
        filters.constraints_met,
        [node("a", labels={"zone": "a"}), node("b", labels={"zone": "b"})],
        task(constraints=(Constraint(key="zone", op="in", value="a", values=("b",)),)),
        [("constraint zone in (b) not met", [False, True])],
    ),
    (
        "constraint-in-empty-values-fails-everywhere",
        filters.constraints_met,
        [node("a", labels={"zone": ""}), node("b")],
        task(constraints=(Constraint(key="zone", op="in"),)),
        [("constraint zone in () not met", [False, False])],
    ),
    (
        "constraints-in-task-order",
        filters.constraints_met,
        [node("a", labels={"zone": "a", "env": "dev"})],
        task(constraints=(ZONE_A_OR_B, PROD)),
        [("constraint zone in (a,b) not met", [True]), ("constraint env==prod not met", [False])],
    ),
    (
        "max-per-node",
        filters.below_max_per_node,
        [node("a"), node("b", services={"web": 1}), node("c", services={"web": 2, "db": 5})],
        task(max_per_node=2),
        [("at max 2 replica(s) of web per node", [True, True, False])],
    ),
    (
        "max-per-node-other-services-ignored",
        filters.below_max_per_node,
        [node("a", services={"db": 3})],
        task(max_per_node=1),
        [("at max 1 replica(s) of web per node", [True])],
    ),
    (
        "max-per-node-zero-is-no-limit",
        filters.below_max_per_node,
        [node("a", services={"web": 100})],
        task(max_per_node=0),
        [],
    ),
    (
        "host-port-taken",
        filters.host_ports_free,
        [node("a"), node("b", ports=frozenset({("tcp", 80)})), node("c", ports=frozenset({("udp", 80)}))],
        task(ports=(TCP_80,)),
        [("host port conflict", [True, False, True])],
    ),
    (
        "host-port-twice-in-one-task",
        filters.host_ports_free,
        [node("a")],
        task(ports=(TCP_80, PortRequest(container_port=81, host_port=80))),
        [("host port conflict", [False])],
    ),
    (
        "host-port-empty-protocol-is-tcp",
        filters.host_ports_free,
        [node("a", ports=frozenset({("tcp", 80)}))],
        task(ports=(PortRequest(container_port=80, host_port=80, protocol=""),)),
        [("host port conflict", [False])],
    ),
    ("host-port-only-dynamic", filters.host_ports_free, [node("a")], task(ports=(DYNAMIC,)), []),
    (
        "dynamic-range-exhausted",
        filters.dynamic_ports_free,
        [
            node("a"),
            node("b", ports=frozenset({("tcp", 30000), ("tcp", 30001), ("tcp", 30002)})),
            node("c", ports=frozenset({("tcp", 30000), ("tcp", 30001)})),
        ],
        task(ports=(DYNAMIC,)),
        [("no free dynamic port", [True, False, True])],
    ),
    (
        "dynamic-counts-own-fixed-port-in-range",
        filters.dynamic_ports_free,
        [node("a", ports=frozenset({("tcp", 30000)}))],
        task(ports=(PortRequest(container_port=1, host_port=30001), DYNAMIC, DYNAMIC)),
        [("no free dynamic port", [False])],
    ),
    (
        "dynamic-per-protocol",
        filters.dynamic_ports_free,
        [node("a", ports=frozenset({("tcp", 30000), ("tcp", 30001), ("tcp", 30002)}))],
        task(ports=(PortRequest(container_port=53, protocol="udp"),)),
        [("no free dynamic port", [True])],
    ),
    (
        "cpu",
        filters.cpu_fits,
        [node("a", cpu=2000), node("b", cpu=2000, used_cpu=1500), node("c", cpu=1000)],
        task(cpu=1000),
        [("insufficient cpu", [True, False, True])],
    ),
    ("cpu-zero-request", filters.cpu_fits, [node("a", cpu=0)], task(), []),
    (
        "memory",
        filters.memory_fits,
        [node("a", memory=GIB), node("b", memory=GIB, used_memory=1)],
        task(memory=GIB),
        [("insufficient memory", [True, False])],
    ),
    (
        "scalar-missing-counts-as-zero",
        filters.scalars_fit,
        [node("a", scalars={"gpu": 2}), node("b"), node("c", scalars={"gpu": 2}, used_scalars={"gpu": 1})],
        task(scalars={"gpu": 2}),
        [("insufficient gpu", [True, False, False])],
    ),
    (
        "scalars-in-name-order",
        filters.scalars_fit,
        [node("a", scalars={"gpu": 1})],
        task(scalars={"ssd": 1, "gpu": 1}),
        [("insufficient gpu", [True]), ("insufficient ssd", [False])],
    ),
]


@pytest.mark.parametrize(
    ("f", "nodes", "t", "expected"), [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES]
)
def test_filter(
    f: filters.Filter, nodes: list[NodeInfo], t: TaskRequest, expected: list[tuple[str, list[bool]]]
) -> None:
    assert run_filter(f, nodes, t) == expected


def test_filters_run_in_documented_order() -> None:
    order = filters.FILTERS
    assert order == (
        filters.node_ready,
        filters.node_active,
        filters.constraints_met,
        filters.below_max_per_node,
        filters.host_ports_free,
        filters.dynamic_ports_free,
        filters.cpu_fits,
        filters.memory_fits,
        filters.scalars_fit,
    )


def mask(*values: bool) -> BoolArray:
    return np.array(values, dtype=np.bool_)


REJECTION_CASES = [
    ("none-fail", [("a", mask(True, True))], {}),
    ("counted-once-under-first", [("a", mask(False, True)), ("b", mask(False, False))], {"a": 1, "b": 1}),
    (
        "same-code-accumulates",
        [("a", mask(False, True)), ("b", mask(True, True)), ("a", mask(True, False))],
        {"a": 2},
    ),
]


@pytest.mark.parametrize(
    ("checks", "expected"), [c[1:] for c in REJECTION_CASES], ids=[c[0] for c in REJECTION_CASES]
)
def test_rejections_count_first_failure(checks: list[filters.Check], expected: dict[str, int]) -> None:
    assert dict(filters.rejections(2, checks)) == expected


FIRST_FAILURE_CASES = [
    ("all-pass", [("a", mask(True, True))], ["", ""]),
    ("first-wins", [("a", mask(False, True)), ("b", mask(False, False))], ["a", "b"]),
    ("no-checks", [], ["", ""]),
]


@pytest.mark.parametrize(
    ("checks", "expected"), [c[1:] for c in FIRST_FAILURE_CASES], ids=[c[0] for c in FIRST_FAILURE_CASES]
)
def test_first_failures(checks: list[filters.Check], expected: list[str]) -> None:
    assert filters.first_failures(2, checks) == expected


def test_feasible_is_conjunction() -> None:
    assert filters.feasible(3, [("a", mask(True, True, False)), ("b", mask(False, True, True))]).tolist() == [
        False,
        True,
        False,
    ]


EXPLAIN_CASES = [
    ("no-nodes", 0, {}, "0/0 nodes available: no nodes registered"),
    (
        "most-common-first",
        5,
        {"constraint env==prod not met": 2, "insufficient memory": 3},
        "0/5 nodes available: 3 insufficient memory, 2 constraint env==prod not met",
    ),
    (
        "ties-by-name",
        2,
        {"node down": 1, "insufficient cpu": 1},
        "0/2 nodes available: 1 insufficient cpu, 1 node down",
    ),
]


@pytest.mark.parametrize(
    ("size", "counts", "text"), [c[1:] for c in EXPLAIN_CASES], ids=[c[0] for c in EXPLAIN_CASES]
)
def test_explain(size: int, counts: dict[str, int], text: str) -> None:
    assert filters.explain(size, counts) == text
