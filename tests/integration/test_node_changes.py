"""What the controller does when a node changes, on real etcd: it falls silent (judged on a fake
clock: the check skips scanning every node while none can have expired, and must never act late
because of it), or it registers again with other labels."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from berth.controller import planning
from berth.proto.berth.v1 import agent_pb2
from berth.proto.berth.v1 import types_pb2 as pb
from tests.integration.drivenkit import CAPACITY, FakeClock, driven_cluster, register
from tests.integration.etcd_server import etcd_server

pytestmark = pytest.mark.integration
TICK = 0.25  # the controller's liveness tick


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd") / "data") as url:
        yield url


@pytest.fixture
def scheduler_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per run of the scheduler proper (``planning.schedule``)."""
    runs: list[int] = []
    real_schedule = planning.schedule

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(1)
        return real_schedule(*args, **kwargs)

    monkeypatch.setattr(planning, "schedule", counted)
    return runs


def test_a_silent_node_is_declared_down_at_the_first_tick_past_its_deadline(etcd: str) -> None:
    async def go() -> None:
        clock = FakeClock()
        store, cluster = await driven_cluster(etcd, "/liveness/", clock)
        sessions = await register(cluster, "a", "b", "c")

        def state(name: str) -> int:
            return cluster.state.nodes[name].value.state

        async def run_until(end: float, *, heard: set[str]) -> dict[str, float]:
            """Tick to ``end`` (fake seconds); nodes in ``heard`` send a message every second.
            Returns when each node that was up was declared down."""
            down: dict[str, float] = {}
            up = {name for name in sessions if state(name) != pb.NODE_STATE_DOWN}
            while clock.now < end:
                clock.now += TICK
                if clock.now % 1.0 == 0:
                    for name in heard:
                        cluster.heard(sessions[name])
                await cluster.check_liveness()
                for name in up:
                    if state(name) == pb.NODE_STATE_DOWN and name not in down:
                        down[name] = clock.now
            return down

        start = clock.now
        # c falls silent after 5 s: down at the first tick past 5 + 4 s, not a tick later
        await run_until(start + 5, heard={"a", "b", "c"})
        down = await run_until(start + 15, heard={"a", "b"})
        assert down == {"c": start + 9.25}
        # it comes back, and falls silent again at once: judged from its registration
        sessions["c"], _ = await cluster.register(agent_pb2.Register(node_id="c", name="c"))
        back = clock.now
        down = await run_until(back + 6, heard={"a", "b"})
        assert down == {"c": back + 4.25}
        # a, heard last at some whole second, goes silent: the skip set by earlier scans must
        # not hide it
        last = clock.now - clock.now % 1.0
        down = await run_until(last + 6, heard={"b"})
        assert down == {"a": last + 4.25}
        assert state("b") == pb.NODE_STATE_READY
        await store.close()

    asyncio.run(go())


def test_a_relabelled_node_hands_over_the_tasks_whose_constraints_it_no_longer_meets(etcd: str) -> None:
    """Its agent registers again with other labels: each task whose constraint it breaks gets a
    replacement on a node that meets it, and retires once that replacement runs, as from a drain."""

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/relabel/")
        sessions = {}
        for name, zone in (("a", "eu"), ("b", "eu"), ("c", "us")):
            registration = agent_pb2.Register(
                node_id=name, name=name, capacity=CAPACITY, labels={"zone": zone}
            )
            sessions[name], _ = await cluster.register(registration)
        spec = pb.ServiceSpec(name="web", image="nginx:1", replicas=1)
        spec.constraints.add(key="zone", op="==", value="eu")
        await cluster.create_service(spec)
        await cluster.reconcile_once()
        key = store.keys.task("web", 1)
        first = cluster.state.tasks[key].value
        assert first.node_id in ("a", "b")
        other = "b" if first.node_id == "a" else "a"

        registration = agent_pb2.Register(node_id=first.node_id, name=first.node_id, capacity=CAPACITY)
        registration.labels["zone"] = "us"  # the host moved (or was relabelled by its operator)
        sessions[first.node_id], _ = await cluster.register(registration)
        await cluster.reconcile_once()
        second = cluster.state.tasks[key].value
        assert second.id != first.id and second.node_id == other
        assert list(cluster.state.retiring) == [first.id]  # still running until the new one runs

        running = pb.TaskStatus(task_id=second.id, node_id=other, state=pb.TASK_STATE_RUNNING)
        await cluster.record_statuses(sessions[other], [running])
        await cluster._write_statuses(dict(cluster._status_inbox))
        await cluster.reconcile_once()
        assert list(cluster.state.retiring) == []
        assert (await store.load()).tasks[key].value.node_id == other
        await store.close()

    asyncio.run(go())


