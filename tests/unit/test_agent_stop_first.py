"""The agent's side of a stop-first move: a task assigned with desired state SHUTDOWN is stopped,
never started, and reported SHUTDOWN only once nothing of it runs; every time it is assigned so
again (each full assignment after a reconnect) the agent answers again, so a lost report is made
good. The controller starts the slot's new task only on that report."""

from __future__ import annotations

import asyncio

from berth.agent.hollow import HollowRuntime
from berth.agent.runtime import ContainerError
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import types_pb2 as pb


class GatedStops(HollowRuntime):
    """A container that takes its time to stop: a stop waits for ``release``, unless it asks for
    a grace of a second or less (a SIGKILL soon after: an at-most-one watchdog stop) or another
    stop has killed the container meanwhile. ``hold_all`` makes short stops wait too; ``broken``
    makes stop and remove fail while set."""

    def __init__(self) -> None:
        super().__init__("host-1", record_calls=True)
        self.release = asyncio.Event()
        self.hold_all = False
        self.broken = False

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        self._record("stop-begun", task_id)
        container = self._containers.get(task_id)
        if (timeout > 1.0 or self.hold_all) and container is not None and container.running is not None:
            released = asyncio.ensure_future(self.release.wait())
            killed = asyncio.ensure_future(container.exited.wait())
            await asyncio.wait({released, killed}, return_when=asyncio.FIRST_COMPLETED)
            released.cancel()
            killed.cancel()
        if self.broken:
            raise ContainerError(f"container {task_id} did not die after SIGKILL")
        await super().stop(task_id, timeout)

    async def remove(self, task_id: str) -> None:
        if self.broken:
            raise ContainerError(f"container {task_id} did not die after SIGKILL")
        await super().remove(task_id)


def task(task_id: str, desired: pb.TaskState.ValueType = pb.TASK_STATE_RUNNING) -> pb.Task:
    return pb.Task(
        id=task_id,
        service="db",
        slot=1,
        node_id="n1",
        desired_state=desired,
        spec=pb.ServiceSpec(name="db", image="db:1", on_disconnect=pb.ON_DISCONNECT_STOP),
    )


def manager(runtime: HollowRuntime) -> tuple[TaskManager, list[pb.TaskStatus]]:
    reports: list[pb.TaskStatus] = []
    return TaskManager(runtime, node_id="n1", node_name="host-1", report=reports.append), reports


async def running_db() -> tuple[GatedStops, TaskManager, list[pb.TaskStatus]]:
    """A manager on a ``GatedStops`` runtime, running ``db.1.a``."""
    runtime = GatedStops()
    tasks, reports = manager(runtime)
    tasks.apply([task("db.1.a")], [], full=True)
    await settle()
    return runtime, tasks, reports


def shutdowns(reports: list[pb.TaskStatus], task_id: str) -> int:
    return sum(1 for r in reports if r.task_id == task_id and r.state == pb.TASK_STATE_SHUTDOWN)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_running_task_told_to_stop_reports_only_once_it_has_stopped() -> None:
    async def scenario() -> None:
        runtime, tasks, reports = await running_db()
        assert runtime.running == {"db.1.a"}
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=False)
        await settle()
        assert ("stop-begun", "db.1.a") in runtime.log
        assert shutdowns(reports, "db.1.a") == 0  # still stopping: no word yet
        # the controller asks again meanwhile (a full assignment after a reconnect): no early word
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert shutdowns(reports, "db.1.a") == 0
        runtime.release.set()
        await settle()
        assert runtime.running == set()
        assert shutdowns(reports, "db.1.a") == 1
        assert runtime.calls["start"] == 1  # never started again

    asyncio.run(scenario())


def test_a_task_told_to_stop_that_does_not_run_here_is_reported_stopped_at_once() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        tasks, reports = manager(runtime)
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert shutdowns(reports, "db.1.a") == 1
        assert runtime.calls["create"] == runtime.calls["start"] == 0
        # asked again (the first report was lost): answered again
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert shutdowns(reports, "db.1.a") == 2

    asyncio.run(scenario())


def test_after_an_agent_restart_a_recovered_container_told_to_stop_is_stopped_then_reported() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        first, _ = manager(runtime)
        first.apply([task("db.1.a")], [], full=True)
        await settle()
        await first.close()  # the agent process goes; its container keeps running
        assert runtime.running == {"db.1.a"}
        restarted, reports = manager(runtime)
        await restarted.recover()
        restarted.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert runtime.running == {"db.1.a"} and shutdowns(reports, "db.1.a") == 0
        runtime.release.set()
        await settle()
        assert runtime.running == set()
        assert shutdowns(reports, "db.1.a") == 1
        assert runtime.calls["start"] == 1  # the restarted agent never started it

    asyncio.run(scenario())


