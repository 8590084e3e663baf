"""The agent's status batching: what a burst of task changes sends to the controller."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from berth.agent.session import STATUS_BATCH_DELAY, Identity, Session
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
