"""The fast path for runs of identical replicas gives exactly the per-task path's plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.controller.scheduler import (
    Availability,
    Constraint,
    NodeInfo,
    Plan,
    PortRequest,
    Resources,
    Strategy,
    TaskRequest,
    filters,
    replicas,
    schedule,
    scoring,
)
from berth.controller.scheduler.model import NodeTable
from berth.controller.scheduler.ports import PortBook

DYNAMIC = (30000, 30003)
GIB = 1 << 30
SERVICES = ("web", "db", "api")


def both(
    nodes: list[NodeInfo], work: list[TaskRequest], seed: int = 0, *, improve: bool = True
) -> tuple[Plan, Plan]:
    fast = schedule(nodes, work, dynamic_ports=DYNAMIC, seed=seed, improve=improve)
    slow = schedule(nodes, work, dynamic_ports=DYNAMIC, seed=seed, improve=improve, _fast=False)
    return fast, slow


# --- generated inputs: few distinct node shapes (so ranks tie), long runs of replicas ----------

amounts = st.sampled_from((0, 0, 500, 500, 1000, 1500, 4000))
capacities = st.sampled_from(
    (
        Resources(cpu_millis=4000, memory_bytes=4 * GIB),
        Resources(cpu_millis=4000, memory_bytes=4 * GIB),
        Resources(cpu_millis=8000, memory_bytes=8 * GIB, scalars={"gpu": 2}),
        Resources(cpu_millis=2000, memory_bytes=0, scalars={"gpu": 1, "ssd": 4}),
    )
)
allocations = st.builds(
    Resources,
    cpu_millis=st.sampled_from((0, 0, 500, 1000, 1500, -500)),
    memory_bytes=st.sampled_from((0, 0, GIB)),
    scalars=st.sampled_from(({}, {}, {"gpu": 1}, {"ssd": -1})),
)
labels = st.dictionaries(st.sampled_from(("zone", "env")), st.sampled_from(("a", "b", "prod")), max_size=2)
used_ports = st.frozensets(
    st.tuples(st.sampled_from(("tcp", "udp")), st.sampled_from((80, 443, *range(*DYNAMIC)))), max_size=2
)
nodes = st.builds(
    NodeInfo,
    id=st.just(""),
    capacity=capacities,
    allocated=allocations,
    labels=labels,
    ready=st.sampled_from((True, True, True, True, False)),
    availability=st.sampled_from((*[Availability.ACTIVE] * 8, Availability.DRAIN)),
    used_ports=used_ports,
    service_counts=st.sampled_from(({}, {}, {"web": 1}, {"web": 2, "db": 1}, {"db": 1})),
)
"""Nodes from few values each, so that many share a rank (load and own replicas)."""


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeInfo]:
    picks = draw(st.lists(nodes, min_size=1, max_size=16))
    if len(picks) > 1 and draw(st.booleans()):
        # the first node's twin (same id and rank, maybe other ports): the lower row must win ties
        picks[-1] = dataclasses.replace(picks[0], used_ports=draw(used_ports))
        return [dataclasses.replace(n, id=f"n{i}") for i, n in enumerate(picks[:-1])] + [
            dataclasses.replace(picks[-1], id="n0")
        ]
    return [dataclasses.replace(n, id=f"n{i}") for i, n in enumerate(picks)]


shapes = st.builds(
    TaskRequest,
    task_id=st.just(""),
    service=st.sampled_from(SERVICES),
    resources=st.builds(
        Resources,
        cpu_millis=amounts,
        memory_bytes=st.sampled_from((0, 0, GIB // 4, GIB, 3 * GIB)),
        scalars=st.sampled_from(({}, {}, {}, {"gpu": 1}, {"ssd": 2})),
    ),
    ports=st.sampled_from(
        (
            (),
            (),
            (),
            (PortRequest(container_port=80, host_port=80),),
            (PortRequest(container_port=80, host_port=443, protocol="udp"),),
            (PortRequest(container_port=80, host_port=80), PortRequest(container_port=81, host_port=80)),
            (PortRequest(container_port=80),),
        )
    ),
    constraints=st.sampled_from(
        (
            (),
            (),
            (Constraint(key="zone", op="!=", value="b"),),
            (Constraint(key="env", op="==", value="prod"),),
        )
    ),
    max_per_node=st.sampled_from((0, 0, 1, 2)),
    spread=st.sampled_from(((), (), (), ("zone",))),
    strategy=st.sampled_from((Strategy.BINPACK, Strategy.BINPACK, Strategy.SPREAD)),
)


@st.composite
def workloads(draw: st.DrawFn) -> list[TaskRequest]:
    """Runs of 1-40 identical replicas (consecutive or scattered slots), back to back."""
    work: list[TaskRequest] = []
    for shape in draw(st.lists(shapes, min_size=1, max_size=6)):
        count = draw(st.integers(min_value=1, max_value=40))
        first = draw(st.integers(min_value=0, max_value=1000))
        slots = (
            list(range(first, first + count))
            if draw(st.booleans())
            else draw(st.lists(st.integers(min_value=0, max_value=50), min_size=count, max_size=count))
        )
        start = len(work)
        work += [
            dataclasses.replace(shape, task_id=f"t{start + i}", slot=slot) for i, slot in enumerate(slots)
        ]
    return work


@settings(max_examples=400, deadline=None)
@given(clusters(), workloads(), st.integers(min_value=0, max_value=3), st.booleans())
def test_fast_path_gives_the_per_task_plan(
    nodes: list[NodeInfo], work: list[TaskRequest], seed: int, improve: bool
) -> None:
    fast, slow = both(nodes, work, seed, improve=improve)
    assert fast == slow


# --- examples -----------------------------------------------------------------------------------


def node(node_id: str, *, cpu: int = 32000, memory: int = 128 * GIB, used_cpu: int = 0) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        capacity=Resources(cpu_millis=cpu, memory_bytes=memory),
        allocated=Resources(cpu_millis=used_cpu),
    )


def service(name: str, count: int, **fields: object) -> list[TaskRequest]:
    shape = TaskRequest(task_id="", service=name, **fields)  # type: ignore[arg-type]
    return [dataclasses.replace(shape, task_id=f"{name}.{slot}", slot=slot) for slot in range(1, count + 1)]


def test_many_services_of_identical_replicas() -> None:
    nodes = [node(f"n{i}", used_cpu=(i % 5) * 1000) for i in range(60)]
    work = [
        t
        for s in range(8)
        for t in service(f"s{s}", 90, resources=Resources(cpu_millis=300, memory_bytes=64 << 20))
    ]
    fast, slow = both(nodes, work)
    assert fast == slow
    assert len(fast.placements) == len(work)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_run_that_fills_the_cluster_goes_pending_with_the_same_reasons(strategy: Strategy) -> None:
    nodes = [node(f"n{i}", cpu=4000, used_cpu=i * 500) for i in range(6)]
    work = service("web", 40, resources=Resources(cpu_millis=1000), strategy=strategy, max_per_node=3)
    work += service("db", 5, resources=Resources(cpu_millis=1000))
    fast, slow = both(nodes, work)
    assert fast == slow
    assert fast.pending and fast.placements


def test_fast_path_ranks_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    run_filters = filters.run_filters

    def counting(*args: object) -> list[filters.Check]:
        calls.append(args)
        return run_filters(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(filters, "run_filters", counting)
    nodes = [node(f"n{i}") for i in range(10)]
    work = service("web", 50, resources=Resources(cpu_millis=100)) + service("db", 50)
    schedule(nodes, work)
    assert len(calls) == 2


@pytest.mark.parametrize("strategy", list(Strategy))
def test_untrusted_index_falls_back_to_the_per_task_path(
    monkeypatch: pytest.MonkeyPatch, strategy: Strategy
) -> None:
    # The index says only the first node of each stretch it handed out stands, and it handed out
    # a wrong node second: the placements after the first are undone and the per-task path
    # places the rest of the run, as if the fast path had never been taken.
    nodes = [node(f"n{i}", used_cpu=(i % 3) * 100) for i in range(10)]
    work = service("web", 30, resources=Resources(cpu_millis=100), strategy=strategy)
    work += service("db", 30, resources=Resources(cpu_millis=300), strategy=strategy)
    expected = schedule(nodes, work, _fast=False)
    take = replicas.ReplicaIndex.take

    def wrong_second(self: replicas.ReplicaIndex, limit: int) -> npt.NDArray[np.int64]:
        rows = take(self, limit).copy()
        if rows.size >= 2:
            rows[1] = next(r for r in range(len(nodes)) if r not in rows.tolist())
        return rows

    undone: list[int] = []
    uncommit_rows = NodeTable.uncommit_rows

    def counting(self: NodeTable, rows: npt.NDArray[np.int64], *args: object) -> None:
        undone.append(int(rows.size))
        uncommit_rows(self, rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(replicas.ReplicaIndex, "take", wrong_second)
    monkeypatch.setattr(replicas.ReplicaIndex, "update", lambda self, rows: 1)
    monkeypatch.setattr(NodeTable, "uncommit_rows", counting)
    assert schedule(nodes, work) == expected
    assert undone and all(size > 0 for size in undone)


def test_update_stops_trusting_at_the_first_node_whose_rank_did_not_get_worse() -> None:
    nodes = [node(f"n{i}") for i in range(6)]
    work = service("web", 6, resources=Resources(cpu_millis=100))
    for corrupt in (False, True):
        table = NodeTable.build(nodes, work, seed=0)
        request = table.vector(work[0].resources)
        index = replicas.ReplicaIndex.start(table, PortBook(nodes, DYNAMIC), work[0], request, np.arange(6))
        assert index is not None
        rows = index.take(4)
        assert rows.size == 4 and len(set(rows.tolist())) == 4
        table.commit_rows(rows, request, "web")
        if corrupt:  # as if the third node's placement had left its rank as it was
            table.service_counts("web")[rows[2]] -= 1
        assert index.update(rows) == (3 if corrupt else None)


def test_a_run_keeps_the_label_spread_counts_of_its_service() -> None:
    # Two generations of one service in a batch: replicas spread by zone, a run of the new spec
    # (no spread: the fast path), then more spread replicas, which must see where that run went.
    nodes = [dataclasses.replace(node(f"n{i}"), labels={"zone": "ab"[i % 2]}) for i in range(6)]
    spread = service("web", 3, resources=Resources(cpu_millis=100), spread=("zone",))
    run = [
        dataclasses.replace(t, task_id=f"web.new.{t.slot}")
        for t in service("web", 9, resources=Resources(cpu_millis=200), max_per_node=2)[:7]
    ]
    later = [dataclasses.replace(t, task_id=f"web.late.{t.slot}", slot=t.slot + 20) for t in spread]
    fast, slow = both(nodes, spread + run + later, improve=False)
    assert fast == slow
    assert len(fast.placements) == 13


def test_negative_allocation_keeps_to_the_per_task_path() -> None:
    # The per-task path clips "allocated - own" at 0 only once some candidate holds a replica,
    # which changes the load of a node with a negative allocation in the middle of the run.
    nodes = [node("a", cpu=4000), node("x", cpu=4000, used_cpu=-500)]
    work = service("api", 5, resources=Resources(cpu_millis=500))
    fast, slow = both(nodes, work)
    assert fast == slow
    assert {p.node_id for p in fast.placements} == {"a", "x"}


def test_equal_tie_hashes_go_to_the_lower_row() -> None:
    # Two nodes with one id tie on every key; the first row wins, as in the per-task path, and
    # which row got more replicas shows in where the next service fits.
    twins = [
        node("n", cpu=4000),
        dataclasses.replace(node("n", cpu=4000), used_ports=frozenset({("tcp", 80)})),
    ]
    work = service("web", 5, resources=Resources(cpu_millis=1000))
    work += service(
        "edge", 4, resources=Resources(cpu_millis=1500), ports=(PortRequest(container_port=80, host_port=80),)
    )
    # in arrival order (improve=False): the batch order would place the larger edge tasks first
    fast, slow = both(twins, work, improve=False)
    assert fast == slow
    assert len(fast.placements) == 5
    assert fast.pending[0].rejections == {"host port conflict": 1, "insufficient cpu": 1}


def test_equal_tie_keys_go_to_the_lower_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every tie key equal (the largest uint64): the lowest row still free wins, as in the
    # per-task path, and each node takes one replica before any takes a second.
    def saturated(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        return np.full(values.shape, np.iinfo(np.uint64).max, dtype=np.uint64)

    monkeypatch.setattr(scoring, "mix64", saturated)
    nodes = [node(f"n{i}") for i in range(6)]
    work = service("web", 20, resources=Resources(cpu_millis=100))
    fast, slow = both(nodes, work)
    assert fast == slow
    assert [p.node_id for p in fast.placements[:7]] == ["n0", "n1", "n2", "n3", "n4", "n5", "n0"]


def test_a_service_takes_tied_nodes_in_its_own_order() -> None:
    # 12 replicas on 6 equal nodes: two rounds over the nodes, each in the service's order; a
    # service of another name orders them differently.
    nodes = [node(f"n{i}") for i in range(6)]
    orders = []
    for name in ("web", "api"):
        plan = schedule(nodes, service(name, 12, resources=Resources(cpu_millis=100)))
        placed = [p.node_id for p in plan.placements]
        assert placed[:6] == placed[6:]
        assert sorted(placed[:6]) == [f"n{i}" for i in range(6)]
        orders.append(placed[:6])
    assert orders[0] != orders[1]
