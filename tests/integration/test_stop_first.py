"""At-most-one services (``on_disconnect: stop``) move stop first, on real etcd: on an update or a
drain the old task is told to stop (desired state SHUTDOWN) and its slot's new task is sent to no
agent until the old one's agent has reported it stopped, through controller restarts and agent
reconnects (every full assignment asks again), or until its node has been down for the deadline
and the margin. A drain stops nothing that no other node could take over."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from berth.controller.agents import Session
from berth.controller.cluster import Cluster
from berth.proto.berth.v1 import agent_pb2
from berth.proto.berth.v1 import types_pb2 as pb
from tests.integration.drivenkit import CAPACITY, FakeClock, driven_cluster, register
from tests.integration.etcd_server import etcd_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd") / "data") as url:
        yield url


def db(image: str = "postgres:16", cpu: int = 500) -> pb.ServiceSpec:
    return pb.ServiceSpec(
        name="db",
        image=image,
        replicas=1,
        on_disconnect=pb.ON_DISCONNECT_STOP,
        resources=pb.Resources(cpu_millis=cpu, memory_bytes=64 << 20),
    )


def sent(session: Session) -> list[pb.Task]:
    """The tasks sent to an agent since the last call (assignments, full or not), in order."""
    out: list[pb.Task] = []
    while not session.outbox.empty():
        message: agent_pb2.ControllerMessage = session.outbox.get_nowait()
        if message.HasField("assignments"):
            out.extend(message.assignments.tasks)
    return out


def started(sessions: dict[str, Session]) -> list[tuple[str, str]]:
    """(node, task id) of every task sent to run (desired RUNNING) since the last call."""
    out = []
    for name, session in sessions.items():
        out += [(name, t.id) for t in sent(session) if t.desired_state == pb.TASK_STATE_RUNNING]
    return out


async def report(cluster: Cluster, session: Session, task_id: str, state: pb.TaskState.ValueType) -> None:
    status = pb.TaskStatus(task_id=task_id, node_id=session.node_id, state=state)
    await cluster.record_statuses(session, [status])
    await cluster._write_statuses(dict(cluster._status_inbox))
    cluster._status_inbox.clear()


async def running_db(
    cluster: Cluster, sessions: dict[str, Session], spec: pb.ServiceSpec | None = None
) -> pb.Task:
    """``spec`` (default ``db()``) created, placed and reported running; its one task."""
    await cluster.create_service(spec or db())
    await cluster.reconcile_once()
    [(node, task_id)] = started(sessions)
    await report(cluster, sessions[node], task_id, pb.TASK_STATE_RUNNING)
    return cluster.state.tasks[cluster.keys.task("db", 1)].value


def test_an_update_stops_the_old_task_before_the_new_one_is_sent_anywhere(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-update/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        await cluster.apply_service(db(image="postgres:17"))
        await cluster.reconcile_once()
        # the old task is sent again, told to stop; nothing new is sent to run
        told = [t for t in sent(sessions[old.node_id]) if t.id == old.id]
        assert [t.desired_state for t in told] == [pb.TASK_STATE_SHUTDOWN]
        assert started(sessions) == []
        slot = cluster.state.tasks[store.keys.task("db", 1)].value
        assert slot.id != old.id and not slot.node_id and slot.spec.image == "postgres:17"
        assert slot.pending_reason == f"waiting for {old.id} to stop first"
        for _ in range(2):  # passes go by: still nothing placed while the old one may run
            await cluster.reconcile_once()
            assert started(sessions) == [] and not cluster.state.tasks[store.keys.task("db", 1)].value.node_id
        await report(cluster, sessions[old.node_id], old.id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        [(node, task_id)] = started(sessions)
        assert task_id == slot.id and cluster.state.retiring == {}
        stored = (await store.load()).tasks[store.keys.task("db", 1)].value
        assert (stored.id, stored.node_id, stored.spec.image) == (slot.id, node, "postgres:17")
        await store.close()

    asyncio.run(go())


def test_an_update_on_a_full_node_waits_for_the_room_the_old_task_frees(etcd: str) -> None:
    """Stop first needs no spare room: the new task takes the old one's place once it stopped."""

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-full/")
        sessions = await register(cluster, "a")
        old_id = (await running_db(cluster, sessions, db(cpu=1500))).id  # of 2000m: no room for two
        await cluster.apply_service(db(image="postgres:17", cpu=1500))
        await cluster.reconcile_once()
        assert started(sessions) == []
        await report(cluster, sessions["a"], old_id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        [(node, task_id)] = started(sessions)
        assert node == "a" and task_id != old_id
        await store.close()

    asyncio.run(go())


def test_a_stop_survives_a_controller_restart_and_a_lost_report(etcd: str) -> None:
    """The controller restarts while the old task stops, and the agent's report of the stop is
    lost with the old stream: the restarted controller asks again in the agent's full assignment,
    and the new task is placed on the answer, never before."""

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-restart/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        await cluster.apply_service(db(image="postgres:17"))
        await cluster.reconcile_once()
        await store.close()

        store, restarted = await driven_cluster(etcd, "/sf-restart/")
        again = {}
        for name in ("a", "b"):
            again[name], assigned = await restarted.register(
                agent_pb2.Register(node_id=name, name=name, capacity=CAPACITY)
            )
            told = [t for t in assigned if t.id == old.id]
            assert [t.desired_state for t in told] == (
                [pb.TASK_STATE_SHUTDOWN] if name == old.node_id else []
            )
        await restarted.reconcile_once()
        assert started(again) == []
        await report(restarted, again[old.node_id], old.id, pb.TASK_STATE_SHUTDOWN)
        await restarted.reconcile_once()
        assert len(started(again)) == 1 and restarted.state.retiring == {}
        await store.close()

    asyncio.run(go())


def test_a_stopping_task_on_a_node_that_goes_down_is_let_go_after_the_margin(etcd: str) -> None:
    async def go() -> None:
        clock = FakeClock()
        store, cluster = await driven_cluster(etcd, "/sf-down/", clock)
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        other = "b" if old.node_id == "a" else "a"
        await cluster.apply_service(db(image="postgres:17"))
        await cluster.reconcile_once()
        # the old task's node falls silent before it reports: its agent's watchdog stops the task
        # by the deadline, cutting short a stop under way (tests/unit/test_agent_stop_first.py);
        # the controller waits out the margin too
        clock.now += 1.0
        cluster.heard(sessions[other])
        clock.now += 3.5
        await cluster.check_liveness()
        assert cluster.state.nodes[old.node_id].value.state == pb.NODE_STATE_DOWN
        await cluster.reconcile_once()
        assert started(sessions) == []
        clock.now += 1.6  # silent 6.1 s: past deadline 4 + margin 2
        cluster.heard(sessions[other])
        await cluster.reconcile_once()
        assert [node for node, _ in started(sessions)] == [other]
        await store.close()

    asyncio.run(go())


def test_a_drain_moves_an_at_most_one_task_stop_first_and_only_if_it_can_go_elsewhere(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-drain/")
        sessions = await register(cluster, "a")
        old = await running_db(cluster, sessions)
        events = cluster.events.subscribe()
        await cluster.set_availability("a", pb.NODE_AVAILABILITY_DRAIN)
        await cluster.reconcile_once()
        # nowhere to go: it keeps running, told nothing, and an event says why
        assert sent(sessions["a"]) == [] and cluster.state.retiring == {}
        kinds = [events.get_nowait().kind for _ in range(events.qsize())]
        assert "task-kept" in kinds
        sessions.update(await register(cluster, "b"))
        sent(sessions["b"])
        await cluster.reconcile_once()
        told = sent(sessions["a"])
        assert [(t.id, t.desired_state) for t in told] == [(old.id, pb.TASK_STATE_SHUTDOWN)]
        assert started(sessions) == []
        await report(cluster, sessions["a"], old.id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        assert [node for node, _ in started(sessions)] == ["b"]
        await store.close()

    asyncio.run(go())


def test_plan_shows_the_update_as_a_stop_and_a_wait(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-plan/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        response = await cluster.plan([db(image="postgres:17")])
        assert list(response.removed) == [old.id]
        assert [(p.service, p.slot, p.reason) for p in response.pending] == [
            ("db", 1, f"waiting for {old.id} to stop first")
        ]
        assert list(response.placements) == []
        await store.close()

    asyncio.run(go())


def test_a_second_update_during_a_stop_waits_too_and_is_written_once(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-twice/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        await cluster.apply_service(db(image="postgres:17"))
        await cluster.reconcile_once()
        await cluster.apply_service(db(image="postgres:18"))
        await cluster.reconcile_once()
        key = store.keys.task("db", 1)
        waiting = cluster.state.tasks[key].value
        assert waiting.spec.image == "postgres:18" and not waiting.node_id
        assert waiting.pending_reason == f"waiting for {old.id} to stop first"
        await cluster.reconcile_once()  # nothing to redo while it waits
        assert cluster.state.tasks[key].value.id == waiting.id
        assert started(sessions) == []
        await report(cluster, sessions[old.node_id], old.id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        assert [task_id for _, task_id in started(sessions)] == [waiting.id]
        assert (await store.load()).tasks[key].value.spec.image == "postgres:18"
        await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("how", ["scale", "remove"])
def test_a_slot_wanted_again_while_its_old_task_stops_waits_for_it(etcd: str, how: str) -> None:
    """Scaled to 0 and back, or removed and created again, before the old copy has stopped: the
    old task is not forgotten while it may run, and the slot's new task waits for it."""

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, f"/sf-again-{how}/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        if how == "scale":
            await cluster.scale_service("db", 0)
            await cluster.reconcile_once()
        else:
            await cluster.remove_service("db")
        told = [t for t in sent(sessions[old.node_id]) if t.id == old.id]
        assert [t.desired_state for t in told] == [pb.TASK_STATE_SHUTDOWN]
        if how == "scale":
            await cluster.scale_service("db", 1)
        else:
            await cluster.create_service(db())
        await cluster.reconcile_once()
        await cluster.reconcile_once()
        assert started(sessions) == []
        waiting = cluster.state.tasks[store.keys.task("db", 1)].value
        assert waiting.pending_reason == f"waiting for {old.id} to stop first"
        await report(cluster, sessions[old.node_id], old.id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        assert [task_id for _, task_id in started(sessions)] == [waiting.id]
        assert cluster.state.retiring == {}
        await store.close()

    asyncio.run(go())


def test_a_stop_reported_from_another_node_does_not_count(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-other/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        other = "b" if old.node_id == "a" else "a"
        await cluster.apply_service(db(image="postgres:17"))
        await cluster.reconcile_once()
        await report(cluster, sessions[other], old.id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        assert started(sessions) == [] and list(cluster.state.retiring) == [old.id]
        await store.close()

    asyncio.run(go())


def test_plan_shows_a_stop_first_drain_as_a_stop_and_a_wait(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-plan-drain/")
        sessions = await register(cluster, "a", "b")
        old = await running_db(cluster, sessions)
        # drained while the loop is stopped: the plan says what the next pass will do
        await cluster.set_availability(old.node_id, pb.NODE_AVAILABILITY_DRAIN)
        response = await cluster.plan([db()])
        assert list(response.removed) == [old.id]
        assert [(p.service, p.slot, p.reason) for p in response.pending] == [
            ("db", 1, f"waiting for {old.id} to stop first")
        ]
        assert list(response.placements) == []
        await cluster.reconcile_once()
        assert started(sessions) == [] and list(cluster.state.retiring) == [old.id]
        await store.close()

    asyncio.run(go())


def test_a_service_made_at_most_one_by_its_update_keeps_the_old_copy_held_through_a_removal(
    etcd: str,
) -> None:
    """The update that turns ``on_disconnect: keep`` into ``stop`` moves the old task stop first;
    its record is marked at-most-one, so removing and re-creating the service before it stopped
    still makes the slot wait (and the agent's watchdog treats it as at-most-one)."""

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/sf-became/")
        sessions = await register(cluster, "a", "b")
        keep = db()
        keep.on_disconnect = pb.ON_DISCONNECT_KEEP
        await cluster.create_service(keep)
        await cluster.reconcile_once()
        [(node, old_id)] = started(sessions)
        await report(cluster, sessions[node], old_id, pb.TASK_STATE_RUNNING)
        await cluster.apply_service(db())  # now at-most-one: a new generation
        await cluster.reconcile_once()
        told = [t for t in sent(sessions[node]) if t.id == old_id]
        assert [(t.desired_state, t.spec.on_disconnect) for t in told] == [
            (pb.TASK_STATE_SHUTDOWN, pb.ON_DISCONNECT_STOP)
        ]
        await cluster.remove_service("db")
        assert list(cluster.state.retiring) == [old_id]
        await cluster.create_service(db())
        await cluster.reconcile_once()
        assert started(sessions) == []
        await report(cluster, sessions[node], old_id, pb.TASK_STATE_SHUTDOWN)
        await cluster.reconcile_once()
        assert len(started(sessions)) == 1
        await store.close()

    asyncio.run(go())
