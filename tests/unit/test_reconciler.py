"""The reconciler's pure computation: slots in line with replica counts and generations."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.controller.reconciler import new_task, reconcile
from berth.proto.berth.v1 import types_pb2 as pb


def service(name: str, replicas: int, generation: int = 1) -> pb.Service:
    return pb.Service(spec=pb.ServiceSpec(name=name, image="i", replicas=replicas), generation=generation)


def key(service: str, slot: int) -> str:
    return f"/t/{service}/{slot}"


def run(services: dict[str, pb.Service], tasks: dict[str, pb.Task], nodes: set[str] | None = None):  # type: ignore[no-untyped-def]
    counter = itertools.count(1)
    return reconcile(
        services=services,
        tasks=tasks,
        node_ids=nodes or set(),
        task_key=key,
        new_id=lambda s, n: f"{s}.{n}.{next(counter)}",
        now=100.0,
    )


def apply(tasks: dict[str, pb.Task], result) -> dict[str, pb.Task]:  # type: ignore[no-untyped-def]
    out = dict(tasks)
    for k in result.delete:
        del out[k]
    for k, t in result.put:
        out[k] = t
    return out


CASES = [
    ("create-all", 3, 0, 3, 0),
    ("nothing-to-do", 3, 3, 0, 0),
    ("scale-up", 5, 3, 2, 0),
    ("scale-down", 1, 3, 0, 2),
    ("scale-to-zero", 0, 3, 0, 3),
]


@pytest.mark.parametrize(
    ("replicas", "existing", "puts", "deletes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_slots_follow_replicas(replicas: int, existing: int, puts: int, deletes: int) -> None:
    svc = service("web", replicas)
    tasks = {key("web", i): new_task(svc, i, task_id=f"web.{i}.x", now=1) for i in range(1, existing + 1)}
    result = run({"web": svc}, tasks)
    assert (len(result.put), len(result.delete)) == (puts, deletes)
    after = apply(tasks, result)
    assert sorted(t.slot for t in after.values()) == list(range(1, replicas + 1))


def test_new_generation_replaces_every_task() -> None:
    old = service("web", 2, generation=1)
    tasks = {key("web", i): new_task(old, i, task_id=f"web.{i}.old", now=1) for i in (1, 2)}
    result = run({"web": service("web", 2, generation=2)}, tasks)
    assert {t.spec_generation for _, t in result.put} == {2}
    assert all(not t.id.endswith("old") for _, t in result.put)


def test_an_at_most_one_update_leaves_placed_tasks_to_the_stop_first_move() -> None:
    """An at-most-one service's old task that runs on a node is not replaced here (the old copy
    would be stopped in the same pass that starts the new one): the scheduling step moves it stop
    first. An old task with no node, or on a node that is gone, has no copy to wait for."""
    old = service("db", 3, generation=1)
    old.spec.on_disconnect = pb.ON_DISCONNECT_STOP
    new = service("db", 3, generation=2)
    new.spec.on_disconnect = pb.ON_DISCONNECT_STOP
    tasks = {key("db", i): new_task(old, i, task_id=f"db.{i}.old", now=1) for i in (1, 2, 3)}
    tasks[key("db", 1)].node_id = "n1"  # runs on a node that is there
    tasks[key("db", 2)].node_id = "gone"  # its node was removed
    result = run({"db": new}, tasks, nodes={"n1"})
    assert sorted(k for k, _ in result.put) == [key("db", 2), key("db", 3)]
    assert {t.spec_generation for _, t in result.put} == {2}


def test_removed_service_deletes_its_tasks() -> None:
    svc = service("web", 2)
    tasks = {key("web", i): new_task(svc, i, task_id=f"web.{i}.x", now=1) for i in (1, 2)}
    result = run({}, tasks)
    assert sorted(result.delete) == [key("web", 1), key("web", 2)]


def test_task_on_vanished_node_goes_back_to_pending() -> None:
    svc = service("web", 1)
    task = new_task(svc, 1, task_id="web.1.x", now=1)
    task.node_id = "gone"
    task.ports.add(container_port=80, host_port=30000)
    result = run({"web": svc}, {key("web", 1): task}, nodes={"n1"})
    [(_, reset)] = result.put
    assert reset.node_id == "" and not reset.ports and reset.id == "web.1.x"


@given(
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 8)),
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 8)),
)
def test_never_more_than_count_and_idempotent(wanted: dict[str, int], existing: dict[str, int]) -> None:
    services = {n: service(n, r) for n, r in wanted.items()}
    tasks = {}
    for n, count in existing.items():
        svc = services.get(n, service(n, count))
        for i in range(1, count + 1):
            tasks[key(n, i)] = new_task(svc, i, task_id=f"{n}.{i}.x", now=1)
    after = apply(tasks, run(services, tasks))
    for n, r in wanted.items():
        assert sorted(t.slot for t in after.values() if t.service == n) == list(range(1, r + 1))
    assert all(t.service in wanted for t in after.values())
    assert run(services, after).empty
