"""``berth controller``: wiring only (store, cluster, gRPC server)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import grpc
import typer

from berth.controller.api import AgentService, ClusterService
from berth.controller.cluster import Cluster
from berth.controller.logs import setup_logging
from berth.controller.metrics import (
    DEFAULT_METRICS_LISTEN,
    ControllerMetrics,
    GrpcMetricsInterceptor,
    call_on_loop,
    sd_targets,
)
from berth.controller.nodes import MAX_HEARTBEATS_PER_SECOND, Liveness
from berth.controller.store import Store, StoreError
from berth.proto.berth.v1 import agent_pb2_grpc, cluster_pb2_grpc

log = logging.getLogger("berth.controller")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def parse_listen(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` -> (host, port); "" -> None (metrics off)."""
    value = value.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(
            f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9370), or '' to turn metrics off",
            param_hint="--metrics-listen",
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


async def serve(
    etcd: str, listen: list[str], prefix: str, max_heartbeats: float, metrics_listen: tuple[str, int] | None
) -> None:
    store = Store(etcd, prefix)
    while True:
        try:
            await store.ping()
            break
        except StoreError as exc:
            log.warning("waiting for etcd: %s", exc)
            await asyncio.sleep(1.0)
    metrics = ControllerMetrics()
    cluster = Cluster(store, liveness=Liveness(max_heartbeats_per_second=max_heartbeats), metrics=metrics)
    await cluster.start()
    loop = asyncio.get_running_loop()
    if metrics_listen is not None:
        metrics.watch_state(cluster.state_view, loop)
        host, port = metrics_listen
        try:
            bound = metrics.serve(host, port, lambda: call_on_loop(loop, targets))
        except OSError as exc:
            raise SystemExit(f"--metrics-listen: cannot bind {host}:{port}: {exc.strerror}") from None
        own = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{bound}"

        def targets() -> list[dict[str, object]]:
            return sd_targets(own, (s.value for s in cluster.state.nodes.values()))

        log.info("metrics serving address=%s:%d paths=/metrics,/sd", host, bound)
    # keepalive pings reap streams of agents that vanished without a FIN (power loss, partition)
    server = grpc.aio.server(
        interceptors=[GrpcMetricsInterceptor(metrics)],
        options=[
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ],
    )
    cluster_pb2_grpc.add_ClusterAPIServicer_to_server(ClusterService(cluster), server)
    agent_pb2_grpc.add_AgentAPIServicer_to_server(AgentService(cluster), server)
    for address in listen:
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"--listen: cannot bind {address}")
    await server.start()
    log.info("controller serving addresses=%s etcd=%s prefix=%s", ",".join(listen), etcd, prefix)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("controller stopping")
    await server.stop(grace=1.0)
    await cluster.stop()
    metrics.close()
    await store.close()


GC_THRESHOLD = (100_000, 50, 100)


def tune_gc() -> None:
    """Collect cycles less often than CPython's default (700, 10, 10).

    The controller keeps every task, status and node of the cluster in memory (a few million
    objects at 100,000 tasks) and a placement pass allocates hundreds of thousands more that
    live on as the new state. At the default thresholds the cyclic collector walks that whole
    heap again and again during a pass: measured with ``bench.scheduler`` at 5,000 nodes and
    100,000 tasks, placing and acknowledging took 40 % longer. Almost nothing here forms cycles
    (reference counting frees it at once), so collecting rarely costs little memory: the young
    generation is collected every 100,000 allocations (a few seconds when idle), the oldest at
    most every 500 million.
    """
    gc.set_threshold(*GC_THRESHOLD)


@app.command()
def main(
    etcd: str = typer.Option("http://127.0.0.1:2379", help="etcd client URL."),
    listen: list[str] = typer.Option(
        ["127.0.0.1:7070"], help="Address to serve gRPC on; repeat for several."
    ),
    prefix: str = typer.Option("/berth/", help="Key prefix for all state in etcd."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    metrics_listen: str = typer.Option(
        DEFAULT_METRICS_LISTEN,
        help="Address for Prometheus: /metrics, and /sd (HTTP service discovery of the controller "
        "and every agent's metrics). '' turns it off.",
    ),
    max_heartbeats_per_second: float = typer.Option(
        MAX_HEARTBEATS_PER_SECOND,
        min=1.0,
        help="Heartbeats the controller handles per second in all: past this many nodes the "
        "heartbeat interval (1 s) and the node deadline (4 s) stretch with the node count.",
    ),
) -> None:
    """Run the Berth controller: keeps declared services placed and running across agents."""
    setup_logging(log_level)
    tune_gc()
    try:
        asyncio.run(serve(etcd, listen, prefix, max_heartbeats_per_second, parse_listen(metrics_listen)))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    app()
