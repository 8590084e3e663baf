"""Scheduler invariants over generated clusters and task lists."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from unittest import mock

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
    core,
    explain,
    schedule,
)
from berth.controller.scheduler.model import NodeTable

DYNAMIC = (30000, 30004)
SCALARS = ("gpu", "ssd")
AVAILABILITIES = (*[Availability.ACTIVE] * 8, Availability.PAUSE, Availability.DRAIN)
LABELS = {"env": ("prod", "dev"), "zone": ("a", "b")}

small = st.integers(min_value=0, max_value=4)
"""Generated nodes are mostly ready, active and roomy, so that most generated tasks get placed."""


@st.composite
def resources(draw: st.DrawFn, *, scale: int, most: int, scalar_chance: float) -> Resources:
    amounts = st.integers(min_value=0, max_value=most)
    scalars = {}
    if draw(st.floats(min_value=0, max_value=1)) < scalar_chance:
        scalars = draw(
            st.dictionaries(st.sampled_from(SCALARS), st.integers(min_value=0, max_value=3), max_size=2)
        )
    return Resources(
        cpu_millis=draw(amounts) * scale, memory_bytes=draw(amounts) * scale * 1024, scalars=scalars
    )


@st.composite
def nodes(draw: st.DrawFn) -> NodeInfo:
    capacity = draw(resources(scale=1000, most=8, scalar_chance=0.7))
    labels = draw(
        st.dictionaries(st.sampled_from(sorted(LABELS)), st.sampled_from(("prod", "dev", "a", "b")))
    )
    used_ports = draw(
        st.frozensets(
            st.tuples(st.sampled_from(("tcp", "udp")), st.sampled_from((80, 443, *range(*DYNAMIC))))
        )
    )
    return NodeInfo(
        id=draw(st.text("abcdef0123456789", min_size=4, max_size=4)),
        capacity=capacity,
        allocated=draw(resources(scale=500, most=4, scalar_chance=0.3)),
        labels=labels,
        ready=draw(st.integers(min_value=0, max_value=5)) > 0,
        availability=draw(st.sampled_from(AVAILABILITIES)),
        used_ports=used_ports,
        service_counts=draw(st.dictionaries(st.sampled_from(("web", "db")), small, max_size=2)),
    )


ports = st.builds(
    PortRequest,
    container_port=st.sampled_from((80, 53)),
    host_port=st.sampled_from((0, 0, 80, 443, 30001)),
    protocol=st.sampled_from(("tcp", "udp", "")),
)
label_values = st.sampled_from(("prod", "dev", "a", "b"))
constraints = st.builds(
    Constraint,
    key=st.sampled_from(sorted(LABELS)),
    op=st.sampled_from(("==", "!=", "in")),
    value=label_values,
    values=st.lists(label_values, max_size=3).map(tuple),
)


service_settings = st.tuples(
    st.sampled_from((0, 0, 1, 2)),
    st.sampled_from(((), (), ("zone",), ("env", "zone"))),
    st.sampled_from(Strategy),
)
"""What a service spec sets for all its tasks: max_per_node, spread and strategy."""


@st.composite
def task_lists(draw: st.DrawFn) -> list[TaskRequest]:
    count = draw(st.integers(min_value=0, max_value=12))
    settings = {service: draw(service_settings) for service in ("web", "db")}
    work = []
    for i in range(count):
        service = draw(st.sampled_from(("web", "db")))
        max_per_node, spread, strategy = settings[service]
        work.append(
            TaskRequest(
                task_id=f"t{i}",
                service=service,
                slot=i,
                resources=draw(resources(scale=500, most=4, scalar_chance=0.2)),
                ports=tuple(draw(st.lists(ports, max_size=3))),
                constraints=tuple(draw(st.lists(constraints, max_size=2))),
                max_per_node=max_per_node,
                spread=spread,
                strategy=strategy,
            )
        )
    return work


clusters = st.lists(nodes(), min_size=1, max_size=8, unique_by=lambda n: n.id)


def run(cluster: list[NodeInfo], work: list[TaskRequest], seed: int = 0) -> Plan:
    return schedule(cluster, work, dynamic_ports=DYNAMIC, seed=seed)


def as_vector(r: Resources) -> dict[str, int]:
    return {"cpu": r.cpu_millis, "memory": r.memory_bytes, **{f"s:{k}": v for k, v in r.scalars.items()}}


@settings(max_examples=250, deadline=None)
@given(clusters, task_lists())
def test_plan_invariants(cluster: list[NodeInfo], work: list[TaskRequest]) -> None:
    plan = run(cluster, work)
    check_every_task_answered_once(cluster, work, plan)
    check_never_overcommits(cluster, work, plan)
    check_only_ready_active_nodes_meeting_constraints(cluster, work, plan)
    check_host_ports_never_shared(cluster, work, plan)
    check_never_exceeds_max_per_node(cluster, work, plan)


@settings(max_examples=60, deadline=None)
@given(clusters, task_lists(), st.integers(min_value=0, max_value=3))
def test_deterministic(cluster: list[NodeInfo], work: list[TaskRequest], seed: int) -> None:
    assert run(cluster, work, seed) == run(cluster, work, seed)


@settings(max_examples=40, deadline=None)
@given(clusters, task_lists(), st.integers(min_value=0, max_value=3))
def test_task_ids_do_not_matter(cluster: list[NodeInfo], work: list[TaskRequest], seed: int) -> None:
    renamed = [dataclasses.replace(t, task_id=f"x{t.task_id}") for t in work]
    first, second = run(cluster, work, seed), run(cluster, renamed, seed)
    assert [(p.node_id, p.ports) for p in first.placements] == [
        (p.node_id, p.ports) for p in second.placements
    ]
    assert [p.reason for p in first.pending] == [p.reason for p in second.pending]


@settings(max_examples=60, deadline=None)
@given(clusters, task_lists().filter(bool), st.integers(min_value=0, max_value=3))
def test_explain_agrees_with_schedule(cluster: list[NodeInfo], work: list[TaskRequest], seed: int) -> None:
    task = work[0]
    verdicts = explain(cluster, task, dynamic_ports=DYNAMIC, seed=seed)
    plan = run(cluster, [task], seed)
    assert [v.node_id for v in verdicts] == [n.id for n in cluster]
    feasible = [v for v in verdicts if v.feasible]
    assert sorted(v.rank for v in feasible) == list(range(1, len(feasible) + 1))
    assert all(v.reason == "" for v in feasible)
    if plan.placements:
        assert plan.placements[0].node_id == next(v.node_id for v in feasible if v.rank == 1)
    else:
        assert not feasible
        assert dict(Counter(v.reason for v in verdicts)) == plan.pending[0].rejections


def check_never_overcommits(cluster: list[NodeInfo], work: list[TaskRequest], plan: Plan) -> None:
    by_id = {n.id: n for n in cluster}
    requests = {t.task_id: t.resources for t in work}
    added: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for placement in plan.placements:
        for dim, amount in as_vector(requests[placement.task_id]).items():
            added[placement.node_id][dim] += amount
    for node_id, dims in added.items():
        n = by_id[node_id]
        capacity, allocated = as_vector(n.capacity), as_vector(n.allocated)
        for dim, amount in dims.items():
            if amount > 0:
                assert allocated.get(dim, 0) + amount <= capacity.get(dim, 0), (node_id, dim)


def check_only_ready_active_nodes_meeting_constraints(
    cluster: list[NodeInfo], work: list[TaskRequest], plan: Plan
) -> None:
    by_id = {n.id: n for n in cluster}
    by_task = {t.task_id: t for t in work}
    for placement in plan.placements:
        n = by_id[placement.node_id]
        assert n.ready
        assert n.availability is Availability.ACTIVE
        for c in by_task[placement.task_id].constraints:
            label = n.labels.get(c.key)
            if c.op == "in":
                assert label is not None and label in c.values
            else:
                assert (label == c.value) == (c.op == "==")


def check_never_exceeds_max_per_node(cluster: list[NodeInfo], work: list[TaskRequest], plan: Plan) -> None:
    counts = {(n.id, service): count for n in cluster for service, count in n.service_counts.items()}
    by_task = {t.task_id: t for t in work}
    for placement in plan.placements:  # in task order
        task = by_task[placement.task_id]
        key = (placement.node_id, task.service)
        if task.max_per_node:
            assert counts.get(key, 0) < task.max_per_node
        counts[key] = counts.get(key, 0) + 1


def check_host_ports_never_shared(cluster: list[NodeInfo], work: list[TaskRequest], plan: Plan) -> None:
    taken = {n.id: set(n.used_ports) for n in cluster}
    by_task = {t.task_id: t for t in work}
    for placement in plan.placements:
        requested = by_task[placement.task_id].ports
        assert len(placement.ports) == len(requested)
        for (container, host, protocol), request in zip(placement.ports, requested, strict=True):
            assert container == request.container_port
            assert host == request.host_port or (request.host_port == 0 and DYNAMIC[0] <= host <= DYNAMIC[1])
            assert (protocol, host) not in taken[placement.node_id]
            taken[placement.node_id].add((protocol, host))


def check_every_task_answered_once(cluster: list[NodeInfo], work: list[TaskRequest], plan: Plan) -> None:
    answered = [p.task_id for p in plan.placements] + [p.task_id for p in plan.pending]
    assert sorted(answered) == sorted(t.task_id for t in work)
    for pending in plan.pending:
        assert sum(pending.rejections.values()) == len(cluster)
        assert pending.reason.startswith(f"0/{len(cluster)} nodes available: ")


def mixed_cluster(rnd: random.Random) -> tuple[list[NodeInfo], list[TaskRequest]]:
    """A busier cluster than ``clusters``: 5-40 nodes, some already holding work (of a service
    the tasks also belong to), some not ready, paused or draining; several services of identical
    replicas, sometimes shuffled. Big enough for the batch steps (freeing hosts, refill) to act."""
    nodes = []
    for i in range(rnd.randint(5, 40)):
        busy = rnd.random() < 0.3
        nodes.append(
            NodeInfo(
                id=f"n{i:02d}",
                capacity=Resources(
                    cpu_millis=rnd.choice([2000, 4000, 8000]),
                    memory_bytes=rnd.choice([4, 8, 16]) << 30,
                    scalars=rnd.choice([{}, {"gpu": 2}]),
                ),
                allocated=Resources(cpu_millis=rnd.randint(0, 1500), memory_bytes=rnd.randint(0, 2) << 30)
                if busy
                else Resources(),
                labels={"zone": rnd.choice("abc")},
                ready=rnd.random() > 0.05,
                availability=rnd.choice(
                    [Availability.ACTIVE] * 10 + [Availability.PAUSE, Availability.DRAIN]
                ),
                service_counts={"s0": 1} if busy and rnd.random() < 0.5 else {},
            )
        )
    work = []
    for s in range(rnd.randint(2, 12)):
        resources = Resources(
            cpu_millis=rnd.choice([100, 250, 500, 1000, 1500, 3000]),
            memory_bytes=rnd.choice([128, 512, 1024, 2048, 6000]) << 20,
            scalars=rnd.choice([{}] * 4 + [{"gpu": 1}]),
        )
        constraint = rnd.choice(
            [
                (),
                (),
                (Constraint(key="zone", op="!=", value="c"),),
                (Constraint(key="zone", op="in", values=("a", "b")),),
            ]
        )
        max_per_node = rnd.choice([0, 0, 1, 3])
        for r in range(rnd.choice([1, 2, 3, 5, 8])):
            work.append(
                TaskRequest(
                    task_id=f"s{s}.{r}",
                    service=f"s{s}",
                    slot=r,
                    resources=resources,
                    constraints=constraint,
                    max_per_node=max_per_node,
                )
            )
    if rnd.random() < 0.3:
        rnd.shuffle(work)
    return nodes, work


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False))
def test_plan_invariants_on_busy_mixed_clusters(rnd: random.Random) -> None:
    """Every batch step included: no step may move a task onto a node that is not ready and
    active, or break a limit, whatever the node already holds."""
    cluster, work = mixed_cluster(rnd)
    plan = run(cluster, work)
    check_every_task_answered_once(cluster, work, plan)
    check_never_overcommits(cluster, work, plan)
    check_only_ready_active_nodes_meeting_constraints(cluster, work, plan)
    check_never_exceeds_max_per_node(cluster, work, plan)


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False))
def test_reusing_a_pending_answer_changes_no_plan(rnd: random.Random) -> None:
    """A task shaped like one found unplaceable reuses that answer only while nothing changed
    since (placing or freeing room changes the table's version): the plan must be the one the
    scheduler makes when it asks every time."""
    cluster, work = mixed_cluster(rnd)
    with mock.patch.object(core._Run, "_known_unplaceable", lambda self, task: None):
        asking_every_time = run(cluster, work)
    assert run(cluster, work) == asking_every_time


@settings(max_examples=200, deadline=None)
@given(clusters, st.lists(constraints, min_size=1, max_size=3))
def test_a_constraint_holds_on_a_node_exactly_where_its_mask_says(
    cluster: list[NodeInfo], wanted: list[Constraint]
) -> None:
    """``Constraint.holds`` (moving running tasks off a relabelled node) and the scheduler's
    masks (placing) must agree, or a task could be placed and then moved again at once."""
    table = NodeTable(cluster, (), seed=0)
    for constraint in wanted:
        mask = table.constraint_mask(constraint)
        assert [constraint.holds(n.labels) for n in cluster] == mask.tolist()
