"""HOLLOW AGENTS — FOR SCALE BENCHMARKS ONLY. THEY RUN NOTHING.

    ###########################################################################
    #  A hollow agent is a real Berth agent (the real ``Session`` stream and   #
    #  the real ``TaskManager`` runners) whose container runtime is a fake:   #
    #  ``HollowRuntime`` only records what it was asked to do. No image is     #
    #  pulled, no process, cgroup, namespace or port exists. Never point a     #
    #  hollow agent at a cluster that is meant to run workloads: every task    #
    #  placed on it is reported RUNNING and runs nowhere.                      #
    ###########################################################################

This is Berth's kubemark: it lets one machine stand in for thousands of hosts so the controller,
its scheduler and etcd can be measured at cluster scale (``bench/scheduler.py``). Everything on
the wire is what a real agent sends: Register with the configured capacity and labels, a
heartbeat every second, every state change of every task (PREPARING twice, STARTING, RUNNING —
``TaskManager`` reports each one) and SHUTDOWN on removal.

``HollowRuntime`` implements ``ContainerRuntime``: ``pull`` returns a made-up ``ImageInfo`` at
once, ``create``/``start`` record the call and return a ``RunningContainer`` with a fake pid,
``wait`` blocks until ``stop`` or ``remove``, and ``stop``/``remove`` record the call.

Many hollow agents share one process (``HollowFleet``), each with its own gRPC channel and stream
to the controller, named ``hollow-00001``, ``hollow-00002``, ... (node ids derived from the name,
so a restarted fleet is the same set of nodes)::

    python -m berth.agent.hollow --controller 127.0.0.1:7070 --count 1000 --start-index 1 \\
        [--cpus 32] [--memory 128Gi] [--label zone=a]... [--connect-rate 500]

On SIGTERM/SIGINT the fleet stops (like a real agent, it leaves its "containers" in place) and
prints one JSON line of counters (agents, registered, tasks started/removed, status reports,
stream breaks) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import gc
import hashlib
import json
import logging
import resource
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.agent.runtime import (
    ContainerError,
    ContainerRecord,
    ContainerSpec,
    ExitStatus,
    ImageInfo,
    RunningContainer,
)
from berth.agent.session import Identity, Session
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

log = logging.getLogger(__name__)

HOLLOW_VERSION = "hollow"
SIGTERM = 15


def hollow_name(index: int) -> str:
    return f"hollow-{index:05d}"


def hollow_node_id(name: str) -> str:
    """Stable per name: a restarted fleet re-registers as the same nodes."""
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:11]


@dataclass(slots=True)
class _Container:
    spec: ContainerSpec
    image: ImageInfo
    running: RunningContainer | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@functools.lru_cache(maxsize=256)
def _hollow_image(reference: str) -> ImageInfo:
    """A made-up image for ``reference`` (the same every time: a digest derived from the name)."""
    digest = "sha256:" + hashlib.sha256(reference.encode()).hexdigest()
    return ImageInfo(reference=reference, digest=digest, rootfs="/nonexistent/hollow-rootfs")


class HollowRuntime:
    """A ``ContainerRuntime`` that runs nothing and records every call (benchmarks only).

    ``calls`` counts calls per method; ``started`` and ``removed`` hold task ids (every start and
    every remove, in order: a task started twice appears twice); ``log`` keeps ``(method, task id)``
    of every call when ``record_calls`` is true (off by default: a fleet of thousands would keep
    hundreds of thousands of tuples).
    """

    def __init__(self, node_name: str = "hollow", *, record_calls: bool = False) -> None:
        self.node_name = node_name
        self.record_calls = record_calls
        self.calls: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str]] = []
        self.started: list[str] = []
        self.removed: list[str] = []
        self._containers: dict[str, _Container] = {}
        self._pids = iter(range(100_000, 10**9))

    def _record(self, method: str, subject: str) -> None:
        self.calls[method] += 1
        if self.record_calls:
            self.log.append((method, subject))

    @property
    def running(self) -> set[str]:
        """Task ids whose hollow container is "running" now."""
        return {tid for tid, c in self._containers.items() if c.running is not None}

    async def pull(self, reference: str) -> ImageInfo:
        self._record("pull", reference)
        return _hollow_image(reference)

    async def create(self, spec: ContainerSpec, image: ImageInfo) -> None:
        self._record("create", spec.task_id)
        self._containers[spec.task_id] = _Container(spec=spec, image=image)

    async def start(self, task_id: str) -> RunningContainer:
        self._record("start", task_id)
        container = self._containers.get(task_id)
        if container is None:
            raise ContainerError(f"hollow container {task_id} was never created")
        container.exited = asyncio.Event()
        container.running = RunningContainer(
            task_id=task_id,
            pid=next(self._pids),
            ip="",
            image_digest=container.image.digest,
            started_at=time.time(),
        )
        self.started.append(task_id)
        return container.running

    async def wait(self, task_id: str) -> ExitStatus:
        container = self._containers.get(task_id)
        if container is None or container.running is None:
            return ExitStatus(exit_code=None)
        await container.exited.wait()
        return ExitStatus(exit_code=None, signal=SIGTERM)

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        self._record("stop", task_id)
        container = self._containers.get(task_id)
        if container is not None and container.running is not None:
            container.running = None
            container.exited.set()

    async def remove(self, task_id: str) -> None:
        self._record("remove", task_id)
        container = self._containers.pop(task_id, None)
        if container is not None:
            container.running = None
            container.exited.set()
        self.removed.append(task_id)

    async def list(self) -> list[ContainerRecord]:
        self._record("list", "")
        return [
            ContainerRecord(spec=c.spec, image_digest=c.image.digest, ip="", running=c.running)
            for c in self._containers.values()
        ]


class HollowAgent:
    """One hollow node: a real ``Session`` + ``TaskManager`` over a ``HollowRuntime``."""

    def __init__(
        self,
        controller: str,
        index: int,
        *,
        capacity: pb.Resources,
        labels: Mapping[str, str] | None = None,
        record_calls: bool = False,
    ) -> None:
        self.index = index
        self.name = hollow_name(index)
        self.node_id = hollow_node_id(self.name)
        self.runtime = HollowRuntime(self.name, record_calls=record_calls)
        self.reports = 0
        self.manager = TaskManager(
            self.runtime, node_id=self.node_id, node_name=self.name, report=self._report
        )
        identity = Identity(
            node_id=self.node_id,
            name=self.name,
            address="127.0.0.1",
            capacity=capacity,
            labels={"berth.hollow": "true", **(labels or {})},
            version=HOLLOW_VERSION,
        )
        self.session = Session(controller, identity, self.manager)
        self._task: asyncio.Task[None] | None = None

    def _report(self, status: pb.TaskStatus) -> None:
        self.reports += 1
        self.session.report(status)

    def start(self) -> None:
        self._task = asyncio.create_task(self.session.run_forever([]), name=f"hollow-{self.index}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.manager.close()


class _SessionWarnings(logging.Handler):
    """Counts the session's warnings (stream breaks, unacknowledged heartbeats) by message template."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = str(record.msg)
        if text.startswith("stream to controller broken"):
            self.counts["stream_breaks"] += 1
        elif text.startswith("no heartbeat acknowledged"):
            self.counts["heartbeat_timeouts"] += 1
        elif text.startswith("controller refused registration"):
            self.counts["refused"] += 1
        else:
            self.counts["other_warnings"] += 1


