"""A controller on real etcd with its loops stopped, driven step by step by a test: passes,
liveness checks and agent registrations happen when the test says, on a clock it moves."""

from __future__ import annotations

from berth.controller.agents import Session
from berth.controller.cluster import Cluster
from berth.controller.nodes import Liveness
from berth.controller.store import Store
from berth.proto.berth.v1 import agent_pb2
from berth.proto.berth.v1 import types_pb2 as pb

CAPACITY = pb.Resources(cpu_millis=2000, memory_bytes=4 << 30)


class FakeClock:
    """The liveness clock, moved by the test (monotonic seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def driven_cluster(etcd: str, prefix: str, clock: FakeClock | None = None) -> tuple[Store, Cluster]:
    """A controller on real etcd with its loops stopped: the test drives passes and checks itself.
    With ``clock``, node deadlines are 4 s on it and the at-most-one margin 2 s."""
    store = Store(etcd, prefix)
    if clock is None:
        cluster = Cluster(store)
    else:
        cluster = Cluster(store, liveness=Liveness(deadline=4.0, clock=clock), margin=2.0)
    await cluster.start()
    await cluster.stop()
    return store, cluster


async def register(cluster: Cluster, *names: str) -> dict[str, Session]:
    """Nodes that register with ``CAPACITY``; their agents' sessions by name."""
    sessions = {}
    for name in names:
        sessions[name], _ = await cluster.register(
            agent_pb2.Register(node_id=name, name=name, capacity=CAPACITY)
        )
    return sessions