def test_a_task_no_node_can_take_off_a_draining_node_stays_and_says_so_once(etcd: str) -> None:
    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/kept/")
        await register(cluster, "a")
        await cluster.create_service(pb.ServiceSpec(name="web", image="nginx:1", replicas=1))
        await cluster.reconcile_once()
        events = cluster.events.subscribe()
        await cluster.set_availability("a", pb.NODE_AVAILABILITY_DRAIN)
        for _ in range(3):  # the loop retries every pass; the event is sent once per reason
            await cluster.reconcile_once()
        kinds = []
        while not events.empty():
            event = events.get_nowait()
            kinds.append(event.kind)
            if event.kind == "task-kept":
                assert (
                    "node a draining; it keeps running there: no replacement yet: 0/1 nodes" in event.message
                )
        assert kinds.count("task-kept") == 1
        assert cluster.state.tasks[store.keys.task("web", 1)].value.node_id == "a"  # still there
        await store.close()

    asyncio.run(go())


def test_a_down_node_holding_at_most_one_tasks_is_removed_only_after_the_margin(etcd: str) -> None:
    """Removing a node places its tasks elsewhere at once; for at-most-one tasks that must wait
    as long as failover does (deadline + margin), or its cut-off agent may still be stopping them."""
    from berth.controller.errors import FailedPreconditionError

    async def go() -> None:
        clock = FakeClock()
        store, cluster = await driven_cluster(etcd, "/rmnode/", clock)
        sessions = await register(cluster, "a", "b")
        spec = pb.ServiceSpec(name="db", image="postgres:16", replicas=2, on_disconnect=pb.ON_DISCONNECT_STOP)
        await cluster.create_service(spec)
        await cluster.reconcile_once()
        assert {t.value.node_id for t in cluster.state.tasks.values()} == {"a", "b"}
        clock.now += 1.0
        cluster.heard(sessions["b"])
        clock.now += 3.5  # a silent 4.5 s: down, but not yet past the margin
        await cluster.check_liveness()
        assert cluster.state.nodes["a"].value.state == pb.NODE_STATE_DOWN
        with pytest.raises(FailedPreconditionError, match=r"at-most-one tasks .* removed in 1\.5s"):
            await cluster.remove_node("a")
        clock.now += 1.6
        await cluster.remove_node("a")
        assert "a" not in cluster.state.nodes
        await store.close()

    asyncio.run(go())


def test_work_that_placed_nothing_waits_for_a_change_instead_of_being_planned_every_pass(
    etcd: str, scheduler_runs: list[int]
) -> None:
    """As Nomad's blocked evaluations: a replica no node can take is not planned again at every
    pass (0.4 s of CPU at 5,000 nodes) until something it depends on changes; then it is placed."""
    plans = scheduler_runs

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/blocked/")
        await register(cluster, "a")
        spec = pb.ServiceSpec(
            name="web", image="nginx:1", replicas=3, resources=pb.Resources(cpu_millis=1000)
        )
        await cluster.create_service(spec)

        def placed() -> int:
            return sum(1 for t in cluster.state.tasks.values() if t.value.node_id)

        await cluster.reconcile_once()  # places two, the third waits with its reason
        assert placed() == 2 and len(plans) == 1
        await cluster.reconcile_once()  # plans the third again: nothing placed, nothing written
        assert len(plans) == 2
        for _ in range(3):
            await cluster.reconcile_once()
        assert len(plans) == 2  # not planned again while nothing changed
        await register(cluster, "b")
        await cluster.reconcile_once()
        assert len(plans) == 3 and placed() == 3
        await store.close()

    asyncio.run(go())


