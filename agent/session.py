"""The agent's one stream to the controller: register, heartbeat, receive assignments, report.

The stream is re-opened with capped exponential backoff whenever it breaks; containers keep
running meanwhile. On every (re)connect the agent registers with its stable node id and sends the
current status of everything it runs, so a restarted controller is up to date at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import agent_pb2, agent_pb2_grpc
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    node_id: str
    name: str
    address: str
    capacity: pb.Resources
    labels: dict[str, str] = field(default_factory=dict)
    metrics_address: str = ""
    version: str = ""


class Session:
    def __init__(self, controller: str, identity: Identity, manager: TaskManager) -> None:
        self.controller = controller
        self.identity = identity
        self.manager = manager
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.heartbeat_interval = 1.0
        self.last_rtt: float | None = None

    def report(self, status: pb.TaskStatus) -> None:
        """Queue a status change for the controller (sent in order; dropped on disconnect and
        re-sent in full on reconnect)."""
        if self.connected.is_set():
            self._outbox.put_nowait(agent_pb2.AgentMessage(status=agent_pb2.StatusReport(statuses=[status])))

    async def run_forever(self, recovered: list[pb.TaskStatus]) -> None:
        attempt = 0
        while True:
            try:
                await self._run_once(recovered)
                attempt = 0
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                code = exc.code()
                if code == grpc.StatusCode.ALREADY_EXISTS or code == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error("controller refused registration: %s", exc.details())
                else:
                    log.warning("stream to controller broken (%s): %s", code.name, exc.details())
            finally:
                self.connected.clear()
            recovered = []
            await asyncio.sleep(min(2.0, 0.25 * (2 ** min(attempt, 3))))

    async def _run_once(self, recovered: list[pb.TaskStatus]) -> None:
        async with grpc.aio.insecure_channel(self.controller) as channel:
            stub = agent_pb2_grpc.AgentAPIStub(channel)
            self._outbox = asyncio.Queue()
            ident = self.identity
            running = self.manager.statuses() or recovered
            register = agent_pb2.Register(
                node_id=ident.node_id,
                name=ident.name,
                address=ident.address,
                capacity=ident.capacity,
                labels=ident.labels,
                metrics_address=ident.metrics_address,
                agent_version=ident.version,
                running=running,
            )
            call = stub.Connect(self._requests(register))
            heartbeats: asyncio.Task[None] | None = None
            try:
                async for message in call:
                    kind = message.WhichOneof("msg")
                    if kind == "registered":
                        self.heartbeat_interval = message.registered.heartbeat_interval or 1.0
                        self.connected.set()
                        log.info("registered with controller=%s node=%s", self.controller, ident.node_id)
                        heartbeats = asyncio.create_task(self._heartbeats())
                        statuses = self.manager.statuses()
                        if statuses:
                            self._outbox.put_nowait(
                                agent_pb2.AgentMessage(status=agent_pb2.StatusReport(statuses=statuses))
                            )
                    elif kind == "assignments":
                        a = message.assignments
                        self.manager.apply(a.tasks, a.removed, full=a.full)
                    elif kind == "heartbeat_ack":
                        self.last_rtt = time.monotonic() - message.heartbeat_ack.sent_at
            finally:
                if heartbeats is not None:
                    heartbeats.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await heartbeats
                call.cancel()

    async def _requests(self, register: agent_pb2.Register) -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(register=register)
        while True:
            yield await self._outbox.get()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._outbox.put_nowait(
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_at=time.monotonic()))
            )
