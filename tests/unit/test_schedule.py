"""schedule() and explain() end to end: placements, spread, limits, ports and pending reasons."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import pytest

from berth.controller.scheduler import (
    Availability,
    Constraint,
    NodeInfo,
    NodeVerdict,
    Pending,
    Placement,
    Plan,
    PortRequest,
    Resources,
    Strategy,
    TaskRequest,
    explain,
    schedule,
)

GIB = 1 << 30


def node(
    node_id: str,
    *,
    cpu: int = 4000,
    memory: int = 4 * GIB,
    used_cpu: int = 0,
    used_memory: int = 0,
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    availability: Availability = Availability.ACTIVE,
    ports: frozenset[tuple[str, int]] = frozenset(),
    services: Mapping[str, int] | None = None,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        name=node_id,
        capacity=Resources(cpu_millis=cpu, memory_bytes=memory),
        allocated=Resources(cpu_millis=used_cpu, memory_bytes=used_memory),
        labels=labels or {},
        ready=ready,
        availability=availability,
        used_ports=ports,
        service_counts=services or {},
    )


def tasks(
    service: str,
    count: int,
    *,
    cpu: int = 0,
    memory: int = 0,
    ports: tuple[PortRequest, ...] = (),
    constraints: tuple[Constraint, ...] = (),
    max_per_node: int = 0,
    spread: tuple[str, ...] = (),
    strategy: Strategy = Strategy.BINPACK,
) -> list[TaskRequest]:
    resources = Resources(cpu_millis=cpu, memory_bytes=memory)
    return [
        TaskRequest(
            task_id=f"{service}.{slot}",
            service=service,
            slot=slot,
            resources=resources,
            ports=ports,
            constraints=constraints,
            max_per_node=max_per_node,
            spread=spread,
            strategy=strategy,
        )
        for slot in range(1, count + 1)
    ]


def per_node(plan: Plan) -> dict[str, int]:
    return dict(Counter(p.node_id for p in plan.placements))


def test_identical_replicas_spread_evenly() -> None:
    plan = schedule([node("a"), node("b"), node("c")], tasks("web", 6, cpu=500, memory=GIB // 2))
    assert per_node(plan) == {"a": 2, "b": 2, "c": 2}
    assert plan.pending == ()


def test_zero_request_replicas_spread_evenly() -> None:
    plan = schedule([node(f"n{i}") for i in range(4)], tasks("web", 8))
    assert sorted(per_node(plan).values()) == [2, 2, 2, 2]


def test_existing_replicas_count_for_spread() -> None:
    nodes = [node("a", used_cpu=1000, used_memory=GIB, services={"web": 2}), node("b"), node("c")]
    plan = schedule(nodes, tasks("web", 4, cpu=500, memory=GIB // 2))
    assert per_node(plan) == {"b": 2, "c": 2}


def test_small_task_goes_to_fuller_node() -> None:
    nodes = [node("empty"), node("busy", used_cpu=3000, used_memory=3 * GIB, services={"db": 1})]
    plan = schedule(nodes, tasks("web", 1, cpu=500, memory=GIB // 2))
    assert per_node(plan) == {"busy": 1}


def test_big_task_goes_where_it_fits() -> None:
    nodes = [node("empty"), node("busy", used_cpu=3000, used_memory=3 * GIB)]
    plan = schedule(nodes, tasks("web", 1, cpu=2000))
    assert per_node(plan) == {"empty": 1}


def test_placements_update_working_state() -> None:
    plan = schedule([node("a", cpu=1000), node("b", cpu=1000)], tasks("web", 3, cpu=600))
    assert sorted(per_node(plan).values()) == [1, 1]
    assert plan.pending[0].task_id == "web.3"
    assert plan.pending[0].reason == "0/2 nodes available: 2 insufficient cpu"


def test_constraints_respected() -> None:
    nodes = [node("a", labels={"env": "prod"}), node("b", labels={"env": "dev"}), node("c")]
    prod = tasks("web", 3, constraints=(Constraint(key="env", op="==", value="prod"),))
    not_prod = tasks("db", 4, constraints=(Constraint(key="env", op="!=", value="prod"),))
    plan = schedule(nodes, prod + not_prod)
    by_task = {p.task_id: p.node_id for p in plan.placements}
    assert {by_task[f"web.{i}"] for i in (1, 2, 3)} == {"a"}
    assert {by_task[f"db.{i}"] for i in (1, 2, 3, 4)} == {"b", "c"}


def test_fixed_host_port_one_replica_per_node() -> None:
    port = PortRequest(container_port=8080, host_port=80)
    plan = schedule(
        [node("a"), node("b", ports=frozenset({("tcp", 80)})), node("c")], tasks("web", 3, ports=(port,))
    )
    assert per_node(plan) == {"a": 1, "c": 1}
    assert plan.placements[0].ports == ((8080, 80, "tcp"),)
    assert plan.pending[0].reason == "0/3 nodes available: 3 host port conflict"


def test_dynamic_ports_lowest_free_first() -> None:
    nodes = [node("a", ports=frozenset({("tcp", 30000), ("tcp", 30002)}))]
    request = (PortRequest(container_port=80), PortRequest(container_port=53, protocol="udp"))
    plan = schedule(nodes, tasks("web", 3, ports=request), dynamic_ports=(30000, 30003))
    assert [p.ports for p in plan.placements] == [
        ((80, 30001, "tcp"), (53, 30000, "udp")),
        ((80, 30003, "tcp"), (53, 30001, "udp")),
    ]
    assert plan.pending[0].reason == "0/1 nodes available: 1 no free dynamic port"


def test_dynamic_port_skips_own_fixed_port() -> None:
    request = (PortRequest(container_port=1, host_port=30000), PortRequest(container_port=2))
    plan = schedule([node("a")], tasks("web", 1, ports=request))
    assert plan.placements[0].ports == ((1, 30000, "tcp"), (2, 30001, "tcp"))


def test_zero_request_task_fits_full_node() -> None:
    plan = schedule([node("a", used_cpu=4000, used_memory=4 * GIB)], tasks("web", 1))
    assert per_node(plan) == {"a": 1}


def test_same_input_same_plan() -> None:
    nodes = [node(f"n{i}") for i in range(7)]
    work = tasks("web", 9, cpu=300) + tasks("db", 5, memory=GIB)
    assert schedule(nodes, work, seed=5) == schedule(nodes, work, seed=5)


def test_identical_pending_tasks_share_reason_until_state_changes() -> None:
    work = tasks("big", 2, cpu=5000) + tasks("small", 1, cpu=4000) + tasks("big2", 1, cpu=5000)
    plan = schedule([node("a")], work)
    assert [p.task_id for p in plan.pending] == ["big.1", "big.2", "big2.1"]
    assert {p.reason for p in plan.pending} == {"0/1 nodes available: 1 insufficient cpu"}


PENDING_CASES = [
    ("no-nodes", [], tasks("web", 1), "0/0 nodes available: no nodes registered", {}),
    (
        "kubernetes-style-summary",
        [node(f"m{i}", memory=GIB, labels={"env": "prod"}) for i in range(3)]
        + [node(f"d{i}", labels={"env": "dev"}) for i in range(2)],
        tasks("web", 1, memory=2 * GIB, constraints=(Constraint(key="env", op="==", value="prod"),)),
        "0/5 nodes available: 3 insufficient memory, 2 constraint env==prod not met",
        {"insufficient memory": 3, "constraint env==prod not met": 2},
    ),
    (
        "first-failing-filter-only",
        [
            node("down", ready=False, availability=Availability.DRAIN, cpu=0),
            node("drain", availability=Availability.DRAIN, cpu=0),
            node("pause", availability=Availability.PAUSE),
            node("small", cpu=100),
        ],
        tasks("web", 1, cpu=1000),
        "0/4 nodes available: 1 insufficient cpu, 1 node down, 1 node draining, 1 node paused",
        {"node down": 1, "node draining": 1, "node paused": 1, "insufficient cpu": 1},
    ),
    (
        "ports-before-resources",
        [node("a", cpu=0, ports=frozenset({("tcp", 80)}))],
        tasks("web", 1, cpu=1, ports=(PortRequest(container_port=80, host_port=80),)),
        "0/1 nodes available: 1 host port conflict",
        {"host port conflict": 1},
    ),
]


@pytest.mark.parametrize(
    ("nodes", "work", "reason", "rejections"),
    [c[1:] for c in PENDING_CASES],
    ids=[c[0] for c in PENDING_CASES],
)
def test_pending_reason(
    nodes: list[NodeInfo], work: list[TaskRequest], reason: str, rejections: dict[str, int]
) -> None:
    plan = schedule(nodes, work)
    assert plan.placements == ()
    assert plan.pending == (Pending(task_id=work[0].task_id, reason=reason, rejections=rejections),)


def test_scalars_never_overcommitted() -> None:
    gpu_node = NodeInfo(id="g", capacity=Resources(cpu_millis=1000, scalars={"gpu": 2}))
    work = [
        TaskRequest(task_id=f"ml.{i}", service="ml", resources=Resources(scalars={"gpu": 1}))
        for i in range(3)
    ]
    plan = schedule([gpu_node, node("cpu-only")], work)
    assert [p.node_id for p in plan.placements] == ["g", "g"]
    assert plan.pending[0].rejections == {"insufficient gpu": 2}


def test_plan_types() -> None:
    plan = schedule([node("a")], tasks("web", 1))
    assert plan.placements == (Placement(task_id="web.1", node_id="a", ports=()),)


def test_bad_dynamic_range_rejected() -> None:
    with pytest.raises(ValueError, match="dynamic port range"):
        schedule([node("a")], [], dynamic_ports=(40000, 30000))


def test_spread_across_zones_evenly() -> None:
    nodes = [
        node("a1", labels={"zone": "a"}),
        node("a2", labels={"zone": "a"}),
        node("b1", labels={"zone": "b"}),
    ]
    plan = schedule(nodes, tasks("web", 6, cpu=500, memory=GIB // 2, spread=("zone",)))
    assert per_node(plan) == {"a1": 2, "a2": 1, "b1": 3} or per_node(plan) == {"a1": 1, "a2": 2, "b1": 3}


def test_spread_counts_existing_replicas_and_unlabelled_domain() -> None:
    nodes = [
        node("a1", labels={"zone": "a"}, services={"web": 2}),
        node("b1", labels={"zone": "b"}),
        node("x"),
    ]
    plan = schedule(nodes, tasks("web", 4, spread=("zone",)))
    assert per_node(plan) == {"b1": 2, "x": 2}


def test_spread_ranks_below_feasibility() -> None:
    nodes = [node("a1", labels={"zone": "a"}), node("b1", labels={"zone": "b"}, cpu=500)]
    plan = schedule(nodes, tasks("web", 4, cpu=500, spread=("zone",)))
    assert per_node(plan) == {"a1": 3, "b1": 1}


def test_max_per_node_counts_placements_of_this_call() -> None:
    nodes = [node("a", services={"web": 1}), node("b"), node("c")]
    plan = schedule(nodes, tasks("web", 6, max_per_node=2))
    assert per_node(plan) == {"a": 1, "b": 2, "c": 2}
    assert plan.pending == (
        Pending(
            task_id="web.6",
            reason="0/3 nodes available: 3 at max 2 replica(s) of web per node",
            rejections={"at max 2 replica(s) of web per node": 3},
        ),
    )


def test_max_per_node_of_one_service_does_not_block_another() -> None:
    work = tasks("web", 2, max_per_node=1) + tasks("db", 1, max_per_node=1)
    plan = schedule([node("a")], work)
    assert [p.task_id for p in plan.placements] == ["web.1", "db.1"]
    assert [p.task_id for p in plan.pending] == ["web.2"]


STRATEGY_CASES = [
    ("binpack-fills-busy-node", Strategy.BINPACK, {"busy": 2}),
    ("spread-fills-empty-node-first", Strategy.SPREAD, {"empty": 2}),
]


@pytest.mark.parametrize(
    ("strategy", "expected"), [c[1:] for c in STRATEGY_CASES], ids=[c[0] for c in STRATEGY_CASES]
)
def test_strategy(strategy: Strategy, expected: dict[str, int]) -> None:
    nodes = [node("empty"), node("busy", used_cpu=2000, used_memory=2 * GIB, services={"db": 1})]
    plan = schedule(nodes, tasks("web", 2, cpu=500, memory=GIB // 2, strategy=strategy))
    assert per_node(plan) == expected


def test_spread_strategy_balances_load() -> None:
    nodes = [node("a", used_cpu=1000, used_memory=GIB, services={"db": 1}), node("b"), node("c")]
    plan = schedule(nodes, tasks("web", 5, cpu=1000, memory=GIB, strategy=Strategy.SPREAD))
    assert per_node(plan) == {"a": 1, "b": 2, "c": 2}


def test_plan_does_not_depend_on_task_ids() -> None:
    nodes = [node(f"n{i}") for i in range(7)]
    work = tasks("web", 9) + tasks("db", 5, spread=("zone",), strategy=Strategy.SPREAD)
    renamed = [dataclasses.replace(t, task_id=f"other-{t.task_id}") for t in work]
    first = [p.node_id for p in schedule(nodes, work, seed=2).placements]
    second = [p.node_id for p in schedule(nodes, renamed, seed=2).placements]
    assert first == second


EXPLAIN_NODES = [
    node("down", ready=False),
    node("dev", labels={"zone": "c"}),
    node("full", labels={"zone": "a"}, services={"web": 1}),
    node("small", labels={"zone": "a"}, cpu=100),
    node("busy", labels={"zone": "b"}, used_cpu=2000, used_memory=2 * GIB),
    node("idle", labels={"zone": "a"}),
]
IN_AB = Constraint(key="zone", op="in", values=("a", "b"))

EXPLAIN_CASES = [
    (
        "reasons-scores-ranks",
        tasks("web", 1, cpu=1000, memory=GIB, constraints=(IN_AB,), max_per_node=1)[0],
        [
            NodeVerdict(node_id="down", feasible=False, reason="node down"),
            NodeVerdict(node_id="dev", feasible=False, reason="constraint zone in (a,b) not met"),
            NodeVerdict(node_id="full", feasible=False, reason="at max 1 replica(s) of web per node"),
            NodeVerdict(node_id="small", feasible=False, reason="insufficient cpu"),
            NodeVerdict(node_id="busy", feasible=True, score=0.75, rank=1),
            NodeVerdict(node_id="idle", feasible=True, score=0.25, rank=2),
        ],
    ),
    (
        "spread-strategy",
        tasks("web", 1, cpu=1000, memory=GIB, constraints=(IN_AB,), strategy=Strategy.SPREAD)[0],
        [
            NodeVerdict(node_id="down", feasible=False, reason="node down"),
            NodeVerdict(node_id="dev", feasible=False, reason="constraint zone in (a,b) not met"),
            NodeVerdict(node_id="full", feasible=True, score=0.75, rank=2),
            NodeVerdict(node_id="small", feasible=False, reason="insufficient cpu"),
            NodeVerdict(node_id="busy", feasible=True, score=0.25, rank=3),
            NodeVerdict(node_id="idle", feasible=True, score=0.75, rank=1),
        ],
    ),
    (
        "label-spread-outranks-score",
        tasks("web", 1, cpu=1000, memory=GIB, spread=("zone",))[0],
        [
            NodeVerdict(node_id="down", feasible=False, reason="node down"),
            NodeVerdict(node_id="dev", feasible=True, score=0.25, rank=2),
            NodeVerdict(node_id="full", feasible=True, score=0.25, rank=4),
            NodeVerdict(node_id="small", feasible=False, reason="insufficient cpu"),
            NodeVerdict(node_id="busy", feasible=True, score=0.75, rank=1),
            NodeVerdict(node_id="idle", feasible=True, score=0.25, rank=3),
        ],
    ),
]


@pytest.mark.parametrize(("t", "expected"), [c[1:] for c in EXPLAIN_CASES], ids=[c[0] for c in EXPLAIN_CASES])
def test_explain(t: TaskRequest, expected: list[NodeVerdict]) -> None:
    verdicts = explain(EXPLAIN_NODES, t)
    assert [dataclasses.replace(v, score=round(v.score, 6)) for v in verdicts] == expected
    [placement] = schedule(EXPLAIN_NODES, [t]).placements
    assert placement.node_id == next(v.node_id for v in verdicts if v.rank == 1)


def test_explain_agrees_with_pending_reason() -> None:
    t = tasks("web", 1, cpu=8000, constraints=(IN_AB,))[0]
    verdicts = explain(EXPLAIN_NODES, t)
    assert not any(v.feasible for v in verdicts)
    assert dict(Counter(v.reason for v in verdicts)) == schedule(EXPLAIN_NODES, [t]).pending[0].rejections


def test_explain_no_nodes() -> None:
    assert explain([], tasks("web", 1)[0]) == ()
