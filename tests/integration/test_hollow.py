"""Hollow agents (benchmark-only, nothing runs) against a real etcd and a real controller process.

A 100-replica service is placed on 20 hollow agents and every task is acknowledged RUNNING by the
agent it was placed on; removing the service makes those agents stop and remove every task.
Needs only the ``etcd`` binary (no root, no runc): everything is on loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from berth.agent.hollow import HollowFleet
from berth.proto.berth.v1 import cluster_pb2, cluster_pb2_grpc
from berth.proto.berth.v1 import types_pb2 as pb
from tests.integration.etcd_server import etcd_server, free_port

pytestmark = pytest.mark.integration

if shutil.which("etcd") is None:
    pytest.skip("needs the etcd binary (apt-get install etcd-server)", allow_module_level=True)

AGENTS = 20
REPLICAS = 100
TIMEOUT = 60.0


@pytest.fixture
def controller_args() -> list[str]:
    return []


@pytest.fixture
def controller(tmp_path: Path, controller_args: list[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with etcd_server(tmp_path / "etcd") as etcd:
        address = f"127.0.0.1:{free_port()}"
        log = open(tmp_path / "controller.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "berth.controller",
                "--etcd",
                etcd,
                "--listen",
                address,
                "--prefix",
                "/hollow/",
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                *controller_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            yield address, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


async def until(
    what: str, check: Callable[[], Awaitable[bool]], proc: subprocess.Popen[bytes], timeout: float = TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if proc.poll() is not None:
            raise AssertionError(f"the controller exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def test_hollow_agents_run_and_remove_a_service(controller: tuple[str, subprocess.Popen[bytes]]) -> None:
    address, proc = controller

    async def go() -> None:
        fleet = HollowFleet(address, AGENTS, cpu_millis=4000, memory_bytes=8 << 30, record_calls=True)
        by_node = {a.node_id: a for a in fleet.agents}
        channel = grpc.aio.insecure_channel(address)
        api = cluster_pb2_grpc.ClusterAPIStub(channel)
        try:

            async def nodes_ready() -> bool:
                try:
                    nodes = (await api.ListNodes(cluster_pb2.ListNodesRequest(), timeout=5)).nodes
                except grpc.aio.AioRpcError:
                    return False
                ready = [n for n in nodes if n.node.state == pb.NODE_STATE_READY]
                return len(ready) == AGENTS

            await fleet.start(connect_rate=200)
            await until("20 hollow nodes ready", nodes_ready, proc)
            names = {n.node.name for n in (await api.ListNodes(cluster_pb2.ListNodesRequest())).nodes}
            assert names == {f"hollow-{i:05d}" for i in range(1, AGENTS + 1)}

            spec = pb.ServiceSpec(
                name="hollowweb",
                image="hollow/pause:1",
                replicas=REPLICAS,
                resources=pb.Resources(cpu_millis=100, memory_bytes=32 << 20),
            )
            await api.CreateService(cluster_pb2.CreateServiceRequest(spec=spec), timeout=10)

            views: list[cluster_pb2.TaskView] = []

            async def all_running() -> bool:
                nonlocal views
                views = list(
                    (await api.ListTasks(cluster_pb2.ListTasksRequest(service="hollowweb"), timeout=5)).tasks
                )
                return len(views) == REPLICAS and all(
                    v.task.node_id and v.status.state == pb.TASK_STATE_RUNNING for v in views
                )

            await until("100 tasks acknowledged RUNNING", all_running, proc)
            task_ids = {v.task.id for v in views}
            assert len(task_ids) == REPLICAS
            assert {v.task.slot for v in views} == set(range(1, REPLICAS + 1))
            for v in views:
                agent = by_node[v.task.node_id]  # placed on a hollow node ...
                assert v.task.id in agent.runtime.running  # ... which "runs" it
                assert v.status.node_id == agent.node_id
                assert v.status.pid > 0
            for agent in fleet.agents:  # each task ran exactly once, on exactly one agent
                assert agent.runtime.running == {v.task.id for v in views if v.task.node_id == agent.node_id}
            assert sum(len(a.runtime.started) for a in fleet.agents) == REPLICAS
            assert len({v.task.node_id for v in views}) == AGENTS  # spread over all of them
            calls = [m for a in fleet.agents for m, _ in a.runtime.log]
            assert calls.count("pull") == calls.count("create") == calls.count("start") == REPLICAS

            await api.RemoveService(cluster_pb2.RemoveServiceRequest(name="hollowweb"), timeout=10)

            async def all_removed() -> bool:
                return {t for a in fleet.agents for t in a.runtime.removed} == task_ids

            await until("every task removed by its hollow agent", all_removed, proc)
            for agent in fleet.agents:
                assert not agent.runtime.running
                mine = {v.task.id for v in views if v.task.node_id == agent.node_id}
                assert set(agent.runtime.removed) == mine
                assert {t for m, t in agent.runtime.log if m == "stop"} == mine
            assert not (await api.ListTasks(cluster_pb2.ListTasksRequest())).tasks
            stats = fleet.stats()
            assert stats["stream_breaks"] == stats["heartbeat_timeouts"] == 0
            # PREPARING (pull), PREPARING (create), STARTING, RUNNING, SHUTDOWN per task
            assert stats["status_reports"] == 5 * REPLICAS
        finally:
            await fleet.stop()
            await channel.close()

    asyncio.run(go())


@pytest.mark.parametrize("controller_args", [["--max-heartbeats-per-second", "4"]])
def test_heartbeat_timing_stretches_with_the_node_count(
    controller: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """20 nodes at most 4 heartbeats/s in all: every agent is told to heartbeat every 5 s and
    to expect a 20 s deadline, including those that registered while the cluster was small."""
    address, proc = controller

    async def go() -> None:
        fleet = HollowFleet(address, AGENTS, cpu_millis=4000, memory_bytes=8 << 30)
        channel = grpc.aio.insecure_channel(address)
        api = cluster_pb2_grpc.ClusterAPIStub(channel)
        try:
            await fleet.start(connect_rate=200)

            async def all_follow() -> bool:
                return all(
                    a.session.heartbeat_interval == 5.0 and a.session.node_deadline == 20.0
                    for a in fleet.agents
                )

            await until("every agent to follow the stretched timing", all_follow, proc, timeout=15)
            first = fleet.agents[0].session  # registered when the cluster had one node
            acked = first.acked_at
            await asyncio.sleep(6.0)
            assert first.acked_at > acked  # it still heartbeats, now every 5 s
            nodes = (await api.ListNodes(cluster_pb2.ListNodesRequest(), timeout=5)).nodes
            assert len(nodes) == AGENTS
            assert all(n.node.state == pb.NODE_STATE_READY for n in nodes)
            stats = fleet.stats()
            assert stats["stream_breaks"] == stats["heartbeat_timeouts"] == 0
        finally:
            await fleet.stop()
            await channel.close()

    asyncio.run(go())


def test_a_large_drain_pass_never_restarts_a_drained_task(
    controller: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """Draining several nodes and scaling up at once makes one pass of several hundred writes.
    A drained task moves from its slot to ``retiring/`` in one transaction, so its agent keeps
    running it (never told to stop and start it again) until its replacement runs elsewhere."""
    address, proc = controller

    async def go() -> None:
        fleet = HollowFleet(address, AGENTS, cpu_millis=4000, memory_bytes=8 << 30, record_calls=True)
        by_name = {a.name: a for a in fleet.agents}
        channel = grpc.aio.insecure_channel(address)
        api = cluster_pb2_grpc.ClusterAPIStub(channel)
        replicas = 300
        try:
            await fleet.start(connect_rate=200)
            await fleet.wait_connected(TIMEOUT)
            spec = pb.ServiceSpec(
                name="wide",
                image="hollow/pause:1",
                replicas=replicas,
                resources=pb.Resources(cpu_millis=100, memory_bytes=32 << 20),
            )
            await api.CreateService(cluster_pb2.CreateServiceRequest(spec=spec), timeout=10)

            async def running(count: int, avoid: frozenset[str] = frozenset()) -> bool:
                views = (await api.ListTasks(cluster_pb2.ListTasksRequest(service="wide"), timeout=5)).tasks
                return len(views) == count and all(
                    v.status.state == pb.TASK_STATE_RUNNING and v.node_name not in avoid for v in views
                )

            await until("300 tasks running", lambda: running(replicas), proc)
            nodes = (await api.ListNodes(cluster_pb2.ListNodesRequest(), timeout=5)).nodes
            busy = sorted((n for n in nodes if n.tasks), key=lambda n: -n.tasks)
            drained = frozenset(n.node.name for n in busy[: max(1, len(busy) // 2)])
            held = {name: set(by_name[name].runtime.running) for name in drained}
            assert sum(len(h) for h in held.values()) > 64  # well over one transaction of pairs

            drain = pb.NODE_AVAILABILITY_DRAIN
            await asyncio.gather(
                *(
                    api.SetNodeAvailability(
                        cluster_pb2.SetNodeAvailabilityRequest(node=n, availability=drain)
                    )
                    for n in drained
                ),
                api.ScaleService(cluster_pb2.ScaleServiceRequest(name="wide", replicas=replicas + 1)),
            )
            await until("301 running off the drained nodes", lambda: running(replicas + 1, drained), proc)

            async def retired() -> bool:
                return all(not by_name[n].runtime.running for n in drained)

            await until("the drained nodes' tasks retired", retired, proc)
            for name in drained:
                started = by_name[name].runtime.started
                assert len(started) == len(set(started)), f"{name} started a task twice"
                assert set(by_name[name].runtime.removed) == held[name]  # each removed once, at retirement
        finally:
            await fleet.stop()
            await channel.close()

    asyncio.run(go())
