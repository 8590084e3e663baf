"""The agent's Prometheus ``/metrics``: its containers (under cAdvisor's names) and itself.

Container series are read from each running container's cgroup files *at scrape time* by
``ContainerCollector`` (no background polling): the scrape thread takes a snapshot of the task
manager's runners, reads each running container's cgroup through ``Cgroups.stats`` and skips a
container whose cgroup disappears mid-read (it just exited) — a scrape never fails because of one
container. Labels are exactly ``{service, task, node}``; task ids are the only unbounded label.

Agent series: task restarts (read from the runners' status), image pull durations (a histogram
fed by the task runners), the last heartbeat round trip (read from the session) and build info.
Everything lives in one ``CollectorRegistry`` per agent, never the process-global one, so several
agents (tests, hollow fleets) can each have their own.
"""

from __future__ import annotations

import bisect
import logging
import platform
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from socketserver import TCPServer, ThreadingMixIn
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from berth.agent.cgroups import ContainerStats
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9371
CONTAINER_LABELS = ("service", "task", "node")
PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskView:
    """What the collector needs of one task the agent holds (a snapshot of its runner)."""

    task_id: str
    service: str
    running: bool
    started_at: float  # unix seconds the agent started (or re-adopted) the container; 0 if not
    restarts: int


class StatsReader(Protocol):
    def stats(self, task_id: str) -> ContainerStats | None: ...


def manager_tasks(manager: TaskManager) -> list[TaskView]:
    """Snapshot of ``manager``'s runners; safe to call from the scrape thread."""
    for _ in range(5):
        try:
            runners = list(manager.runners.values())
            break
        except RuntimeError:  # the event loop thread changed the dict while we copied it
            continue
    else:
        return []
    views = []
    for r in runners:
        status = r.status  # replaced on every state change; read once for a consistent view
        views.append(
            TaskView(
                task_id=r.task.id,
                service=r.task.service,
                running=status.state == pb.TASK_STATE_RUNNING,
                started_at=status.started_at,
                restarts=status.restarts,
            )
        )
    return views


_Family = GaugeMetricFamily | CounterMetricFamily


def _families() -> dict[str, _Family]:
    labels = list(CONTAINER_LABELS)
    g, c = GaugeMetricFamily, CounterMetricFamily
    return {
        "cpu": c(
            "container_cpu_usage_seconds_total",
            "Cumulative CPU time consumed by the container, in seconds.",
            labels=labels,
        ),
        "throttled": c(
            "container_cpu_cfs_throttled_seconds_total",
            "Total time the container was throttled by its CFS CPU quota, in seconds.",
            labels=labels,
        ),
        "usage": g(
            "container_memory_usage_bytes",
            "Current memory usage of the container, including page cache, in bytes.",
            labels=labels,
        ),
        "working_set": g(
            "container_memory_working_set_bytes",
            "Current working set of the container (usage minus inactive file pages), in bytes.",
            labels=labels,
        ),
        "limit": g(
            "container_spec_memory_limit_bytes",
            "Memory limit of the container in bytes; 0 when unlimited.",
            labels=labels,
        ),
        "quota": g(
            "container_spec_cpu_quota",
            "CPU quota of the container in microseconds per CFS period; 0 when unlimited.",
            labels=labels,
        ),
        "period": g(
            "container_spec_cpu_period",
            "CFS scheduling period of the container's CPU quota, in microseconds.",
            labels=labels,
        ),
        "start": g(
            "container_start_time_seconds",
            "Start time of the container since the unix epoch, in seconds.",
            labels=labels,
        ),
        "restarts": c(
            "berth_agent_task_restarts_total",
            "Times this agent restarted the task's container under its restart policy.",
            labels=labels,
        ),
        "rtt": g(
            "berth_agent_heartbeat_rtt_seconds",
            "Round-trip time of the last heartbeat the controller acknowledged, in seconds.",
            labels=["node"],
        ),
    }


