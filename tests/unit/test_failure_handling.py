"""Pure pieces of failure handling: node deadlines on a fake clock, and which tasks move."""

from __future__ import annotations

import pytest

from berth.controller.nodes import Liveness
from berth.controller.reconciler import plan_replacements
from berth.proto.berth.v1 import types_pb2 as pb


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_from_the_last_message() -> None:
    clock = FakeClock()
    live = Liveness(deadline=4.0, clock=clock)
    live.fresh(["a", "b"])
    clock.now += 3.0
    live.seen("a")
    clock.now += 1.5
    assert live.scan(["a", "b"])[0] == ["b"]
    clock.now += 3.0
    assert live.scan(["a", "b"])[0] == ["a", "b"]


def test_a_scan_says_until_when_no_other_node_can_expire() -> None:
    """The controller skips scanning every node until the least recently heard one could pass
    its deadline: the scan must name that moment, and the check must follow the deadline."""
    clock = FakeClock()
    live = Liveness(deadline=4.0, clock=clock, max_heartbeats_per_second=10)
    live.fresh(["a", "b", "c"])
    clock.now += 1.0
    live.seen("a")
    clock.now += 3.5  # b and c silent 4.5 s, a 3.5 s
    expired, heard_since = live.scan(["a", "b"])
    assert (expired, heard_since) == (["b"], 101.0)
    assert live.none_silent_since(heard_since)
    clock.now += 0.5  # a exactly at its deadline: not past it yet
    assert live.none_silent_since(heard_since)
    clock.now += 0.01
    assert not live.none_silent_since(heard_since)
    assert live.scan(["a"])[0] == ["a"]
    live.scale_to(30)  # a longer deadline moves the moment later
    assert live.none_silent_since(heard_since)


def test_a_scan_of_no_node_or_unknown_nodes_names_now() -> None:
    clock = FakeClock()
    live = Liveness(deadline=4.0, clock=clock)
    assert live.scan([]) == ([], 100.0)
    assert live.scan(["new"]) == ([], 100.0)  # an unknown node gets a fresh start
    clock.now += 4.5
    assert live.scan(["new"]) == (["new"], 104.5)


def test_fresh_start_judges_no_node_early() -> None:
    clock = FakeClock()
    live = Liveness(deadline=4.0, clock=clock)
    live.seen("a")
    clock.now += 60  # e.g. the controller was down for a minute
    live.fresh(["a"])
    assert live.scan(["a"])[0] == []
    assert live.silent_for("unknown") == 0.0


def test_timing_stretches_with_the_node_count_and_never_shrinks() -> None:
    live = Liveness(deadline=4.0, clock=FakeClock(), max_heartbeats_per_second=1000)
    assert not live.scale_to(800)
    assert (live.interval, live.deadline) == (1.0, 4.0)
    assert live.scale_to(5000)
    assert (live.interval, live.deadline) == (5.0, 20.0)
    assert not live.scale_to(2000)  # an agent told 5 s must not be judged by a 4 s deadline
    assert (live.interval, live.deadline) == (5.0, 20.0)


def test_a_stretched_deadline_applies_to_silence() -> None:
    clock = FakeClock()
    live = Liveness(deadline=4.0, clock=clock, max_heartbeats_per_second=10)
    live.fresh(["a"])
    live.scale_to(30)  # 3 s interval, 12 s deadline
    clock.now += 10.0
    assert live.scan(["a"])[0] == []
    clock.now += 2.5
    assert live.scan(["a"])[0] == ["a"]


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_heartbeats_per_second"):
        Liveness(max_heartbeats_per_second=0)


def node(node_id: str, *, down: bool = False, drain: bool = False) -> pb.Node:
    return pb.Node(
        id=node_id,
        name=node_id,
        state=pb.NODE_STATE_DOWN if down else pb.NODE_STATE_READY,
        availability=pb.NODE_AVAILABILITY_DRAIN if drain else pb.NODE_AVAILABILITY_ACTIVE,
    )


def service(name: str, at_most_one: bool = False, generation: int = 0) -> pb.Service:
    mode = pb.ON_DISCONNECT_STOP if at_most_one else pb.ON_DISCONNECT_KEEP
    spec = pb.ServiceSpec(name=name, replicas=1, on_disconnect=mode)
    return pb.Service(spec=spec, generation=generation)


