"""Refill (controller/scheduler/improve.py): repack the batch's tasks on the hosts it opened."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.controller.scheduler import (
    Constraint,
    NodeInfo,
    Plan,
    Resources,
    TaskRequest,
    improve,
    schedule,
)
from berth.controller.scheduler.model import IntArray, NodeTable

GIB = 1 << 30
TRIPLETS = [(50, 30, 20), (45, 35, 20), (40, 35, 25), (60, 25, 15)]
"""Four hosts of 100 filled exactly by three tasks each."""


def node(node_id: str, *, cpu: int = 100, memory: int = 100, **fields: object) -> NodeInfo:
    return NodeInfo(id=node_id, capacity=Resources(cpu_millis=cpu, memory_bytes=memory), **fields)  # type: ignore[arg-type]


def task(i: int, cpu: int, memory: int | None = None, **fields: object) -> TaskRequest:
    resources = Resources(cpu_millis=cpu, memory_bytes=cpu if memory is None else memory)
    return TaskRequest(task_id=f"t{i}", service=f"s{i}", resources=resources, **fields)  # type: ignore[arg-type]


def hosts(plan: Plan) -> int:
    return len({p.node_id for p in plan.placements})


def placed(nodes: list[NodeInfo], work: list[TaskRequest], rows: list[int]) -> tuple[NodeTable, IntArray]:
    """A table with ``work[i]`` committed on node ``rows[i]``, and the request matrix."""
    table = NodeTable.build(nodes, work, seed=0)
    requests = np.array([table.vector(t.resources) for t in work], dtype=np.int64).T.copy()
    for i, t in enumerate(work):
        table.commit(rows[i], requests[:, i], t.service)
    return table, requests


def refill(
    nodes: list[NodeInfo], work: list[TaskRequest], rows: list[int]
) -> tuple[NodeTable, IntArray, IntArray | None]:
    table, requests = placed(nodes, work, rows)
    positions = np.arange(len(work), dtype=np.int64)
    where = np.array(rows, dtype=np.int64)
    fresh = np.ones(len(nodes), dtype=np.bool_)
    return table, requests, improve.refill(table, work, positions, where, requests, fresh)


# --- hand-made cases ------------------------------------------------------------------------------


def test_refill_finds_the_triplets_greedy_best_fit_misses() -> None:
    sizes = sorted((s for triple in TRIPLETS for s in triple), reverse=True)
    work = [task(i, s) for i, s in enumerate(sizes)]
    nodes = [node(f"n{i}") for i in range(len(work))]
    assert hosts(schedule(nodes, work, improve=False)) > len(TRIPLETS)
    plan = schedule(nodes, work)
    assert hosts(plan) == len(TRIPLETS)
    load = Counter[str]()
    for p in plan.placements:
        load[p.node_id] += sizes[int(p.task_id[1:])]
    assert sorted(load.values()) == [100] * len(TRIPLETS)


def test_refill_commits_its_rows_to_the_table() -> None:
    # greedy-like start: 50+45 | 40+35 | 35+30 | 25+20+20 | 60+25 | 15 -> six hosts
    sizes = [50, 45, 40, 35, 35, 30, 25, 20, 20, 60, 25, 15]
    rows = [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5]
    work = [task(i, s) for i, s in enumerate(sizes)]
    nodes = [node(f"n{i}") for i in range(len(work))]
    table, requests, new = refill(nodes, work, rows)
    assert new is not None
    assert np.unique(new).size < np.unique(rows).size
    expected = np.zeros_like(table.allocated)
    for i, row in enumerate(new.tolist()):
        expected[:, row] += requests[:, i]
    assert (table.allocated == expected).all()
    assert set(new.tolist()) <= set(rows)  # only hosts the batch already used


@pytest.mark.parametrize(
    ("label", "sizes", "rows"),
    [
        ("already-optimal", [50, 50, 60, 40], [0, 0, 1, 1]),
        ("one-host", [10, 20], [0, 0]),
        ("nothing-fits-together", [60, 70, 80], [0, 1, 2]),
    ],
)
def test_refill_changes_nothing_without_a_better_packing(
    label: str, sizes: list[int], rows: list[int]
) -> None:
    work = [task(i, s) for i, s in enumerate(sizes)]
    nodes = [node(f"n{i}") for i in range(len(work))]
    table, _, new = refill(nodes, work, rows)
    assert new is None
    before, _ = placed(nodes, work, rows)
    assert (table.allocated == before.allocated).all()


def test_refill_never_stacks_two_replicas_of_one_service() -> None:
    # two 50s of one service would fill a host exactly; they must stay on separate hosts
    work = [
        TaskRequest(
            task_id=f"w{k}", service="web", slot=k, resources=Resources(cpu_millis=50, memory_bytes=50)
        )
        for k in range(2)
    ] + [task(2, 50), task(3, 50)]
    nodes = [node(f"n{i}") for i in range(4)]
    _, _, new = refill(nodes, work, [0, 1, 2, 3])
    assert new is not None
    assert new[0] != new[1]
    assert np.unique(new).size == 2


def test_refill_keeps_constraints() -> None:
    # t0 and t2 may only run in zone a: refill pairs each with an unconstrained 50 on a0 and a1
    in_a = (Constraint(key="zone", op="==", value="a"),)
    work = [task(0, 50, constraints=in_a), task(1, 50), task(2, 50, constraints=in_a), task(3, 50)]
    nodes = [
        node("a0", labels={"zone": "a"}),
        node("a1", labels={"zone": "a"}),
        node("b0", labels={"zone": "b"}),
    ]
    _, _, new = refill(nodes, work, [0, 2, 1, 2])
    assert new is not None
    assert np.unique(new).size == 2
    assert new[0] in (0, 1) and new[2] in (0, 1)


def test_refill_finds_an_exact_pair_beyond_the_candidate_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # after the 60, room (40, 40): the window of 2 sees only a=(36,6) and b=(6,36), which do not
    # fit together, and largest first would take a; the hash finds c + d = (22,17) + (18,23)
    monkeypatch.setattr(improve, "PAIR_CANDIDATES", 2)
    shapes = [(60, 60), (36, 6), (6, 36), (22, 17), (18, 23)]
    work = [task(i, c, m) for i, (c, m) in enumerate(shapes)]
    nodes = [node(f"n{i}") for i in range(len(work))]
    _, _, new = refill(nodes, work, [0, 1, 2, 3, 3])
    assert new is not None
    assert new[0] == new[3] == new[4]
    assert np.unique(new).size == 2


def test_big_batches_skip_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(improve, "MAX_TASKS", 3)
    sizes = [50, 45, 40, 35, 35, 30, 25, 20, 20, 60, 25, 15]
    rows = [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5]
    work = [task(i, s) for i, s in enumerate(sizes)]
    _, _, new = refill([node(f"n{i}") for i in range(len(work))], work, rows)
    assert new is None


def test_hosts_busy_before_the_call_are_left_alone() -> None:
    busy = node("busy", allocated=Resources(cpu_millis=10, memory_bytes=10), service_counts={"old": 1})
    sizes = [s for triple in TRIPLETS for s in triple]
    work = [task(i, s) for i, s in enumerate(sizes)]
    nodes = [busy, *(node(f"n{i}") for i in range(len(work)))]
    plan = schedule(nodes, work)
    on_busy = [sizes[int(p.task_id[1:])] for p in plan.placements if p.node_id == "busy"]
    assert sum(on_busy) <= 90
    assert plan.pending == ()


# --- properties -----------------------------------------------------------------------------------

amounts = st.integers(min_value=1, max_value=60)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(amounts, amounts, st.integers(min_value=0, max_value=9)), min_size=2, max_size=40),
    st.integers(min_value=0, max_value=3),
    st.booleans(),
)
def test_refill_keeps_every_rule(shapes: list[tuple[int, int, int]], seed: int, constrained: bool) -> None:
    in_a = (Constraint(key="zone", op="==", value="a"),)
    work = [
        TaskRequest(
            task_id=f"t{i}",
            service=f"s{service}",
            slot=i,
            resources=Resources(cpu_millis=c, memory_bytes=m),
            constraints=in_a if constrained and i % 3 == 0 else (),
        )
        for i, (c, m, service) in enumerate(shapes)
    ]
    nodes = [node(f"n{i}", labels={"zone": "a" if i % 2 else "b"}) for i in range(len(work) * 2)]
    greedy = schedule(nodes, work, seed=seed, improve=False)
    assert greedy.pending == ()
    ids = [n.id for n in nodes]
    rows = [ids.index(p.node_id) for p in greedy.placements]
    table, requests, new = refill(nodes, work, rows)
    again = refill(nodes, work, rows)[2]
    assert (new is None) == (again is None)
    if new is None:
        return
    assert again is not None and (new == again).all()  # deterministic
    assert np.unique(new).size < np.unique(rows).size  # fewer hosts, or nothing at all
    assert set(new.tolist()) <= set(rows)
    assert (table.allocated <= table.capacity).all()  # never over-committed
    pairs = Counter((int(row), t.service) for row, t in zip(new.tolist(), work, strict=True))
    assert max(pairs.values()) == 1  # no host holds two replicas of one service
    for row, t in zip(new.tolist(), work, strict=True):
        if t.constraints:
            assert nodes[row].labels["zone"] == "a"
    expected = np.zeros_like(table.allocated)
    for i, row in enumerate(new.tolist()):
        expected[:, row] += requests[:, i]
    assert (table.allocated == expected).all()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(amounts, amounts), min_size=1, max_size=30),
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=4),
    st.integers(min_value=0, max_value=3),
)
def test_schedule_with_refill_never_moves_running_work_or_overcommits(
    shapes: list[tuple[int, int]], busy: list[int], seed: int
) -> None:
    nodes = [
        node(f"b{i}", allocated=Resources(cpu_millis=u, memory_bytes=u), service_counts={"old": 1})
        for i, u in enumerate(busy)
    ] + [node(f"n{i}") for i in range(len(shapes))]
    work = [
        TaskRequest(
            task_id=f"t{i}", service=f"s{i % 5}", slot=i, resources=Resources(cpu_millis=c, memory_bytes=m)
        )
        for i, (c, m) in enumerate(shapes)
    ]
    plan = schedule(nodes, work, seed=seed)
    assert plan == schedule(nodes, work, seed=seed)
    load = {n.id: [n.allocated.cpu_millis, n.allocated.memory_bytes] for n in nodes}
    by_id = {t.task_id: t for t in work}
    for p in plan.placements:
        t = by_id[p.task_id]
        load[p.node_id][0] += t.resources.cpu_millis
        load[p.node_id][1] += t.resources.memory_bytes
    assert all(cpu <= 100 and memory <= 100 for cpu, memory in load.values())
