"""The agent's side of a stop-first move: a task assigned with desired state SHUTDOWN is stopped,
never started, and reported SHUTDOWN only once nothing of it runs; every time it is assigned so
again (each full assignment after a reconnect) the agent answers again, so a lost report is made
good. The controller starts the slot's new task only on that report."""

from __future__ import annotations

import asyncio

from berth.agent.hollow import HollowRuntime
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import types_pb2 as pb


class GatedStops(HollowRuntime):
    """Stops wait for ``release``: a container that takes its time to stop."""

    def __init__(self) -> None:
        super().__init__("host-1", record_calls=True)
        self.release = asyncio.Event()

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        self._record("stop-begun", task_id)
        await self.release.wait()
        await super().stop(task_id, timeout)


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


def shutdowns(reports: list[pb.TaskStatus], task_id: str) -> int:
    return sum(1 for r in reports if r.task_id == task_id and r.state == pb.TASK_STATE_SHUTDOWN)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_running_task_told_to_stop_reports_only_once_it_has_stopped() -> None:
    async def scenario() -> None:
        runtime = GatedStops()
        tasks, reports = manager(runtime)
        tasks.apply([task("db.1.a")], [], full=True)
        await settle()
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
