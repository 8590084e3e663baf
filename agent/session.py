"""The agent's one stream to the controller: register, heartbeat, receive assignments, report.

The stream is re-opened with capped exponential backoff whenever it breaks; containers keep
running meanwhile. On every (re)connect the agent registers with its stable node id and sends the
current status of everything it runs, so a restarted controller is up to date at once, and the
full assignment it gets back tells it which of its tasks were replaced while it was away.

A watchdog measures the time since the *sending* of the last heartbeat the controller
acknowledged. Past the node deadline it (1) abandons the stream, so a partitioned agent reconnects
as soon as the network heals, and (2) stops the containers of at-most-one services
(``on_disconnect: stop``): the controller, which declares the node down no earlier than that
same deadline after it last heard from us, waits a safety margin more before starting copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import agent_pb2, agent_pb2_grpc
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
WATCHDOG_TICK = 0.2  # while cut off
WATCHDOG_SLACK = 0.001  # wake just after the deadline, not on it
STATUS_BATCH_DELAY = 0.01  # status changes this close together travel in one message
DEFAULT_DEADLINE = 4.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    node_id: str
    name: str
    address: str
    capacity: pb.Resources
    labels: dict[str, str] = field(default_factory=dict)
    metrics_address: str = ""
    version: str = ""


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError as exc:
        log.warning(
            "cannot read %s (%s): a restarted agent will count its silence from its start", BOOT_ID, exc
        )
        return ""


@dataclass(frozen=True, slots=True)
class Acked:
    """What a restarted agent needs to go on judging its silence where the last one left off."""

    at: float  # send time of the last acknowledged heartbeat, on the monotonic clock
    deadline: float  # the node deadline the controller had announced by then


def load_acked(path: Path) -> Acked | None:
    """What a previous agent process saved, if it saved it since this boot (the monotonic clock
    restarts with the machine, and the containers with it)."""
    try:
        boot, at, deadline = path.read_text().split()
        if boot and boot == _boot_id():
            return Acked(float(at), float(deadline))
    except (OSError, ValueError):
        pass
    return None


def save_acked(path: Path, acked: Acked) -> None:
    boot = _boot_id()
    if not boot:
        return
    try:
        staged = path.with_name(path.name + ".new")
        staged.write_text(f"{boot} {acked.at!r} {acked.deadline!r}")
        staged.replace(path)
    except OSError as exc:
        log.warning("cannot save the last heartbeat acknowledgement to %s: %s", path, exc)


class Session:
    def __init__(
        self, controller: str, identity: Identity, manager: TaskManager, *, ack_file: Path | None = None
    ) -> None:
        """``ack_file`` keeps the send time of the last acknowledged heartbeat across agent
        restarts: an agent restarted while cut off from the controller judges its silence from
        that moment, not from its own start, so its watchdog stops the at-most-one containers it
        recovers by the same deadline the controller counts (docs/failure-handling.md)."""
        self.controller = controller
        self.identity = identity
        self.manager = manager
        self.ack_file = ack_file
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.heartbeat_interval = 1.0
        self.node_deadline = DEFAULT_DEADLINE
        self.last_rtt: float | None = None
        self.acked_at = time.monotonic()  # send time of the last acknowledged heartbeat
        saved = load_acked(ack_file) if ack_file is not None else None
        if saved is not None:
            # the controller's deadline only grows while it runs, and a restarted controller
            # counts every node's silence afresh: the saved one is never too long
            self.acked_at = min(self.acked_at, saved.at)
            self.node_deadline = saved.deadline
        self._register_sent = self.acked_at
        self._abandon = asyncio.Event()
        self._stopped_for_disconnect = False
        self._deadline_cut = asyncio.Event()  # the controller announced a shorter deadline
        self._batch: dict[str, pb.TaskStatus] = {}  # task id -> its latest status, in change order

    def report(self, status: pb.TaskStatus) -> None:
        """Queue a status change for the controller (sent in order; dropped on disconnect and
        re-sent in full on reconnect). Changes within ``STATUS_BATCH_DELAY`` share one message,
        and a task that changed twice in that time is reported once, in its latest state (as
        Swarm's status reporter and the kubelet's status manager do): a node starting twenty
        tasks from cached images sends one report of twenty statuses, not eighty."""
        if not self.connected.is_set():
            return
        if not self._batch:
            asyncio.get_running_loop().call_later(STATUS_BATCH_DELAY, self._send_batch, self._outbox)
        self._batch.pop(status.task_id, None)
        self._batch[status.task_id] = status

    def _send_batch(self, outbox: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        if outbox is not self._outbox:
            return  # scheduled on a stream that has since been replaced: its batch is gone too
        batch, self._batch = self._batch, {}
        if batch and self.connected.is_set():
            report = agent_pb2.StatusReport(statuses=list(batch.values()))
            outbox.put_nowait(agent_pb2.AgentMessage(status=report))

    async def run_forever(self, recovered: list[pb.TaskStatus]) -> None:
        watchdog = asyncio.create_task(self._watchdog())
        attempt = 0
        try:
            while True:
                try:
                    await self._run_once(recovered)
                    attempt = 0
                except grpc.aio.AioRpcError as exc:
                    attempt += 1
                    code = exc.code()
                    if code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT):
                        log.error("controller refused registration: %s", exc.details())
                    elif code != grpc.StatusCode.CANCELLED:
                        log.warning("stream to controller broken (%s): %s", code.name, exc.details())
                except TimeoutError:
                    attempt += 1
                    log.debug("controller %s not reachable within %.0fs", self.controller, CONNECT_TIMEOUT)
                finally:
                    self.connected.clear()
                recovered = []
                await asyncio.sleep(min(1.0, 0.1 * (2 ** min(attempt, 4))))
        finally:
            watchdog.cancel()

    async def _run_once(self, recovered: list[pb.TaskStatus]) -> None:
        options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        async with grpc.aio.insecure_channel(self.controller, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
            stub = agent_pb2_grpc.AgentAPIStub(channel)
            self._outbox = asyncio.Queue()
            self._batch = {}
            ident = self.identity
            register = agent_pb2.Register(
                node_id=ident.node_id,
                name=ident.name,
                address=ident.address,
                capacity=ident.capacity,
                labels=ident.labels,
                metrics_address=ident.metrics_address,
                agent_version=ident.version,
                running=self.manager.statuses() or recovered,
            )
            call = stub.Connect(self._requests(register))
            self._abandon = asyncio.Event()
            reader = asyncio.create_task(self._consume(call))
            abandoned = asyncio.create_task(self._abandon.wait())
            try:
                await asyncio.wait({reader, abandoned}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises the stream's error, if any
            finally:
                for t in (reader, abandoned):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await t
                call.cancel()

    async def _consume(self, call: grpc.aio.StreamStreamCall) -> None:
        ident = self.identity
        heartbeats: asyncio.Task[None] | None = None
        try:
            async for message in call:
                kind = message.WhichOneof("msg")
                if kind == "registered":
                    self.heartbeat_interval = message.registered.heartbeat_interval or 1.0
                    self._set_deadline(message.registered.node_deadline or DEFAULT_DEADLINE)
                    self._acked(self._register_sent)  # the controller heard us after we sent it
                    self._stopped_for_disconnect = False
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
                    ack = message.heartbeat_ack
                    self.last_rtt = time.monotonic() - ack.sent_at
                    # the controller stretches the timing as the cluster grows
                    self.heartbeat_interval = ack.heartbeat_interval or self.heartbeat_interval
                    self._set_deadline(ack.node_deadline or self.node_deadline)
                    self._acked(ack.sent_at)  # (saved with the deadline it came with)
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
            call.cancel()

    async def _requests(self, register: agent_pb2.Register) -> AsyncIterator[agent_pb2.AgentMessage]:
        self._register_sent = time.monotonic()
        yield agent_pb2.AgentMessage(register=register)
        while True:
            yield await self._outbox.get()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._outbox.put_nowait(
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_at=time.monotonic()))
            )

    def _acked(self, sent_at: float) -> None:
        if sent_at > self.acked_at:
            self.acked_at = sent_at
            if self.ack_file is not None:
                save_acked(self.ack_file, Acked(sent_at, self.node_deadline))

    def _set_deadline(self, deadline: float) -> None:
        if deadline < self.node_deadline:
            self._deadline_cut.set()  # the watchdog may be asleep until the old, later moment
        self.node_deadline = deadline

    async def _watchdog(self) -> None:
        """Act when no heartbeat was acknowledged for the node deadline (see docs/failure-handling.md).

        While heartbeats are acknowledged it sleeps until the moment the last acknowledged one
        becomes a deadline old and looks again (an ack since has moved that moment on), woken
        early if the controller announces a shorter deadline: it acts within a millisecond of
        the deadline, and a fleet of idle agents does not wake five times a second each."""
        while True:
            silent = time.monotonic() - self.acked_at
            if silent <= self.node_deadline:
                self._deadline_cut.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._deadline_cut.wait(), self.node_deadline - silent + WATCHDOG_SLACK
                    )
                continue
            if self.connected.is_set() and not self._abandon.is_set():
                log.warning("no heartbeat acknowledged for %.1fs; reconnecting", silent)
                self._abandon.set()
            if not self._stopped_for_disconnect:
                self._stopped_for_disconnect = True
                stopped = await self.manager.stop_on_disconnect()
                if stopped:
                    log.warning("cut off from the controller: stopped %d at-most-one containers", stopped)
            await asyncio.sleep(WATCHDOG_TICK)  # cut off: look again until an ack arrives
