"""An in-process event bus: what happened, for ``berth events`` (and logs).

Subscribers get their own bounded queue; a subscriber that falls behind loses its oldest events
rather than slowing the controller (the events are a view, not state: etcd holds the state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from berth.proto.berth.v1 import cluster_pb2

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000


class EventBus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._subscribers: set[asyncio.Queue[cluster_pb2.Event]] = set()

    def publish(
        self,
        kind: str,
        message: str = "",
        *,
        node_id: str = "",
        node: str = "",
        service: str = "",
        task: str = "",
    ) -> None:
        if not self.wants(kind):
            return  # nobody watches: a 100,000-task placement should not build 100,000 events
        level = logging.DEBUG if kind.startswith("task-") else logging.INFO
        event = cluster_pb2.Event(
            time=self.clock(),
            kind=kind,
            node_id=node_id,
            node=node,
            service=service,
            task=task,
            message=message,
        )
        log.log(level, "event kind=%s node=%s service=%s task=%s msg=%s", kind, node, service, task, message)
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def wants(self, kind: str) -> bool:
        """Whether an event of this kind would reach anyone (a subscriber or the log): callers
        with many events to build skip the work when not."""
        level = logging.DEBUG if kind.startswith("task-") else logging.INFO
        return bool(self._subscribers) or log.isEnabledFor(level)

    def subscribe(self) -> asyncio.Queue[cluster_pb2.Event]:
        queue: asyncio.Queue[cluster_pb2.Event] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[cluster_pb2.Event]) -> None:
        self._subscribers.discard(queue)