CASES = [
    # id, node, at-most-one, updated, silent seconds, expect replacement, expect retire, stop first
    ("ready-node", node("n"), False, False, 0.0, False, False, False),
    ("down-node", node("n", down=True), False, False, 4.1, True, False, False),
    ("down-at-most-one-inside-margin", node("n", down=True), True, False, 5.0, False, False, False),
    ("down-at-most-one-after-margin", node("n", down=True), True, False, 6.5, True, False, False),
    ("draining-node", node("n", drain=True), False, False, 0.0, True, True, False),
    ("down-and-draining", node("n", down=True, drain=True), False, False, 4.5, True, False, False),
    # at-most-one on a node that is up moves stop first: two copies must never run at once
    ("draining-at-most-one", node("n", drain=True), True, False, 0.0, True, False, True),
    ("updated-at-most-one", node("n"), True, True, 0.0, True, False, True),
    ("updated-at-most-one-down-inside-margin", node("n", down=True), True, True, 5.0, False, False, False),
    ("updated-at-most-one-down-after-margin", node("n", down=True), True, True, 6.5, True, False, False),
    # any other update is done by the reconciler, not here
    ("updated-keep", node("n"), False, True, 0.0, False, False, False),
]


@pytest.mark.parametrize(
    ("n", "at_most_one", "updated", "silent", "replaced", "retire", "stop_first"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan_replacements(
    n: pb.Node,
    at_most_one: bool,
    updated: bool,
    silent: float,
    replaced: bool,
    retire: bool,
    stop_first: bool,
) -> None:
    task = pb.Task(id="s.1.x", service="s", slot=1, node_id="n", spec_generation=1)
    out = plan_replacements(
        tasks={"k": task},
        nodes={"n": n},
        services={"s": service("s", at_most_one, generation=2 if updated else 1)},
        silent_for=lambda _: silent,
        deadline=4.0,
        margin=2.0,
    )
    assert bool(out) == replaced
    if out:
        assert out[0].retire == retire and out[0].old.id == "s.1.x"
        assert out[0].stop_first == stop_first


def test_unplaced_and_orphaned_tasks_are_not_replacements() -> None:
    tasks = {
        "a": pb.Task(id="s.1.a", service="s", slot=1),
        "b": pb.Task(id="gone.1.b", service="gone", node_id="n"),
    }
    out = plan_replacements(
        tasks=tasks,
        nodes={"n": node("n", down=True)},
        services={"s": service("s")},
        silent_for=lambda _: 10.0,
        deadline=4.0,
        margin=2.0,
    )
    assert out == []


def constrained(*constraints: pb.Constraint) -> pb.Task:
    spec = pb.ServiceSpec(name="s", replicas=1, constraints=list(constraints))
    return pb.Task(id="s.1.x", service="s", slot=1, node_id="n", spec=spec, spec_generation=1)


@pytest.mark.parametrize(
    ("constraint", "labels", "broken"),
    [
        (pb.Constraint(key="zone", op="==", value="eu"), {"zone": "eu"}, False),
        (pb.Constraint(key="zone", op="==", value="eu"), {"zone": "us"}, True),
        (pb.Constraint(key="zone", op="==", value="eu"), {}, True),
        (pb.Constraint(key="zone", op="!=", value="eu"), {"zone": "eu"}, True),
        (pb.Constraint(key="zone", op="!=", value="eu"), {}, False),
        (pb.Constraint(key="zone", op="in", values=["a", "b"]), {"zone": "b"}, False),
        (pb.Constraint(key="zone", op="in", values=["a", "b"]), {"zone": "c"}, True),
        (pb.Constraint(key="zone", op="in", values=["a", "b"]), {}, True),
    ],
    ids=["eq-met", "eq-other", "eq-missing", "ne-broken", "ne-missing", "in-met", "in-other", "in-missing"],
)
def test_a_task_on_a_node_that_no_longer_meets_its_constraints_is_moved(
    constraint: pb.Constraint, labels: dict[str, str], broken: bool
) -> None:
    """A node's labels changed when its agent registered again: its tasks whose constraints no
    longer hold move, replacement first, as from a draining node (Swarm does the same)."""
    n = node("n")
    n.labels.update(labels)
    out = plan_replacements(
        tasks={"k": constrained(constraint)},
        nodes={"n": n},
        services={"s": service("s")},
        silent_for=lambda _: 0.0,
        deadline=4.0,
        margin=2.0,
    )
    assert bool(out) == broken
    if out:
        assert out[0].retire
        assert out[0].reason.startswith("node n no longer meets constraint zone")


def test_an_at_most_one_task_moves_off_a_relabelled_node_stop_first() -> None:
    """A replacement-first move would run two copies for a moment, which ``on_disconnect: stop``
    promises never to do: such a task moves stop first."""
    n = node("n")
    n.labels["zone"] = "us"
    out = plan_replacements(
        tasks={"k": constrained(pb.Constraint(key="zone", op="==", value="eu"))},
        nodes={"n": n},
        services={"s": service("s", at_most_one=True, generation=1)},
        silent_for=lambda _: 0.0,
        deadline=4.0,
        margin=2.0,
    )
    assert [(r.retire, r.stop_first) for r in out] == [(False, True)]
    assert out[0].reason.startswith("node n no longer meets constraint zone")