def test_cut_off_mid_stop_the_watchdog_kills_it_within_its_short_grace() -> None:
    """A stop-first stop asks for the full grace, which the controller's margin does not cover:
    when the agent is cut off meanwhile, its watchdog cuts the stop short, as for a running
    at-most-one container, and returns only once the container is gone."""

    async def scenario() -> None:
        runtime, tasks, reports = await running_db()
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=False)
        await settle()
        assert runtime.running == {"db.1.a"}  # waiting out its grace
        assert await asyncio.wait_for(tasks.stop_on_disconnect(), 5) == 1
        assert runtime.running == set()
        assert shutdowns(reports, "db.1.a") == 1

    asyncio.run(scenario())


def test_a_watchdog_stop_under_way_is_not_reported_stopped_on_reconnect() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        runtime.hold_all = True  # the watchdog's own stop takes a moment too
        tasks, reports = manager(runtime)
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        watchdog = asyncio.create_task(tasks.stop_on_disconnect())
        await settle()
        # the agent reconnects while the container still stops; meanwhile the controller moved
        # the task stop first, so the full assignment says SHUTDOWN
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert runtime.running == {"db.1.a"} and shutdowns(reports, "db.1.a") == 0
        runtime.release.set()
        await watchdog
        await settle()
        assert runtime.running == set() and shutdowns(reports, "db.1.a") >= 1

    asyncio.run(scenario())


def test_a_failed_stop_is_not_reported_stopped_and_is_tried_again_when_asked_again() -> None:
    async def scenario() -> None:
        runtime, tasks, reports = await running_db()
        runtime.broken = True  # e.g. a process stuck in uninterruptible sleep
        runtime.release.set()  # (its grace runs out at once)
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=False)
        await settle()
        assert shutdowns(reports, "db.1.a") == 0
        assert [r.state for r in reports if r.task_id == "db.1.a"][-1] == pb.TASK_STATE_FAILED
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)  # asked again: still stuck
        await settle()
        assert shutdowns(reports, "db.1.a") == 0
        runtime.broken = False
        runtime.release.set()
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert runtime.running == set() and shutdowns(reports, "db.1.a") == 1

    asyncio.run(scenario())


def test_a_container_being_removed_as_an_orphan_is_reported_once_that_removal_ends() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        first, _ = manager(runtime)
        first.apply([task("db.1.a")], [], full=True)
        await settle()
        await first.close()
        restarted, reports = manager(runtime)
        await restarted.recover()
        restarted.apply([], [], full=True)  # not assigned: removed as an orphan (it takes a while)
        await settle()
        restarted.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)
        await settle()
        assert runtime.running == {"db.1.a"} and shutdowns(reports, "db.1.a") == 0
        runtime.release.set()
        await settle()
        assert runtime.running == set() and shutdowns(reports, "db.1.a") == 1

    asyncio.run(scenario())


def test_a_task_wanted_back_while_its_watchdog_stop_ends_starts_after_it() -> None:
    """A controller stall fires the watchdog; the agent reconnects and is told to run the task
    after all, while its stop still ends: the new container starts only after that stop's
    removal, which would otherwise take the new container with it."""

    async def scenario() -> None:
        runtime = GatedStops()
        runtime.hold_all = True
        tasks, _ = manager(runtime)
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        watchdog = asyncio.create_task(tasks.stop_on_disconnect())
        await settle()
        tasks.apply([task("db.1.a")], [], full=True)  # wanted again
        await settle()
        assert runtime.calls["start"] == 1 and "db.1.a" not in tasks.runners
        runtime.release.set()
        await watchdog
        await settle()
        assert runtime.running == {"db.1.a"} and runtime.calls["start"] == 2
        assert "db.1.a" in tasks.runners

    asyncio.run(scenario())


def test_told_to_stop_while_a_stop_ends_and_a_runner_is_back_stops_that_runner_too() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        runtime.hold_all = True
        tasks, reports = manager(runtime)
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        watchdog = asyncio.create_task(tasks.stop_on_disconnect())
        await settle()
        tasks.apply([task("db.1.a")], [], full=True)  # wanted again: starts after the stop
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=True)  # then moved away
        runtime.release.set()
        await watchdog
        await settle()
        assert runtime.running == set() and "db.1.a" not in tasks.runners
        assert runtime.calls["start"] == 1  # never started again
        assert shutdowns(reports, "db.1.a") >= 1

    asyncio.run(scenario())


