"""Scorers: best fit, spread, seeded tie-break, and how choose() combines them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from berth.controller.scheduler import scoring
from berth.controller.scheduler.model import NodeInfo, NodeTable, Resources, TaskRequest

GIB = 1 << 30


def node(
    node_id: str,
    *,
    cpu: int = 4000,
    memory: int = 4 * GIB,
    used_cpu: int = 0,
    used_memory: int = 0,
    scalars: Mapping[str, int] | None = None,
    used_scalars: Mapping[str, int] | None = None,
    services: Mapping[str, int] | None = None,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        name=node_id,
        capacity=Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {}),
        allocated=Resources(cpu_millis=used_cpu, memory_bytes=used_memory, scalars=used_scalars or {}),
        service_counts=services or {},
    )


def task(
    *, cpu: int = 0, memory: int = 0, scalars: Mapping[str, int] | None = None, tid: str = "web.1"
) -> TaskRequest:
    resources = Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {})
    return TaskRequest(task_id=tid, service="web", slot=1, resources=resources)


def fit(nodes: list[NodeInfo], t: TaskRequest) -> list[float]:
    table = NodeTable.build(nodes, [t], seed=0)
    rows = np.arange(len(nodes))
    own = scoring.spread_counts(table, rows, t.service)
    return [round(x, 6) for x in scoring.fit_scores(table, rows, table.vector(t.resources), own).tolist()]


FIT_CASES = [
    ("empty-node", [node("a")], task(cpu=1000, memory=GIB), [0.25]),
    (
        "fuller-node-scores-higher",
        [node("a", used_cpu=2000, used_memory=2 * GIB), node("b")],
        task(cpu=1000),
        [0.625, 0.125],
    ),
    ("mean-of-cpu-and-memory", [node("a", used_cpu=4000)], task(memory=2 * GIB), [0.75]),
    ("zero-request-scores-current-load", [node("a", used_cpu=1000, used_memory=GIB)], task(), [0.25]),
    ("zero-capacity-dimension-ignored", [node("a", memory=0)], task(cpu=2000), [0.5]),
    ("no-capacity-at-all", [node("a", cpu=0, memory=0)], task(), [0.0]),
    (
        "requested-scalar-counts",
        [node("a", scalars={"gpu": 2})],
        task(cpu=1000, memory=GIB, scalars={"gpu": 2}),
        [0.5],
    ),
    ("unrequested-scalar-ignored", [node("a", scalars={"gpu": 4})], task(cpu=2000, memory=2 * GIB), [0.5]),
    (
        "own-replicas-ignored",
        [node("a", used_cpu=2000, used_memory=2 * GIB, services={"web": 2}), node("b")],
        task(cpu=1000, memory=GIB),
        [0.25, 0.25],
    ),
    (
        "own-replicas-clipped-at-empty",
        [node("a", used_cpu=500, used_memory=GIB, services={"web": 3})],
        task(cpu=1000, memory=GIB),
        [0.25],
    ),
    (
        "other-services-count",
        [node("a", used_cpu=2000, used_memory=2 * GIB, services={"db": 2}), node("b")],
        task(cpu=1000, memory=GIB),
        [0.75, 0.25],
    ),
]


@pytest.mark.parametrize(
    ("nodes", "t", "expected"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES]
)
def test_fit_scores(nodes: list[NodeInfo], t: TaskRequest, expected: list[float]) -> None:
    assert fit(nodes, t) == expected


SPREAD_CASES = [
    ("none", [node("a"), node("b")], [0, 0]),
    (
        "counts-own-service-only",
        [node("a", services={"web": 2, "db": 5}), node("b", services={"db": 1})],
        [2, 0],
    ),
]


@pytest.mark.parametrize(
    ("nodes", "expected"), [c[1:] for c in SPREAD_CASES], ids=[c[0] for c in SPREAD_CASES]
)
def test_spread_counts(nodes: list[NodeInfo], expected: list[int]) -> None:
    table = NodeTable.build(nodes, [], seed=0)
    assert scoring.spread_counts(table, np.arange(len(nodes)), "web").tolist() == expected


def test_tie_keys_are_seeded_and_stable() -> None:
    nodes = [node(f"n{i}") for i in range(8)]
    rows = np.arange(8)
    keys = scoring.tie_keys(NodeTable.build(nodes, [], seed=0), rows, "web.1").tolist()
    assert keys == scoring.tie_keys(NodeTable.build(nodes, [], seed=0), rows, "web.1").tolist()
    assert keys != scoring.tie_keys(NodeTable.build(nodes, [], seed=1), rows, "web.1").tolist()
    assert keys != scoring.tie_keys(NodeTable.build(nodes, [], seed=0), rows, "web.2").tolist()
    assert len(set(keys)) == 8


def test_tie_keys_ignore_input_order() -> None:
    nodes = [node(f"n{i}") for i in range(5)]
    forward = NodeTable.build(nodes, [], seed=3)
    backward = NodeTable.build(nodes[::-1], [], seed=3)
    rows = np.arange(5)
    by_id_forward = dict(zip(forward.ids, scoring.tie_keys(forward, rows, "t").tolist(), strict=True))
    by_id_backward = dict(zip(backward.ids, scoring.tie_keys(backward, rows, "t").tolist(), strict=True))
    assert by_id_forward == by_id_backward


CHOOSE_CASES = [
    ("best-fit-wins", [node("a"), node("b", used_cpu=3000, used_memory=3 * GIB)], task(cpu=500), "b"),
    (
        "spread-breaks-fit-tie",
        [node("a", used_cpu=1000, used_memory=GIB, services={"web": 1}), node("b")],
        task(cpu=1000, memory=GIB),
        "b",
    ),
    (
        "fit-beats-spread",
        [node("a", used_cpu=3000, used_memory=3 * GIB, services={"web": 1, "db": 1}), node("b")],
        task(cpu=1000, memory=GIB),
        "a",
    ),
]


@pytest.mark.parametrize(
    ("nodes", "t", "expected"), [c[1:] for c in CHOOSE_CASES], ids=[c[0] for c in CHOOSE_CASES]
)
def test_choose(nodes: list[NodeInfo], t: TaskRequest, expected: str) -> None:
    table = NodeTable.build(nodes, [t], seed=0)
    row = scoring.choose(table, np.arange(len(nodes)), table.vector(t.resources), t.service, t.task_id)
    assert table.ids[row] == expected


def test_choose_tie_break_depends_on_task_not_order() -> None:
    nodes = [node(f"n{i}") for i in range(6)]
    picks = set()
    for i in range(40):
        t = task(cpu=100, tid=f"web.{i}")
        forward = NodeTable.build(nodes, [t], seed=0)
        backward = NodeTable.build(nodes[::-1], [t], seed=0)
        rows = np.arange(6)
        a = forward.ids[scoring.choose(forward, rows, forward.vector(t.resources), "web", t.task_id)]
        b = backward.ids[scoring.choose(backward, rows, backward.vector(t.resources), "web", t.task_id)]
        assert a == b
        picks.add(a)
    assert len(picks) > 1