class ContainerCollector(Collector):
    """Per-container cgroup metrics plus the agent's task restarts and heartbeat RTT."""

    def __init__(
        self,
        *,
        node: str,
        tasks: Callable[[], Iterable[TaskView]],
        cgroups: StatsReader | None,
        rtt: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.node = node
        self.tasks = tasks
        self.cgroups = cgroups
        self.rtt = rtt

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        fam = _families()
        for t in self.tasks():
            labels = [t.service, t.task_id, self.node]
            fam["restarts"].add_metric(labels, t.restarts)
            if not t.running or self.cgroups is None:
                continue
            try:
                stats = self.cgroups.stats(t.task_id)
            except (OSError, ValueError, KeyError) as exc:
                log.debug("no cgroup stats for task=%s: %s", t.task_id, exc)
                continue
            if stats is None:
                continue  # cgroup gone: the container just exited
            fam["cpu"].add_metric(labels, stats.cpu_usage_seconds)
            fam["throttled"].add_metric(labels, stats.cpu_throttled_seconds)
            fam["usage"].add_metric(labels, stats.memory_usage_bytes)
            fam["working_set"].add_metric(labels, stats.memory_working_set_bytes)
            fam["limit"].add_metric(labels, stats.memory_limit_bytes)
            fam["quota"].add_metric(labels, stats.cpu_quota_us)
            fam["period"].add_metric(labels, stats.cpu_period_us)
            if t.started_at > 0:
                fam["start"].add_metric(labels, t.started_at)
        rtt = self.rtt()
        if rtt is not None:
            fam["rtt"].add_metric([self.node], rtt)
        return list(fam.values())


class PullHistogram(Collector):
    """``berth_agent_image_pull_duration_seconds{node}``, observed from the event loop and read
    from the scrape thread (a custom collector rather than ``prometheus_client.Histogram`` so the
    exposition has no extra ``_created`` series)."""

    NAME = "berth_agent_image_pull_duration_seconds"
    HELP = (
        "Duration of successful image pulls by the agent's task runners, in seconds (every pull "
        "asks the registry, so pulls of an image already unpacked count too; failed pulls do not)."
    )

    def __init__(self, node: str, buckets: Sequence[float] = PULL_BUCKETS) -> None:
        self.node = node
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # le: a value equal to a bound falls in it
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.NAME, self.HELP, labels=["node"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip((*(str(float(b)) for b in self.bounds), "+Inf"), counts, strict=True):
            cumulative += n
            buckets.append((bound, float(cumulative)))
        family = self._family()
        family.add_metric([self.node], buckets, total)
        return [family]


class AgentMetrics:
    """The registry of one agent and the instruments fed by its task runners."""

    def __init__(self, node: str, *, version: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        self._pulls = PullHistogram(node)
        self.registry.register(self._pulls)
        Gauge(
            "berth_build_info",
            "Build information of the Berth agent; the value is always 1.",
            ["version", "python_version"],
            registry=self.registry,
        ).labels(version=version, python_version=platform.python_version()).set(1)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_pull(self, seconds: float) -> None:
        self._pulls.observe(seconds)

    def watch(
        self,
        tasks: Callable[[], Iterable[TaskView]],
        cgroups: StatsReader | None,
        rtt: Callable[[], float | None] = lambda: None,
    ) -> ContainerCollector:
        collector = ContainerCollector(node=self.node, tasks=tasks, cgroups=cgroups, rtt=rtt)
        self.registry.register(collector)
        return collector

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        server = make_server(
            host, port, make_wsgi_app(self.registry), _MetricsServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's own server, minus the reverse DNS lookup in ``HTTPServer.server_bind``
    (``socket.getfqdn``): in a host's network namespace without a resolver it blocked the agent's
    start for ~10 s, long enough for the controller to declare the node down."""

    daemon_threads = True

    def server_bind(self) -> None:
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


def parse_listen(value: str, default_host: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT``, ``:PORT`` = ``default_host``) -> (host, port); "" -> None."""
    value = value.strip()
    if not value:
        return None
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]") or default_host
    return host, int(port_s)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised(host: str, port: int, address: str) -> str:
    """The ``host:port`` the controller (and Prometheus) should scrape: a wildcard listen
    address is replaced by the node's own address."""
    return join_host_port(address if host in ("", "0.0.0.0", "::") else host, port)


def samples(registry: CollectorRegistry, name: str) -> Sequence[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named ``name`` (tests and debugging)."""
    return [
        (dict(s.labels), s.value) for family in registry.collect() for s in family.samples if s.name == name
    ]