def test_a_report_about_a_lost_task_has_it_judged_again_despite_the_memo(etcd: str) -> None:
    """A task on a down node that nothing can replace is shown lost. If its agent (still on its
    old stream) then reports it running, a status-only write, the next pass must judge it again
    and show it lost, even though the last plan for it placed nothing."""

    async def go() -> None:
        clock = FakeClock()
        store, cluster = await driven_cluster(etcd, "/lostagain/", clock)
        sessions = await register(cluster, "a", "b")
        spec = pb.ServiceSpec(
            name="web", image="nginx:1", replicas=2, max_per_node=1, resources=pb.Resources(cpu_millis=1500)
        )
        await cluster.create_service(spec)
        await cluster.reconcile_once()
        on_a = next(t.value for t in cluster.state.tasks.values() if t.value.node_id == "a")
        clock.now += 5.0
        cluster.heard(sessions["b"])
        await cluster.check_liveness()  # a is down; b cannot take a second replica
        await cluster.reconcile_once()
        await cluster.reconcile_once()  # the second plan places nothing, writes nothing: memo set

        def state() -> int:
            status = cluster.state.status_of(on_a.id)
            assert status is not None
            return status.state

        assert state() == pb.TASK_STATE_LOST
        running = pb.TaskStatus(task_id=on_a.id, node_id="a", state=pb.TASK_STATE_RUNNING)
        await cluster.record_statuses(sessions["a"], [running])
        await cluster._write_statuses(dict(cluster._status_inbox))
        assert state() == pb.TASK_STATE_RUNNING
        await cluster.reconcile_once()
        assert state() == pb.TASK_STATE_LOST
        await store.close()

    asyncio.run(go())


def test_a_pass_that_only_deletes_records_the_version_after_its_own_writes(
    etcd: str, scheduler_runs: list[int]
) -> None:
    """Scaling down another service while a replica waits: that pass plans (its deletes may free
    room) and, placing nothing, is remembered with its own writes counted, so the next pass does
    not plan the same work once more for nothing."""
    plans = scheduler_runs

    async def go() -> None:
        store, cluster = await driven_cluster(etcd, "/deletesonly/")
        await register(cluster, "a")
        big = pb.ServiceSpec(name="big", image="x:1", replicas=1, resources=pb.Resources(cpu_millis=3000))
        small = pb.ServiceSpec(name="small", image="x:1", replicas=3, resources=pb.Resources(cpu_millis=100))
        await cluster.create_service(big)
        await cluster.create_service(small)
        await cluster.reconcile_once()
        await cluster.reconcile_once()
        plans.clear()
        await cluster.reconcile_once()
        assert plans == []  # big waits for a change
        await cluster.scale_service("small", 2)
        for _ in range(3):
            await cluster.reconcile_once()
        assert len(plans) == 1  # the scale-down pass only
        await store.close()

    asyncio.run(go())


def test_a_node_already_down_at_start_has_its_at_most_one_tasks_replaced_when_the_margin_passes(
    etcd: str,
) -> None:
    """A controller that starts gives every node a fresh deadline; for a node that was already
    down, the liveness check must wake the loop when deadline + margin has passed, not leave it
    to the next periodic pass."""

    async def go() -> None:
        store, first = await driven_cluster(etcd, "/downatstart/")
        await register(first, "a", "b")
        spec = pb.ServiceSpec(name="db", image="postgres:16", replicas=1, on_disconnect=pb.ON_DISCONNECT_STOP)
        await first.create_service(spec)
        await first.reconcile_once()
        held_by = next(iter(first.state.tasks.values())).value.node_id
        node = pb.Node()
        node.CopyFrom(first.state.nodes[held_by].value)
        node.state = pb.NODE_STATE_DOWN
        await first._commit([first.state.put(store.keys.node(held_by), node)])  # it went down

        clock = FakeClock()
        restarted_store, restarted = await driven_cluster(etcd, "/downatstart/", clock)
        restarted._wake.clear()
        other = "b" if held_by == "a" else "a"
        clock.now += 5.0
        restarted.liveness.seen(other)  # the other node keeps heartbeating
        await restarted.check_liveness()
        assert not restarted._wake.is_set()  # inside the margin: nothing to do yet
        clock.now += 1.25
        restarted.liveness.seen(other)
        await restarted.check_liveness()
        assert restarted._wake.is_set()  # past deadline + margin: a pass replaces it now
        await store.close()
        await restarted_store.close()

    asyncio.run(go())
