"""The controller's Prometheus ``/metrics`` and its HTTP service discovery (``/sd``).

Two kinds of series. Event series (scheduling attempts, placement latency, node-down events,
failover time, reconcile duration, gRPC requests) are counters and histograms the controller
updates as things happen. State series (replicas per service, pending tasks by reason, nodes,
capacity and allocation) are computed *at scrape time* from the controller's cache by
``StateCollector``, so they can never drift from what ``berth`` shows. The scrape runs in the
HTTP server's thread while the cache belongs to the event loop, so the collector asks the loop to
take the snapshot (``run_coroutine_threadsafe``) instead of reading dicts another thread mutates.

Everything lives in one ``CollectorRegistry`` per controller (never the process-global one).
``/sd`` answers Prometheus' ``http_sd_configs`` with the controller itself and every node that
reported a metrics address; see deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from socketserver import TCPServer, ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double every counter for no dashboard's use

DEFAULT_METRICS_LISTEN = "127.0.0.1:9370"
SCRAPE_TIMEOUT = 5.0
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAILOVER_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

PENDING_REASONS = (
    "no-nodes",
    "insufficient-cpu",
    "insufficient-memory",
    "insufficient-resource",
    "port-conflict",
    "constraint",
    "max-per-node",
    "node-unavailable",
    "waiting",
)


def reason_code(reason: str) -> str:
    """The bounded label value for a pending reason such as "0/5 nodes available: 3 insufficient
    memory, 2 constraint zone==eu not met": the most common verdict's kind (the scheduler lists
    verdicts most common first)."""
    head = reason.partition(": ")[2] if " nodes available: " in reason else reason
    first = head.split(", ")[0].lstrip("0123456789 ")
    if "no nodes registered" in first:
        return "no-nodes"
    if first.startswith("insufficient cpu"):
        return "insufficient-cpu"
    if first.startswith("insufficient memory"):
        return "insufficient-memory"
    if first.startswith("insufficient "):
        return "insufficient-resource"
    if first.startswith(("host port conflict", "no free dynamic port")):
        return "port-conflict"
    if first.startswith("constraint "):
        return "constraint"
    if first.startswith("at max "):
        return "max-per-node"
    if first.startswith(("node down", "node draining", "node paused")):
        return "node-unavailable"
    return "waiting"


def berth_version() -> str:
    try:
        return metadata.version("berth")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(slots=True)
class StateView:
    """What the state series show, taken on the event loop in one go."""

    desired: dict[str, int] = field(default_factory=dict)  # service -> replicas
    running: dict[str, int] = field(default_factory=dict)
    pending: dict[tuple[str, str], int] = field(default_factory=dict)  # (service, reason code)
    nodes: list[tuple[str, bool, dict[str, float], dict[str, float]]] = field(default_factory=list)
    leader: bool = True


class StateCollector(Collector):
    def __init__(self, take: Callable[[], StateView]) -> None:
        self._take = take
        self._build = [berth_version(), platform.python_version()]  # read once, not every scrape

    def collect(self) -> Iterator[Metric]:
        view = self._take()
        desired = GaugeMetricFamily(
            "berth_service_desired_replicas", "Replicas each service declares.", labels=["service"]
        )
        running = GaugeMetricFamily(
            "berth_service_running_replicas",
            "Replicas of each service its agents report running on their assigned node.",
            labels=["service"],
        )
        for service, count in sorted(view.desired.items()):
            desired.add_metric([service], count)
            running.add_metric([service], view.running.get(service, 0))
        pending = GaugeMetricFamily(
            "berth_tasks_pending",
            "Tasks without a node, by service and the kind of their most common pending reason.",
            labels=["service", "reason"],
        )
        for (service, reason), count in sorted(view.pending.items()):
            pending.add_metric([service, reason], count)
        states = GaugeMetricFamily("berth_nodes", "Nodes by state.", labels=["state"])
        up = GaugeMetricFamily("berth_node_up", "1 if the node is ready, 0 if it is down.", labels=["node"])
        capacity = GaugeMetricFamily(
            "berth_node_capacity",
            "What the node offers: cpu in cores, memory in bytes, named resources in their units.",
            labels=["node", "resource"],
        )
        allocated = GaugeMetricFamily(
            "berth_node_allocated",
            "What the tasks assigned to the node request, in the units of berth_node_capacity.",
            labels=["node", "resource"],
        )
        ready = 0
        for name, is_up, cap, alloc in view.nodes:
            ready += is_up
            up.add_metric([name], 1.0 if is_up else 0.0)
            for resource in sorted(cap.keys() | alloc.keys()):
                capacity.add_metric([name, resource], cap.get(resource, 0.0))
                allocated.add_metric([name, resource], alloc.get(resource, 0.0))
        states.add_metric(["ready"], ready)
        states.add_metric(["down"], len(view.nodes) - ready)
        leader = GaugeMetricFamily(
            "berth_controller_leader", "1 when this controller is the one writer of the cluster state."
        )
        leader.add_metric([], 1.0 if view.leader else 0.0)
        info = GaugeMetricFamily(
            "berth_build_info",
            "Always 1; the labels say which build runs.",
            labels=["version", "python_version"],
        )
        info.add_metric(self._build, 1.0)
        yield from (desired, running, pending, states, up, capacity, allocated, leader, info)


class ControllerMetrics:
    """The controller's registry: event series as attributes, state series via a collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the process's memory, CPU and garbage collections, as every Python exporter has them:
        # the controller holds the whole cluster in memory and collects cycles rarely (GC_THRESHOLD)
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.scheduling_attempts = Counter(
            "berth_scheduling_attempts",
            "Tasks the scheduler tried to place, by result (placed, pending).",
            ["result"],
            registry=r,
        )
        self.placement_latency = Histogram(
            "berth_placement_latency_seconds",
            "From a task's creation until it is committed to etcd with a node.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.node_down_events = Counter(
            "berth_node_down_events", "Nodes declared down after missing their deadline.", registry=r
        )
        self.failover = Histogram(
            "berth_failover_seconds",
            "From a node declared down until every task it held runs again (replaced or reclaimed).",
            buckets=FAILOVER_BUCKETS,
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "berth_reconcile_duration_seconds",
            "One reconcile pass: desired vs stored tasks, placement and its commit to etcd.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_requests = Counter(
            "berth_grpc_requests",
            "gRPC calls served, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_duration = Histogram(
            "berth_grpc_request_duration_seconds",
            "Time to answer a unary gRPC call, by method.",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        for result in ("placed", "pending"):
            self.scheduling_attempts.labels(result)
        self._server: WSGIServer | None = None

    def watch_state(self, take: Callable[[], StateView], loop: asyncio.AbstractEventLoop) -> None:
        """Register the state series; ``take`` runs on ``loop`` at every scrape."""
        self.registry.register(StateCollector(lambda: call_on_loop(loop, take)))

    def serve(self, host: str, port: int, targets: Callable[[], list[dict[str, Any]]]) -> int:
        """Serve ``/metrics`` and ``/sd`` from a daemon thread; returns the bound port."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/sd":
                body = json.dumps(targets()).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
                return [body]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    """Run ``fn`` on ``loop`` (which owns the state it reads) from another thread and wait."""
    if loop.is_running() and _on_loop_thread(loop):
        return fn()  # already there (a direct registry.collect() on the loop, in tests)

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(SCRAPE_TIMEOUT)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind names the server with socket.getfqdn(), a reverse DNS lookup
        # that blocks for seconds where no resolver answers (a host's network namespace)
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def sd_targets(self_address: str, nodes: Iterable[pb.Node]) -> list[dict[str, Any]]:
    """Prometheus HTTP SD target groups: this controller, then every node with a metrics address."""
    groups: list[dict[str, Any]] = [
        {"targets": [self_address], "labels": {"__meta_berth_component": "controller"}}
    ]
    for node in sorted(nodes, key=lambda n: n.name):
        if node.metrics_address:
            groups.append(
                {
                    "targets": [node.metrics_address],
                    "labels": {
                        "__meta_berth_component": "agent",
                        "__meta_berth_node": node.name,
                        "__meta_berth_node_id": node.id,
                    },
                }
            )
    return groups


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and code; times unary calls (streams live as long as their
    agent or watcher and would only blur the histogram)."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    @contextlib.contextmanager
    def _recorded(self, method: str, context: grpc.aio.ServicerContext, *, timed: bool) -> Iterator[None]:
        started = time.perf_counter()
        failed: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if timed:
                self.metrics.grpc_duration.labels(method).observe(time.perf_counter() - started)
            self.metrics.grpc_requests.labels(method, _code_of(context, failed)).inc()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rpartition(".")[2]  # "/berth.v1.ClusterAPI/X" -> "ClusterAPI/X"
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        recorded = self._recorded
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def timed_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with recorded(method, context, timed=True):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(timed_unary, **codec)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def counted_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with recorded(method, context, timed=False):
                    async for item in stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(counted_stream, **codec)
        if handler.stream_stream is not None:
            bidi = handler.stream_stream

            async def counted_bidi(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                with recorded(method, context, timed=False):
                    return await bidi(requests, context)

            return grpc.stream_stream_rpc_method_handler(counted_bidi, **codec)
        return handler


def _code_of(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(failed, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN" if failed is not None else "OK"
