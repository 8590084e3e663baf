"""``berth controller``: wiring only (store, cluster, gRPC server)."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import typer

from berth.controller.api import AgentService, ClusterService
from berth.controller.cluster import Cluster
from berth.controller.logs import setup_logging
from berth.controller.nodes import MAX_HEARTBEATS_PER_SECOND, Liveness
from berth.controller.store import Store, StoreError
from berth.proto.berth.v1 import agent_pb2_grpc, cluster_pb2_grpc

log = logging.getLogger("berth.controller")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


async def serve(etcd: str, listen: list[str], prefix: str, max_heartbeats: float) -> None:
    store = Store(etcd, prefix)
    while True:
        try:
            await store.ping()
            break
        except StoreError as exc:
            log.warning("waiting for etcd: %s", exc)
            await asyncio.sleep(1.0)
    cluster = Cluster(store, liveness=Liveness(max_heartbeats_per_second=max_heartbeats))
    await cluster.start()
    # keepalive pings reap streams of agents that vanished without a FIN (power loss, partition)
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ]
    )
    cluster_pb2_grpc.add_ClusterAPIServicer_to_server(ClusterService(cluster), server)
    agent_pb2_grpc.add_AgentAPIServicer_to_server(AgentService(cluster), server)
    for address in listen:
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"--listen: cannot bind {address}")
    await server.start()
    log.info("controller serving addresses=%s etcd=%s prefix=%s", ",".join(listen), etcd, prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("controller stopping")
    await server.stop(grace=1.0)
    await cluster.stop()
    await store.close()


@app.command()
def main(
    etcd: str = typer.Option("http://127.0.0.1:2379", help="etcd client URL."),
    listen: list[str] = typer.Option(
        ["127.0.0.1:7070"], help="Address to serve gRPC on; repeat for several."
    ),
    prefix: str = typer.Option("/berth/", help="Key prefix for all state in etcd."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    max_heartbeats_per_second: float = typer.Option(
        MAX_HEARTBEATS_PER_SECOND,
        min=1.0,
        help="Heartbeats the controller handles per second in all: past this many nodes the "
        "heartbeat interval (1 s) and the node deadline (4 s) stretch with the node count.",
    ),
) -> None:
    """Run the Berth controller: keeps declared services placed and running across agents."""
    setup_logging(log_level)
    try:
        asyncio.run(serve(etcd, listen, prefix, max_heartbeats_per_second))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    app()
