"""``preview`` (what ``berth plan`` shows) against ``scheduling_step`` (what applying does) when
tasks must move off a draining or down node: the plan shows where each slot ends up."""

from __future__ import annotations

import pytest

from berth.controller.planning import Snapshot, preview, scheduling_step
from berth.controller.store import Keys
from berth.proto.berth.v1 import types_pb2 as pb

KEYS = Keys()
NOW = 1000.0
GiB = 1 << 30


def node(node_id: str, *, cpus: int = 2, drain: bool = False, down: bool = False) -> pb.Node:
    return pb.Node(
        id=node_id,
        name=f"host-{node_id}",
        capacity=pb.Resources(cpu_millis=cpus * 1000, memory_bytes=8 * GiB),
        availability=pb.NODE_AVAILABILITY_DRAIN if drain else pb.NODE_AVAILABILITY_ACTIVE,
        state=pb.NODE_STATE_DOWN if down else pb.NODE_STATE_READY,
    )


def cluster(nodes: list[pb.Node], placed_on: list[str]) -> tuple[Snapshot, pb.ServiceSpec]:
    """A service ``web`` of one-core replicas, slot i+1 placed on ``placed_on[i]``."""
    spec = pb.ServiceSpec(
        name="web", image="nginx:1", replicas=len(placed_on), resources=pb.Resources(cpu_millis=1000)
    )
    service = pb.Service(spec=spec, generation=1)
    tasks = {
        KEYS.task("web", slot): pb.Task(
            id=f"web.{slot}.old",
            service="web",
            slot=slot,
            spec=spec,
            spec_generation=1,
            desired_state=pb.TASK_STATE_RUNNING,
            node_id=node_id,
        )
        for slot, node_id in enumerate(placed_on, start=1)
    }
    return Snapshot(services={"web": service}, tasks=tasks, nodes={n.id: n for n in nodes}), spec


def plan_of(snap: Snapshot, spec: pb.ServiceSpec) -> tuple[dict[int, tuple[str, bool]], list[str], list[int]]:
    response = preview(snap, [spec], now=NOW, task_key=KEYS.task, silent_for=lambda _: 3600.0)
    placements = {p.slot: (p.node_id, p.existing) for p in response.placements}
    return placements, list(response.removed), [w.slot for w in response.pending]


def applied(snap: Snapshot) -> dict[int, str]:
    """Where each slot goes when the same step is applied."""
    step = scheduling_step(
        snap,
        silent_for=lambda _: 3600.0,
        deadline=4.0,
        margin=2.0,
        now=NOW,
        new_id=lambda s, n: f"{s}.{n}.new",
    )
    assert step.plan is not None
    out = {t.slot: t.node_id for t in snap.tasks.values()}
    for p in step.plan.placements:
        out[step.replacements[p.task_id][1].slot] = p.node_id
    return out


@pytest.mark.parametrize("fault", ["drain", "down"])
def test_a_slot_leaving_a_node_is_shown_where_its_replacement_goes(fault: str) -> None:
    nodes = [node("a", drain=fault == "drain", down=fault == "down"), node("b"), node("c")]
    snap, spec = cluster(nodes, ["a", "b", "c"])
    placements, removed, pending = plan_of(snap, spec)
    target = applied(snap)[1]
    assert target in ("b", "c")
    assert placements == {1: (target, False), 2: ("b", True), 3: ("c", True)}
    assert removed == ["web.1.old"]  # stopped once its replacement runs
    assert pending == []


def test_a_replacement_that_fits_nowhere_leaves_the_slot_in_place_and_says_why() -> None:
    nodes = [node("a", drain=True), node("b", cpus=1), node("c", cpus=1)]
    snap, spec = cluster(nodes, ["a", "b", "c"])
    placements, removed, pending = plan_of(snap, spec)
    assert placements == {1: ("a", True), 2: ("b", True), 3: ("c", True)}  # it keeps running there
    assert removed == []
    assert pending == [1]