class HollowFleet:
    """Many hollow agents in one process, indexes ``start_index .. start_index + count - 1``."""

    def __init__(
        self,
        controller: str,
        count: int,
        *,
        start_index: int = 1,
        cpu_millis: int = 32_000,
        memory_bytes: int = 128 << 30,
        labels: Mapping[str, str] | None = None,
        record_calls: bool = False,
    ) -> None:
        capacity = pb.Resources(cpu_millis=cpu_millis, memory_bytes=memory_bytes)
        self.agents = [
            HollowAgent(controller, i, capacity=capacity, labels=labels, record_calls=record_calls)
            for i in range(start_index, start_index + count)
        ]
        self.warnings = _SessionWarnings()
        logging.getLogger("berth.agent.session").addHandler(self.warnings)

    async def start(self, connect_rate: float = 500.0) -> None:
        """Start every agent, ``connect_rate`` per second (a thundering herd of thousands of
        registrations at once measures only the herd)."""
        wave = max(1, int(connect_rate / 10))
        for n, agent in enumerate(self.agents):
            agent.start()
            if (n + 1) % wave == 0:
                await asyncio.sleep(0.1)

    def connected(self) -> int:
        return sum(1 for a in self.agents if a.session.connected.is_set())

    async def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.connected() < len(self.agents):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected()}/{len(self.agents)} hollow agents connected")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        logging.getLogger("berth.agent.session").removeHandler(self.warnings)

    def stats(self) -> dict[str, Any]:
        calls: collections.Counter[str] = collections.Counter()
        for a in self.agents:
            calls.update(a.runtime.calls)
        return {
            "agents": len(self.agents),
            "connected": self.connected(),
            "running": sum(len(a.runtime.running) for a in self.agents),
            "started": calls["start"],
            "removed": calls["remove"],
            "status_reports": sum(a.reports for a in self.agents),
            **{k: self.warnings.counts[k] for k in ("stream_breaks", "heartbeat_timeouts", "refused")},
        }


def _raise_fd_limit() -> None:
    """One TCP connection per hollow agent: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(args: argparse.Namespace) -> None:
    labels = dict(item.partition("=")[::2] for item in args.label)
    fleet = HollowFleet(
        args.controller,
        args.count,
        start_index=args.start_index,
        cpu_millis=parse_cpu(args.cpus),
        memory_bytes=parse_memory(args.memory),
        labels=labels,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.warning(
        "HOLLOW agents (benchmark only, nothing runs): %s..%s -> %s",
        hollow_name(args.start_index),
        hollow_name(args.start_index + args.count - 1),
        args.controller,
    )
    starter = asyncio.create_task(fleet.start(args.connect_rate))
    await stop.wait()
    starter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starter
    stats = fleet.stats()
    await fleet.stop()
    print(json.dumps(stats), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m berth.agent.hollow",
        description="Run many HOLLOW agents (benchmarks only: they run nothing) against a controller.",
    )
    parser.add_argument("--controller", default="127.0.0.1:7070", help="controller gRPC address")
    parser.add_argument("--count", type=int, default=100, help="number of hollow agents")
    parser.add_argument("--start-index", type=int, default=1, help="index of the first (hollow-00001)")
    parser.add_argument("--cpus", default="32", help="CPU capacity of each (e.g. 32 or 1500m)")
    parser.add_argument("--memory", default="128Gi", help="memory capacity of each (e.g. 128Gi)")
    parser.add_argument("--label", action="append", default=[], help="node label KEY=VALUE; repeat")
    parser.add_argument("--connect-rate", type=float, default=500.0, help="agents started per second")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    args = parser.parse_args(argv)
    for item in args.label:
        if "=" not in item or item.startswith("="):
            parser.error(f"--label: {item!r} is not KEY=VALUE")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    _raise_fd_limit()
    # a thousand agents' state in one process is a heap no real agent has: collect cycles as
    # rarely as the controller does (controller/__main__.py, tune_gc), or the collector's walks
    # of it take CPU the bench means to measure elsewhere
    gc.set_threshold(100_000, 50, 100)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
