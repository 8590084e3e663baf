"""gRPC servicers: translation between the wire and ``Cluster``, nothing else.

Error mapping lives here, in one place: each ``ClusterError`` subclass becomes one status code
and its message travels unchanged to the CLI, which prints it without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

from berth.controller.cluster import Cluster
from berth.controller.errors import (
    AlreadyExistsError,
    ClusterError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from berth.proto.berth.v1 import agent_pb2, agent_pb2_grpc, cluster_pb2, cluster_pb2_grpc

log = logging.getLogger(__name__)

_CODES: dict[type[ClusterError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    InvalidError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}

R = TypeVar("R")


def status_code(exc: ClusterError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _translating(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except ClusterError as exc:
            await context.abort(status_code(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


class ClusterService(cluster_pb2_grpc.ClusterAPIServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @_translating
    async def CreateService(self, request: cluster_pb2.CreateServiceRequest, context: Any) -> Any:
        return await self.cluster.create_service(request.spec)

    @_translating
    async def ApplyService(self, request: cluster_pb2.ApplyServiceRequest, context: Any) -> Any:
        service, created, changed = await self.cluster.apply_service(request.spec)
        return cluster_pb2.ApplyServiceResponse(service=service, created=created, changed=changed)

    @_translating
    async def ScaleService(self, request: cluster_pb2.ScaleServiceRequest, context: Any) -> Any:
        return await self.cluster.scale_service(request.name, request.replicas)

    @_translating
    async def RemoveService(self, request: cluster_pb2.RemoveServiceRequest, context: Any) -> Any:
        await self.cluster.remove_service(request.name)
        return cluster_pb2.RemoveServiceResponse()

    @_translating
    async def GetService(self, request: cluster_pb2.GetServiceRequest, context: Any) -> Any:
        return self.cluster.service_view(request.name)

    @_translating
    async def ListServices(self, request: cluster_pb2.ListServicesRequest, context: Any) -> Any:
        return cluster_pb2.ListServicesResponse(services=self.cluster.service_views())

    @_translating
    async def ListTasks(self, request: cluster_pb2.ListTasksRequest, context: Any) -> Any:
        return cluster_pb2.ListTasksResponse(tasks=self.cluster.task_views(request.service))

    @_translating
    async def ListNodes(self, request: cluster_pb2.ListNodesRequest, context: Any) -> Any:
        return cluster_pb2.ListNodesResponse(nodes=self.cluster.node_views())

    @_translating
    async def SetNodeAvailability(self, request: cluster_pb2.SetNodeAvailabilityRequest, context: Any) -> Any:
        return await self.cluster.set_availability(request.node, request.availability)

    @_translating
    async def RemoveNode(self, request: cluster_pb2.RemoveNodeRequest, context: Any) -> Any:
        await self.cluster.remove_node(request.node)
        return cluster_pb2.RemoveNodeResponse()

    @_translating
    async def Plan(self, request: cluster_pb2.PlanRequest, context: Any) -> Any:
        return await self.cluster.plan(request.specs)

    async def WatchEvents(self, request: cluster_pb2.WatchEventsRequest, context: Any) -> Any:
        queue = self.cluster.events.subscribe()
        try:
            while True:
                yield await queue.get()
        finally:
            self.cluster.events.unsubscribe(queue)


class AgentService(agent_pb2_grpc.AgentAPIServicer):
    """One Connect stream per agent: Register first, then heartbeats and status reports in,
    Registered + a full Assignments and then incremental ones out."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("register"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Register")
        try:
            session, assigned = await self.cluster.register(first.register)
        except ClusterError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        await context.write(
            agent_pb2.ControllerMessage(
                registered=agent_pb2.Registered(
                    node_id=session.node_id,
                    heartbeat_interval=self.cluster.liveness.interval,
                    node_deadline=self.cluster.liveness.deadline,
                )
            )
        )
        await context.write(
            agent_pb2.ControllerMessage(assignments=agent_pb2.Assignments(full=True, tasks=assigned))
        )
        reader = asyncio.create_task(self._read(session, context))
        writer = asyncio.create_task(self._write(session, context))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            writer.cancel()
            await self.cluster.disconnect(session)

    @staticmethod
    async def _write(session: Any, context: grpc.aio.ServicerContext) -> None:
        while True:
            await context.write(await session.outbox.get())

    async def _read(self, session: Any, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            self.cluster.heard(session)
            kind = message.WhichOneof("msg")
            if kind == "heartbeat":
                live = self.cluster.liveness
                ack = agent_pb2.HeartbeatAck(
                    sent_at=message.heartbeat.sent_at,
                    heartbeat_interval=live.interval,
                    node_deadline=live.deadline,
                )
                session.outbox.put_nowait(agent_pb2.ControllerMessage(heartbeat_ack=ack))
            elif kind == "status":
                try:
                    await self.cluster.record_statuses(session, message.status.statuses)
                except ClusterError as exc:
                    log.warning("status not recorded node=%s: %s", session.node_id, exc)
