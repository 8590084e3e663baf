"""Rankers: label spread, load (binpack / spread), own spread, seeded tie-break, and how
choose() and order() combine them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.controller.scheduler import scoring
from berth.controller.scheduler.model import NodeInfo, NodeTable, Resources, Strategy, TaskRequest

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
    labels: Mapping[str, str] | None = None,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        name=node_id,
        capacity=Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {}),
        allocated=Resources(cpu_millis=used_cpu, memory_bytes=used_memory, scalars=used_scalars or {}),
        service_counts=services or {},
        labels=labels or {},
    )


def task(
    *,
    cpu: int = 0,
    memory: int = 0,
    scalars: Mapping[str, int] | None = None,
    tid: str = "web.1",
    slot: int = 1,
    spread: tuple[str, ...] = (),
    strategy: Strategy = Strategy.BINPACK,
) -> TaskRequest:
    resources = Resources(cpu_millis=cpu, memory_bytes=memory, scalars=scalars or {})
    return TaskRequest(
        task_id=tid, service="web", slot=slot, resources=resources, spread=spread, strategy=strategy
    )


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
        # mean 0.5, free shares (0.75, 0.75, 0): imbalance (1.0607 - 0.8660) / 1.0607 = 0.1835
        "requested-scalar-counts",
        [node("a", scalars={"gpu": 2})],
        task(cpu=1000, memory=GIB, scalars={"gpu": 2}),
        [-0.05051],
    ),
    (
        # the fuller node by mean (cpu 1.0, memory 0.25 -> 0.625) is left with memory only:
        # free (0, 0.75), imbalance 1 - 1/sqrt(2) = 0.2929, so the balanced node b ranks first
        "free-room-out-of-shape-costs",
        [node("a", used_cpu=3000), node("b", used_cpu=1000, used_memory=GIB)],
        task(cpu=1000, memory=GIB),
        [-0.253680, 0.5],
    ),
    (
        # cpu 0.95, memory 1.0: free (0.05, 0), |f| = 0.05 is half the fade norm, so the
        # imbalance 0.2929 counts half: 0.975 - 3 x 0.1464
        "nearly-full-node-fades",
        [node("a", used_cpu=2800, used_memory=3 * GIB)],
        task(cpu=1000, memory=GIB),
        [0.535660],
    ),
    (
        # free (0.5, 0.5) after the placement: the shape of the capacity, no imbalance
        "free-room-in-shape-is-free",
        [node("a", used_cpu=1000, used_memory=GIB)],
        task(cpu=1000, memory=GIB),
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


IMBALANCE_CASES = [
    ("free-in-the-capacity-shape", [0.5, 0.5], [True, True], 0.0),
    ("full", [1.0, 1.0], [True, True], 0.0),
    ("one-dimension-exhausted", [1.0, 0.0], [True, True], 0.292893),
    ("fades-below-the-norm", [0.95, 1.0], [True, True], 0.146447),
    ("over-full-counts-as-no-room", [1.2, 0.0], [True, True], 0.292893),
    ("dimension-without-capacity-ignored", [0.7, 0.0], [True, False], 0.0),
    ("three-dimensions", [0.25, 0.25, 1.0], [True, True, True], 0.183503),
]


@pytest.mark.parametrize(
    ("shares", "present", "expected"), [c[1:] for c in IMBALANCE_CASES], ids=[c[0] for c in IMBALANCE_CASES]
)
def test_imbalance(shares: list[float], present: list[bool], expected: float) -> None:
    value = scoring.imbalance(np.array(shares)[:, None], np.array(present)[:, None])
    assert round(float(value[0]), 6) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=-0.5, max_value=1.5), min_size=1, max_size=6),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_imbalance_is_bounded_and_zero_in_the_capacity_shape(shares: list[float], level: float) -> None:
    d = len(shares)
    present = np.ones((d, 1), dtype=np.bool_)
    value = float(scoring.imbalance(np.array(shares)[:, None], present)[0])
    assert 0.0 <= value <= 1.0 - 1.0 / np.sqrt(d) + 1e-12
    assert float(scoring.imbalance(np.full((d, 1), level), present)[0]) < 1e-12


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


LOAD_CASES = [
    (
        "binpack-is-fit",
        [node("a", used_cpu=2000, used_memory=2 * GIB), node("b")],
        task(cpu=1000),
        [0.625, 0.125],
    ),
    (
        "spread-is-emptiness",
        [node("a", used_cpu=2000, used_memory=2 * GIB), node("b")],
        task(cpu=1000, strategy=Strategy.SPREAD),
        [0.375, 0.875],
    ),
    (
        "spread-counts-own-replicas",
        [node("a", used_cpu=2000, used_memory=2 * GIB, services={"web": 2}), node("b")],
        task(cpu=1000, memory=GIB, strategy=Strategy.SPREAD),
        [0.25, 0.75],
    ),
    (
        "spread-zero-capacity-dimension-ignored",
        [node("a", memory=0)],
        task(cpu=1000, strategy=Strategy.SPREAD),
        [0.75],
    ),
]


@pytest.mark.parametrize(
    ("nodes", "t", "expected"), [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES]
)
def test_load_scores(nodes: list[NodeInfo], t: TaskRequest, expected: list[float]) -> None:
    table = NodeTable.build(nodes, [t], seed=0)
    scores = scoring.load_scores(table, np.arange(len(nodes)), table.vector(t.resources), t)
    assert [round(x, 6) for x in scores.tolist()] == expected


DOMAIN_CASES = [
    (
        "per-label-value",
        [
            node("a1", labels={"zone": "a"}, services={"web": 2}),
            node("a2", labels={"zone": "a"}, services={"web": 1, "db": 4}),
            node("b1", labels={"zone": "b"}),
        ],
        [3, 3, 0],
    ),
    (
        "missing-label-is-empty-value-domain",
        [
            node("x", services={"web": 1}),
            node("y", labels={"zone": ""}, services={"web": 1}),
            node("a", labels={"zone": "a"}),
        ],
        [2, 2, 0],
    ),
    ("no-replicas", [node("a", labels={"zone": "a"}), node("b")], [0, 0]),
]


@pytest.mark.parametrize(
    ("nodes", "expected"), [c[1:] for c in DOMAIN_CASES], ids=[c[0] for c in DOMAIN_CASES]
)
def test_domain_counts(nodes: list[NodeInfo], expected: list[int]) -> None:
    table = NodeTable.build(nodes, [], seed=0)
    assert scoring.domain_counts(table, np.arange(len(nodes)), "web", "zone").tolist() == expected


def test_domain_counts_follow_commits() -> None:
    nodes = [
        node("a1", labels={"zone": "a"}),
        node("a2", labels={"zone": "a"}),
        node("b", labels={"zone": "b"}),
    ]
    table = NodeTable.build(nodes, [], seed=0)
    rows = np.arange(3)
    assert scoring.domain_counts(table, rows, "web", "zone").tolist() == [0, 0, 0]
    table.commit(1, table.vector(Resources()), "web")
    table.commit(2, table.vector(Resources()), "db")
    assert scoring.domain_counts(table, rows, "web", "zone").tolist() == [1, 1, 0]
    assert scoring.domain_counts(table, rows, "db", "zone").tolist() == [0, 0, 1]


def test_tie_keys_are_seeded_and_stable() -> None:
    nodes = [node(f"n{i}") for i in range(8)]
    rows = np.arange(8)

    def keys(seed: int, service: str) -> list[int]:
        keys: list[int] = scoring.tie_keys(NodeTable.build(nodes, [], seed=seed), rows, service).tolist()
        return keys

    assert keys(0, "web") == keys(0, "web")
    assert keys(0, "web") != keys(1, "web")
    assert keys(0, "web") != keys(0, "db")
    assert len(set(keys(0, "web"))) == 8
    # each service has its own order of the nodes, not one shared by all
    assert np.argsort(keys(0, "web")).tolist() != np.argsort(keys(0, "db")).tolist()


def test_tie_keys_ignore_input_order() -> None:
    nodes = [node(f"n{i}") for i in range(5)]
    forward = NodeTable.build(nodes, [], seed=3)
    backward = NodeTable.build(nodes[::-1], [], seed=3)
    rows = np.arange(5)
    by_id_forward = dict(zip(forward.ids, scoring.tie_keys(forward, rows, "web").tolist(), strict=True))
    by_id_backward = dict(zip(backward.ids, scoring.tie_keys(backward, rows, "web").tolist(), strict=True))
    assert by_id_forward == by_id_backward


ZONES = [
    node("a1", labels={"zone": "a"}, services={"web": 1}),
    node("a2", labels={"zone": "a"}, used_cpu=3000, used_memory=3 * GIB),
    node("b1", labels={"zone": "b"}),
]

RACKS = [
    node("o", labels={"rack": "1", "zone": "b"}, services={"web": 1}),
    node("p", labels={"rack": "2", "zone": "b"}),
    node("q", labels={"rack": "1", "zone": "a"}),
]

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
    (
        "spread-strategy-emptiest-wins",
        [node("a"), node("b", used_cpu=3000, used_memory=3 * GIB)],
        task(cpu=500, strategy=Strategy.SPREAD),
        "a",
    ),
    (
        "spread-strategy-own-spread-breaks-tie",
        [node("a", services={"web": 1}), node("b")],
        task(strategy=Strategy.SPREAD),
        "b",
    ),
    ("label-spread-beats-fit", ZONES, task(cpu=500, spread=("zone",)), "b1"),
    ("no-label-spread-fit-decides", ZONES, task(cpu=500), "a2"),
    (
        "label-spread-tie-then-fit",
        [*ZONES[:2], node("b1", labels={"zone": "b"}, services={"web": 1})],
        task(cpu=500, spread=("zone",)),
        "a2",
    ),
    ("label-keys-in-order", RACKS, task(spread=("rack", "zone")), "p"),
    ("label-keys-in-order-reversed", RACKS, task(spread=("zone", "rack")), "q"),
]


@pytest.mark.parametrize(
    ("nodes", "t", "expected"), [c[1:] for c in CHOOSE_CASES], ids=[c[0] for c in CHOOSE_CASES]
)
def test_choose(nodes: list[NodeInfo], t: TaskRequest, expected: str) -> None:
    table = NodeTable.build(nodes, [t], seed=0)
    rows = np.arange(len(nodes))
    request = table.vector(t.resources)
    row = scoring.choose(table, rows, request, t)
    assert table.ids[row] == expected
    assert int(scoring.order(table, rows, request, t)[0]) == row


def test_choose_tie_break_depends_on_service_not_task_id_slot_or_order() -> None:
    nodes = [node(f"n{i}") for i in range(6)]
    picks = set()
    for service in (f"svc{i}" for i in range(40)):
        chosen = set()
        for slot, tid, ordered in ((1, f"{service}.a", nodes), (7, f"{service}.b", nodes[::-1])):
            t = dataclasses.replace(task(cpu=100, tid=tid, slot=slot), service=service)
            table = NodeTable.build(ordered, [t], seed=0)
            chosen.add(table.ids[scoring.choose(table, np.arange(6), table.vector(t.resources), t)])
        assert len(chosen) == 1
        picks |= chosen
    assert len(picks) > 1


def test_order_ranks_every_candidate() -> None:
    nodes = [
        node("a"),
        node("b", used_cpu=3000, used_memory=3 * GIB),
        node("c", used_cpu=1000, used_memory=GIB),
    ]
    t = task(cpu=500)
    table = NodeTable.build(nodes, [t], seed=0)
    ranked = scoring.order(table, np.array([0, 1, 2]), table.vector(t.resources), t)
    assert [table.ids[row] for row in ranked.tolist()] == ["b", "c", "a"]
    assert scoring.order(table, np.array([], dtype=np.int64), table.vector(t.resources), t).size == 0