def test_a_failed_stop_is_tried_again_by_itself_and_then_reported() -> None:
    async def scenario() -> None:
        runtime, tasks, reports = await running_db()
        runtime.broken = True
        runtime.release.set()
        tasks.apply([task("db.1.a", pb.TASK_STATE_SHUTDOWN)], [], full=False)
        await settle()
        assert shutdowns(reports, "db.1.a") == 0 and runtime.running == {"db.1.a"}
        runtime.broken = False  # the next try (after the first backoff, 1 s) works
        for _ in range(30):
            await asyncio.sleep(0.1)
            if not runtime.running:
                break
        await settle()
        assert runtime.running == set() and shutdowns(reports, "db.1.a") == 1

    asyncio.run(scenario())


def cut_off_twice_setup() -> tuple[GatedStops, TaskManager, list[pb.TaskStatus]]:
    runtime = GatedStops()
    runtime.hold_all = True
    tasks, reports = manager(runtime)
    return runtime, tasks, reports


def test_a_start_waiting_for_a_stop_is_dropped_when_the_agent_is_cut_off_again() -> None:
    async def scenario() -> None:
        runtime, tasks, _ = cut_off_twice_setup()
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        first = asyncio.create_task(tasks.stop_on_disconnect())  # its stop hangs a while
        await settle()
        tasks.apply([task("db.1.a")], [], full=True)  # reconnected: wanted back, after the stop
        second = asyncio.create_task(tasks.stop_on_disconnect())  # cut off again
        await settle()
        runtime.release.set()
        await asyncio.gather(first, second)
        await settle()
        assert runtime.running == set() and "db.1.a" not in tasks.runners
        assert runtime.calls["start"] == 1  # not started again while cut off

    asyncio.run(scenario())


def test_the_watchdog_is_not_held_up_by_a_stop_that_hangs() -> None:
    async def scenario() -> None:
        runtime, tasks, _ = cut_off_twice_setup()
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(tasks.stop_on_disconnect(grace=0.2), 5)  # the stop never ends
        assert loop.time() - began < 2.0
        assert "db.1.a" in tasks._stops  # still trying: under way, tracked
        runtime.release.set()
        await settle()

    asyncio.run(scenario())


def test_close_starts_nothing_that_waited_for_a_stop() -> None:
    async def scenario() -> None:
        runtime, tasks, _ = cut_off_twice_setup()
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        watchdog = asyncio.create_task(tasks.stop_on_disconnect())
        await settle()
        tasks.apply([task("db.1.a")], [], full=True)  # wanted back, after the stop
        closing = asyncio.create_task(tasks.close())  # the agent shuts down meanwhile
        await settle()
        runtime.release.set()
        await asyncio.gather(watchdog, closing)
        await settle()
        assert runtime.calls["start"] == 1 and "db.1.a" not in tasks.runners

    asyncio.run(scenario())


def test_a_start_waiting_for_a_stop_that_failed_waits_for_a_stop_that_works() -> None:
    async def scenario() -> None:
        runtime, tasks, _ = cut_off_twice_setup()
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
        runtime.broken = True
        tasks.apply([], ["db.1.a"], full=False)  # removed: its stop hangs, then fails
        await settle()
        tasks.apply([task("db.1.a")], [], full=True)  # wanted back meanwhile
        runtime.release.set()
        await settle()
        assert runtime.calls["start"] == 1 and "db.1.a" not in tasks.runners  # not on top of it
        runtime.broken = False  # the retry (after 1 s) works: then it starts, fresh
        for _ in range(30):
            await asyncio.sleep(0.1)
            if "db.1.a" in tasks.runners:
                break
        await settle()
        assert runtime.calls["start"] == 2 and runtime.running == {"db.1.a"}

    asyncio.run(scenario())


def test_an_agent_restarted_while_cut_off_stops_the_at_most_one_containers_it_recovered() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        first, _ = manager(runtime)
        keep = task("web.1.b")
        keep.service, keep.spec.name, keep.spec.on_disconnect = "web", "web", pb.ON_DISCONNECT_KEEP
        first.apply([task("db.1.a"), keep], [], full=True)
        await settle()
        await first.close()  # the agent goes; its containers run on
        restarted, _ = manager(runtime)
        await restarted.recover()
        # still cut off: its watchdog acts before any assignment has claimed them
        assert await asyncio.wait_for(restarted.stop_on_disconnect(), 5) == 1
        await settle()
        assert runtime.running == {"web.1.b"}  # on_disconnect: keep runs on

    asyncio.run(scenario())
