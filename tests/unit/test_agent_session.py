"""The agent's status batching: what a burst of task changes sends to the controller."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

from berth.agent.session import STATUS_BATCH_DELAY, Acked, Identity, Session, load_acked, save_acked
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import agent_pb2
from berth.proto.berth.v1 import types_pb2 as pb


def _session() -> Session:
    identity = Identity(node_id="n1", name="host-1", address="10.0.0.1", capacity=pb.Resources())
    # report() and its batching never touch the task manager
    return Session("127.0.0.1:1", identity, cast(TaskManager, None))


def _status(task_id: str, state: Any, message: str = "") -> pb.TaskStatus:
    return pb.TaskStatus(task_id=task_id, node_id="n1", state=state, message=message)


async def _sent(
    session: Session, outbox: asyncio.Queue[agent_pb2.AgentMessage]
) -> list[agent_pb2.AgentMessage]:
    await asyncio.sleep(STATUS_BATCH_DELAY * 3)
    out = []
    while not outbox.empty():
        out.append(outbox.get_nowait())
    return out


def test_a_burst_is_one_message_with_the_latest_state_of_each_task() -> None:
    async def run() -> list[agent_pb2.AgentMessage]:
        session = _session()
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        session._outbox = outbox
        session.connected.set()
        session.report(_status("a", pb.TASK_STATE_PREPARING, "pulling image"))
        session.report(_status("b", pb.TASK_STATE_PREPARING))
        session.report(_status("a", pb.TASK_STATE_STARTING))
        session.report(_status("a", pb.TASK_STATE_RUNNING))
        return await _sent(session, outbox)

    sent = asyncio.run(run())
    assert len(sent) == 1
    statuses = [(s.task_id, s.state) for s in sent[0].status.statuses]
    # one entry per task, in the order of each task's latest change
    assert statuses == [("b", pb.TASK_STATE_PREPARING), ("a", pb.TASK_STATE_RUNNING)]


def test_changes_further_apart_than_the_batch_delay_travel_separately() -> None:
    async def run() -> list[agent_pb2.AgentMessage]:
        session = _session()
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        session._outbox = outbox
        session.connected.set()
        session.report(_status("a", pb.TASK_STATE_PREPARING))
        first = await _sent(session, outbox)
        session.report(_status("a", pb.TASK_STATE_RUNNING))
        return first + await _sent(session, outbox)

    sent = asyncio.run(run())
    assert [[s.state for s in m.status.statuses] for m in sent] == [
        [pb.TASK_STATE_PREPARING],
        [pb.TASK_STATE_RUNNING],
    ]


def test_nothing_is_queued_while_disconnected() -> None:
    async def run() -> list[agent_pb2.AgentMessage]:
        session = _session()
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        session._outbox = outbox
        session.report(_status("a", pb.TASK_STATE_RUNNING))
        return await _sent(session, outbox)

    assert asyncio.run(run()) == []


class _Manager:
    """Records when the watchdog stopped the at-most-one containers."""

    def __init__(self) -> None:
        self.stopped_at: list[float] = []

    async def stop_on_disconnect(self) -> int:
        self.stopped_at.append(time.monotonic())
        return 0


def _watched(deadline: float) -> tuple[Session, _Manager]:
    manager = _Manager()
    identity = Identity(node_id="n1", name="host-1", address="10.0.0.1", capacity=pb.Resources())
    session = Session("127.0.0.1:1", identity, cast(TaskManager, manager))
    session.node_deadline = deadline
    session.acked_at = time.monotonic()
    return session, manager


def test_the_watchdog_acts_just_after_the_deadline_and_not_while_acks_come() -> None:
    async def run() -> tuple[float, list[float]]:
        session, manager = _watched(0.3)
        watchdog = asyncio.create_task(session._watchdog())
        for _ in range(6):  # acks keep coming for 0.6 s: twice the deadline
            await asyncio.sleep(0.1)
            session.acked_at = time.monotonic()
        last_ack = session.acked_at
        await asyncio.sleep(0.5)
        watchdog.cancel()
        return last_ack, manager.stopped_at

    last_ack, stopped_at = asyncio.run(run())
    assert len(stopped_at) == 1
    assert 0.3 <= stopped_at[0] - last_ack < 0.3 + 0.05


def test_a_shorter_deadline_wakes_the_watchdog() -> None:
    async def run() -> tuple[float, list[float]]:
        session, manager = _watched(30.0)
        watchdog = asyncio.create_task(session._watchdog())
        await asyncio.sleep(0.05)  # asleep until 30 s after the ack
        session._set_deadline(0.2)
        await asyncio.sleep(0.4)
        watchdog.cancel()
        return session.acked_at, manager.stopped_at

    acked_at, stopped_at = asyncio.run(run())
    assert len(stopped_at) == 1
    assert 0.2 <= stopped_at[0] - acked_at < 0.2 + 0.05


def test_a_restarted_agent_judges_its_silence_from_the_last_ack_the_previous_one_saved(
    tmp_path: Path,
) -> None:
    """The previous agent process saved when its last acknowledged heartbeat was sent, and the
    deadline the controller had announced; one started after it, still cut off, acts at that
    moment + that deadline, not a deadline after its own start (the controller counts from when
    it last heard the node)."""
    ack_file = tmp_path / "last-heartbeat-ack"
    identity = Identity(node_id="n1", name="host-1", address="10.0.0.1", capacity=pb.Resources())
    previous = Session("127.0.0.1:1", identity, cast(TaskManager, _Manager()), ack_file=ack_file)
    previous._set_deadline(0.3)  # as the controller announced it
    previous._acked(time.monotonic() + 0.001)  # a heartbeat sent just now is acknowledged...
    time.sleep(0.25)  # ...and the process goes; another starts 0.25 s later

    async def run() -> tuple[float, list[float]]:
        manager = _Manager()
        restarted = Session("127.0.0.1:1", identity, cast(TaskManager, manager), ack_file=ack_file)
        watchdog = asyncio.create_task(restarted._watchdog())
        await asyncio.sleep(0.2)
        watchdog.cancel()
        return restarted.node_deadline, manager.stopped_at

    began = time.monotonic()
    deadline, stopped_at = asyncio.run(run())
    assert deadline == 0.3
    assert len(stopped_at) == 1 and stopped_at[0] - began < 0.15  # at ~0.05 s, not at 0.3 s


def test_a_restarted_agent_keeps_the_longer_deadline_the_controller_announced(tmp_path: Path) -> None:
    """At 5,000 nodes the controller allows 20 s: a restart that took longer than the default
    4 s must not stop anything the controller would still wait for."""
    ack_file = tmp_path / "last-heartbeat-ack"
    save_acked(ack_file, Acked(time.monotonic() - 5.0, 20.0))
    identity = Identity(node_id="n1", name="host-1", address="10.0.0.1", capacity=pb.Resources())

    async def run() -> list[float]:
        manager = _Manager()
        restarted = Session("127.0.0.1:1", identity, cast(TaskManager, manager), ack_file=ack_file)
        watchdog = asyncio.create_task(restarted._watchdog())
        await asyncio.sleep(0.2)
        watchdog.cancel()
        return manager.stopped_at

    assert asyncio.run(run()) == []


def test_a_saved_ack_from_another_boot_or_unreadable_is_ignored(tmp_path: Path) -> None:
    ack_file = tmp_path / "last-heartbeat-ack"
    ack_file.write_text("another-boot 12.5 4.0")
    assert load_acked(ack_file) is None
    ack_file.write_text("garbage")
    assert load_acked(ack_file) is None
    assert load_acked(tmp_path / "missing") is None
    save_acked(ack_file, Acked(42.0, 20.0))
    assert load_acked(ack_file) == Acked(42.0, 20.0)
